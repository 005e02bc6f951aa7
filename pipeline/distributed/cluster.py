"""Connect to the Ray cluster a job runs on, or start a local one.

Inside ``ray job submit`` (or with ``RAY_ADDRESS`` set) the job attaches to that cluster;
otherwise a local Ray is started for this process, which is the embedded default of the demo.
"""

from __future__ import annotations

import logging
import math
import os

import ray

log = logging.getLogger(__name__)


def ensure_ray(num_cpus: int | None = None) -> bool:
    """Initialise Ray if needed. Returns True when this call started a local instance."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    address = os.environ.get("RAY_ADDRESS")
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
        return False
    log.info("no RAY_ADDRESS: starting a local Ray")
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    return True


def default_cpus_per_worker(workers: int, reserve: float = 0.5) -> float:
    """CPUs each of ``workers`` actors reserves when the user did not say: one, or less so that
    all of them fit on the cluster with ``reserve`` CPUs left for read tasks and the driver."""
    return cpus_share(float(ray.cluster_resources().get("CPU", 1.0)), workers, reserve)


def cpus_share(total: float, workers: int, reserve: float = 0.5) -> float:
    """One, or the quarter CPUs below ``(total - reserve) / workers`` (at least a quarter)."""
    share = (total - reserve) / max(1, workers)
    return max(0.25, min(1.0, math.floor(share * 4) / 4))
