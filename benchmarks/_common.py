"""Helpers the benchmark scripts share: timing one call, latency percentiles, a free loopback port, a process's RSS.

The scripts import it as ``_common`` (``python benchmarks/<script>.py`` puts ``benchmarks/`` first on
``sys.path``; a script loaded from its path adds the folder itself).
"""

from __future__ import annotations

import socket
import statistics
import time
from pathlib import Path

HOST = "127.0.0.1"  # loopback only: the benchmarks never send load anywhere else


def time_ms(fn, *args, **kwargs):
    """``(fn(*args, **kwargs), milliseconds it took)``, wall clock."""
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, 1000 * (time.perf_counter() - start)


def percentile(sorted_ms: list[float], q: float, empty=None):
    """The ``q`` quantile of ascending ``sorted_ms``, the value at index ``int(q * (n - 1))`` (no interpolation),
    rounded to 0.01; ``empty`` when there are none.

    Example:
        >>> percentile([1.0, 2.0, 3.0, 4.0], 0.5), percentile([1.0, 2.0, 3.0, 4.0], 0.99), percentile([], 0.5)
        (2.0, 3.0, None)
    """
    return round(sorted_ms[min(len(sorted_ms) - 1, int(q * (len(sorted_ms) - 1)))], 2) if sorted_ms else empty


def latency_summary(times_ms: list[float]) -> dict:
    """``calls``, ``p50_ms`` (the median), ``p95_ms``, ``p99_ms`` and ``mean_ms`` of per-call times.

    Example:
        >>> latency_summary([4.0, 1.0, 3.0, 2.0])
        {'calls': 4, 'p50_ms': 2.5, 'p95_ms': 3.0, 'p99_ms': 3.0, 'mean_ms': 2.5}
    """
    times = sorted(times_ms)
    return {"calls": len(times), "p50_ms": round(statistics.median(times), 2), "p95_ms": percentile(times, 0.95),
            "p99_ms": percentile(times, 0.99), "mean_ms": round(statistics.fmean(times), 2)}


def free_port(host: str = HOST) -> int:
    """A TCP port nobody listens on at ``host`` now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    """Resident memory of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"no VmRSS for pid {pid}")
