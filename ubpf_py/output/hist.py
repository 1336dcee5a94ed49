"""Log2 histograms drawn like bpftrace's ``hist()``.

Slot ``i`` of a log2 histogram counts values in ``[2**i, 2**(i+1))`` (slot 0
also holds 0), which is how funclatency-style tools fill them.
"""

from __future__ import annotations

from collections.abc import Sequence

_SUFFIXES = ["", "K", "M", "G", "T", "P", "E"]
BAR_WIDTH = 52


def _short(n: int) -> str:
    i = 0
    while n >= 1024 and n % 1024 == 0 and i < len(_SUFFIXES) - 1:
        n //= 1024
        i += 1
    return f"{n}{_SUFFIXES[i]}"


def slot_label(i: int) -> str:
    if i == 0:
        return "[0, 2)"
    return f"[{_short(1 << i)}, {_short(1 << (i + 1))})"


def looks_like_histogram(name: str, values: Sequence[int]) -> bool:
    """A name that says so and enough integer slots to be one."""
    lname = name.lower()
    return len(values) >= 8 and any(w in lname for w in ("hist", "slot", "lat", "dist"))


def render_log2_hist(values: Sequence[int]) -> list[str]:
    """bpftrace-style lines (label, count, bar) from the first to the last non-zero slot."""
    nz = [i for i, v in enumerate(values) if v]
    if not nz:
        return ["(empty)"]
    top = max(values[i] for i in nz)
    lines = []
    for i in range(nz[0], nz[-1] + 1):
        v = values[i]
        bar = "@" * (v * BAR_WIDTH // top if top else 0)
        lines.append(f"{slot_label(i):<20}{v:>8} |{bar:<{BAR_WIDTH}}|")
    return lines
