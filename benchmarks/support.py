"""Small helpers every benchmark script shares: ports, percentiles, process memory.

The benchmarks run as scripts (``python benchmarks/ingest.py``) and put the checkout on
``sys.path`` themselves, so they import this module as ``benchmarks.support``.
"""

from __future__ import annotations

from tests.servers import checkout_env, free_port, wait_for_port

__all__ = ["checkout_env", "cpu_seconds", "free_port", "percentile", "rss_kib", "wait_port"]


def wait_port(port: int, timeout: float = 20.0) -> None:
    """Block until something accepts connections on 127.0.0.1:*port*."""
    wait_for_port(port, timeout)


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile *p* (0-100) of *values*; NaN when there are none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def rss_kib(pid: int) -> int:
    """Resident memory of process *pid* in KiB (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return 0
    return 0


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU time process *pid* has used so far, in seconds (zeros if gone):
    what a figure costs, whatever else the machine runs, and how much of it the kernel's."""
    import os

    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()
    except OSError:
        return 0.0, 0.0
    # after the command: state is field 3 of stat(5), utime and stime are fields 14, 15
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick
