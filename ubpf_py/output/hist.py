"""Histograms found by type and drawn like bpftrace's ``hist()`` / ``lhist()``.

A log2 slot ``i`` counts values in ``[2**i, 2**(i+1))`` (slot 0 also holds 0),
which is how libbpf-tools and funclatency-style tools fill them; a linear slot
``i`` counts the value ``i``.

What is a histogram is read from the BTF types, not from names:

* a struct with an integer-array member ``slots`` (libbpf-tools' ``struct hist``),
  as a map value (one histogram per key) or a global;
* an integer array of 8..64 elements (``__u64 size_hist[32]``), as a global or a
  map value;
* an ARRAY map of integers is drawn when ``--hist MAP`` asks for it (its type
  cannot say whether the index is a log2 slot); bpftrace's naming habit
  (``hist``/``slot`` in the name) is still honoured for those.

``--hist MAP[:log2|linear]`` forces the drawing (also for hash maps whose keys
are slot numbers).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

_SUFFIXES = ["", "K", "M", "G", "T", "P", "E"]
BAR_WIDTH = 52
#: integer arrays of this many elements are log2 histograms (a u64 value has 64 slots at most)
ARRAY_SLOTS = range(8, 65)
_NAME_WORDS = ("hist", "slot", "lat", "dist")


def _short(n: int) -> str:
    i = 0
    while n >= 1024 and n % 1024 == 0 and i < len(_SUFFIXES) - 1:
        n //= 1024
        i += 1
    return f"{n}{_SUFFIXES[i]}"


def slot_label(i: int, kind: str = "log2") -> str:
    if kind == "linear":
        return f"[{i}, {i + 1})"
    if i == 0:
        return "[0, 2)"
    return f"[{_short(1 << i)}, {_short(1 << (i + 1))})"


def slot_upper_bound(i: int, kind: str = "log2") -> int:
    """The largest integer slot ``i`` holds (Prometheus ``le``)."""
    return i if kind == "linear" else (1 << (i + 1)) - 1


def slot_lower_bound(i: int, kind: str = "log2") -> int:
    return i if kind == "linear" or i == 0 else 1 << i


@dataclass
class Histogram:
    """One histogram of a map (``key``: the decoded key text for per-key histograms, else None)."""

    name: str
    key: str | None
    kind: str
    slots: list[int]
    #: the decoded key (for metric labels), None for whole-map histograms
    key_value: Any = None


def slots_of(value: Any) -> list[int] | None:
    """The slots of a decoded value that is a histogram by its type (see module docstring)."""
    if isinstance(value, dict):
        s = value.get("slots")
        if isinstance(s, list) and s and all(isinstance(x, int) for x in s):
            return s
        return None
    if isinstance(value, list) and len(value) in ARRAY_SLOTS and all(isinstance(x, int) for x in value):
        return value
    return None


def _named_like_hist(name: str) -> bool:
    return any(w in name.lower() for w in _NAME_WORDS)


def map_histograms(d: Any, decoder: Any, forced: str | None = None) -> list[Histogram] | None:
    """The histograms of a map dump, or None when it is not one (``forced``: "log2"/"linear")."""
    if not d.entries or d.internal:
        return None
    kind = forced or "log2"
    if d.value_size in (1, 2, 4, 8) and (d.type_name in ("array", "percpu_array")
                                         or (forced and d.key_size in (1, 2, 4, 8))):
        if forced or (d.type_name in ("array", "percpu_array") and _named_like_hist(d.name)
                      and d.max_entries >= 8):
            return [Histogram(d.name, None, kind, _index_slots(d))]
        return None
    out = []
    for k, v in d.entries:
        vals = v if isinstance(v, list) else [v]
        slots = _sum_slots([slots_of(decoder.value(d.value_type_id, x[:d.value_size])) for x in vals])
        if slots is None:
            return None
        single = d.type_name in ("array", "percpu_array") and d.max_entries == 1
        key_value = None if single else decoder.value(d.key_type_id, k)
        key = None if single else decoder.text(d.key_type_id, k, d.key_size)
        out.append(Histogram(d.name, key, kind, slots, key_value))
    return out


def _index_slots(d: Any) -> list[int]:
    """Array (or slot-keyed hash) map of integers: index -> count."""
    n = d.max_entries if d.type_name in ("array", "percpu_array") else 0
    vals: dict[int, int] = {}
    for k, v in d.entries or []:
        idx = int.from_bytes(k[:min(len(k), 8)], "little")
        raw = v if isinstance(v, list) else [v]
        vals[idx] = vals.get(idx, 0) + sum(int.from_bytes(x[:d.value_size], "little") for x in raw)
    size = max(n, max(vals, default=-1) + 1)
    return [vals.get(i, 0) for i in range(size)]


def _sum_slots(per_cpu: list[list[int] | None]) -> list[int] | None:
    if not per_cpu or any(s is None for s in per_cpu):
        return None
    out = [0] * max(len(s) for s in per_cpu if s is not None)
    for s in per_cpu:
        for i, x in enumerate(s or []):
            out[i] += x
    return out


def render_hist(values: Sequence[int], kind: str = "log2") -> list[str]:
    """bpftrace-style lines (label, count, bar) from the first to the last non-zero slot."""
    nz = [i for i, v in enumerate(values) if v]
    if not nz:
        return ["(empty)"]
    top = max(values[i] for i in nz)
    lines = []
    for i in range(nz[0], nz[-1] + 1):
        v = values[i]
        bar = "@" * (v * BAR_WIDTH // top if top else 0)
        lines.append(f"{slot_label(i, kind):<20}{v:>8} |{bar:<{BAR_WIDTH}}|")
    return lines


def render_log2_hist(values: Sequence[int]) -> list[str]:
    return render_hist(values, "log2")
