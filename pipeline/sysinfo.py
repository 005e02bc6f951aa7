"""What this machine is and how much memory this process has used: stored with benchmark results
and job reports."""

from __future__ import annotations

import os
import platform


def machine_info() -> dict:
    """Platform, CPU model and core count, stored with every benchmark result."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"platform": platform.platform(), "cpu_model": cpu, "cpu_count": os.cpu_count()}


def _status_bytes(field: str) -> int | None:
    """A memory field of ``/proc/self/status`` (reported in KiB) in bytes; None when unknown."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def private_rss_bytes() -> int:
    """This process's resident private memory now (``RssAnon``), in bytes; 0 when unknown.

    Unlike the peak (``VmHWM``), it leaves out shared pages the process has touched, such as
    Ray's object store, which a worker maps and reads its input blocks from."""
    return _status_bytes("RssAnon") or 0


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (``VmHWM``), in bytes; 0 when unknown."""
    found = _status_bytes("VmHWM")
    if found is not None:
        return found
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except (ImportError, OSError):
        return 0


def available_memory_bytes() -> int | None:
    """Memory the system can give new processes now (``MemAvailable``), in bytes; None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
