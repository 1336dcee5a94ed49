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
