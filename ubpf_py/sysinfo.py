"""Facts about this machine that several layers need (spec defaults, maps, the kernel backend)."""

from __future__ import annotations

import functools
import os
from pathlib import Path


@functools.cache
def possible_cpus() -> int:
    """Number of possible CPUs, as the kernel sizes per-CPU storage and perf arrays
    (libbpf_num_possible_cpus): parsed from /sys/devices/system/cpu/possible (``0-3,5``)."""
    try:
        text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    except OSError:
        return os.cpu_count() or 1
    count = 0
    for part in text.split(","):
        if "-" in part:
            lo, hi = part.split("-")
            count += int(hi) - int(lo) + 1
        elif part:
            count += 1
    return max(count, 1)


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (traced processes run on this machine)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has(flag: str) -> bool:
    return flag in cpu_flags()
