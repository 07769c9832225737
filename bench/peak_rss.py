"""Peak-RSS measurement shared by the benchmarks (Linux: /proc/self/status and /proc/self/clear_refs)."""

from __future__ import annotations

import ctypes


def status_mib(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM, ...) in MiB; NaN where it is missing."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> float:
    """Hand freed heap pages back (malloc_trim), then restart VmHWM (peak RSS) from the current RSS; returns
    that RSS in MiB, the baseline to subtract from a later ``status_mib("VmHWM")``."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status_mib("VmRSS")
