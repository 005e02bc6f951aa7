"""Connect to the Ray cluster a job runs on, or start a local one.

Inside ``ray job submit`` (or with ``RAY_ADDRESS`` set) the job attaches to that cluster;
otherwise a local Ray is started for this process, which is the embedded default of the demo.
``QINCO_RAY_DASHBOARD=1`` starts that local Ray with its dashboard (jobs, actors, Ray Data and
Ray Train progress, logs) on 127.0.0.1 and logs its address; a cluster's own dashboard is the
cluster's.
"""

from __future__ import annotations

import logging
import math
import os

import ray
import ray.data

from pipeline.errors import ConfigError
from pipeline.io.storage import RedactingFilter

log = logging.getLogger(__name__)

DASHBOARD_ENV = "QINCO_RAY_DASHBOARD"
_YES, _NO = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


def dashboard_wanted() -> bool:
    """Whether ``QINCO_RAY_DASHBOARD`` asks for the local Ray's dashboard (off by default: it
    costs a few processes and seconds at start)."""
    value = os.environ.get(DASHBOARD_ENV, "").strip().lower()
    if value not in _YES + _NO:
        raise ConfigError(f"{DASHBOARD_ENV}={value!r}: give 1 (start the local Ray's dashboard) or 0")
    return value in _YES


class _NoErrorsUnlessVerbose(logging.Filter):
    """On Ray Data's console handler: a failed task's error and traceback are not printed, since
    the command reports the error itself (one line, exit status 2; a bug still propagates with
    its traceback). With debug logging (``qinco -v``) everything passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR or logging.getLogger().isEnabledFor(logging.DEBUG)


def quiet_ray_data_console() -> None:
    """Install :class:`_NoErrorsUnlessVerbose` and credential redaction on the handlers of Ray
    Data's logger, which does not propagate to the root logger's (its log file keeps all)."""
    for h in logging.getLogger("ray.data").handlers:
        if any(isinstance(f, _NoErrorsUnlessVerbose) for f in h.filters):
            continue
        h.addFilter(RedactingFilter())
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
            h.addFilter(_NoErrorsUnlessVerbose())


def ensure_ray(num_cpus: int | None = None) -> bool:
    """Initialise Ray if needed. Returns True when this call started a local instance."""
    quiet_ray_data_console()
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    address = os.environ.get("RAY_ADDRESS")
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
        return False
    dashboard = dashboard_wanted()
    log.info("no RAY_ADDRESS: starting a local Ray")
    # address="local": this process's own instance, never a cluster someone started with `ray start`
    ctx = ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard, dashboard_host="127.0.0.1",
                   log_to_driver=False)
    if dashboard:
        log.info("Ray dashboard: http://%s", ctx.dashboard_url)
    return True


def cluster_at_address() -> dict[str, float] | None:
    """The resources of the Ray cluster at ``RAY_ADDRESS`` (attaching to it), or None when it is
    unset (a job would start a local Ray on this machine)."""
    if not os.environ.get("RAY_ADDRESS"):
        return None
    ensure_ray()
    return ray.cluster_resources()


def room_for(actors: int, cpus_per_actor: float, memory_per_actor: int | None = None) -> str | None:
    """None when the cluster's free resources can take ``actors`` more actors of that size now;
    otherwise what they need and what is free, in words (Ray would leave them pending)."""
    free = ray.available_resources()
    short = []
    cpus, free_cpus = actors * cpus_per_actor, free.get("CPU", 0.0)
    if cpus > free_cpus + 1e-6:
        short.append(f"{cpus:g} CPUs ({free_cpus:g} free)")
    if memory_per_actor is not None:
        mem, free_mem = actors * memory_per_actor, free.get("memory", 0.0)
        if mem > free_mem:
            short.append(f"{mem / 2**30:.2f} GiB of memory ({free_mem / 2**30:.2f} GiB free)")
    return "; ".join(short) or None


def default_cpus_per_worker(workers: int, reserve: float = 0.5) -> float:
    """CPUs each of ``workers`` actors reserves when the user did not say: one, or less so that
    all of them fit on the cluster with ``reserve`` CPUs left for read tasks and the driver."""
    return cpus_share(float(ray.cluster_resources().get("CPU", 1.0)), workers, reserve)


def cpus_share(total: float, workers: int, reserve: float = 0.5) -> float:
    """One, or the quarter CPUs below ``(total - reserve) / workers`` (at least a quarter)."""
    share = (total - reserve) / max(1, workers)
    return max(0.25, min(1.0, math.floor(share * 4) / 4))
