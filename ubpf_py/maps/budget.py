"""How much memory a map needs at creation, and refusing what cannot be honoured.

Why: an object asking for ``max_entries`` 0xffffffff must fail before anything runs,
in one line naming the map, the size asked for and the limit -- not minutes later with
``MemoryError`` half way through allocating.  ``create_map`` calls ``check_map``;
``ubpf-run --check`` calls ``check_spec_maps`` so it reports the same problem.

The limit (``memory_limit()``): ``--map-memory-limit`` / ``UBPF_MAP_MEMORY_LIMIT`` (bytes,
K/M/G suffixes) when set, else half of the machine's MemAvailable.  It applies per map
and to the maps of one object together.

errno, following what the kernel's BPF_MAP_CREATE answers for the same sizes: hash maps too
big -> E2BIG (the kernel checks their size before allocating), everything else -> ENOMEM
(the allocation fails).
``BPF_F_NO_PREALLOC`` hash maps allocate as they fill (``maps.storage.SlotStore``), so only
their fixed part counts at creation; they are refused when even full they could never fit
in more than 8 times the limit (a size no run could honour).
"""

from __future__ import annotations

import os

from ubpf_py.errors import MapError, UsageError
from ubpf_py.maps import consts as C
from ubpf_py.obj.spec import MapSpec
from ubpf_py.sysinfo import possible_cpus

_limit_override: int | None = None

_HASH_TYPES = (C.HASH, C.PERCPU_HASH, C.LRU_HASH, C.LRU_PERCPU_HASH, C.HASH_OF_MAPS)
_PERCPU = (C.PERCPU_HASH, C.LRU_PERCPU_HASH, C.PERCPU_ARRAY)
_ARRAYS = (C.ARRAY, C.PERCPU_ARRAY, C.PROG_ARRAY, C.ARRAY_OF_MAPS, C.PERF_EVENT_ARRAY)
#: per-entry bookkeeping of a hash map besides key and value: used flags, native index
#: (two u64 table slots), the slot -> position list, LRU reference byte
_HASH_OVERHEAD = 2 + 16 + 8 + 1


def parse_size(text: str) -> int:
    """``123``, ``64K``, ``512M``, ``2G`` -> bytes (UsageError otherwise)."""
    t = text.strip().upper().removesuffix("B")
    mult = 1
    if t and t[-1] in "KMGT":
        mult = 1 << (10 * ("KMGT".index(t[-1]) + 1))
        t = t[:-1]
    try:
        n = int(float(t) * mult)
    except ValueError:
        raise UsageError(f"bad memory size {text!r}: give bytes with an optional K, M or G suffix") from None
    if n <= 0:
        raise UsageError(f"bad memory size {text!r}: must be positive")
    return n


def set_memory_limit(nbytes: int | None) -> None:
    """Set (or, with None, reset to the default) the map memory limit of this process."""
    global _limit_override
    _limit_override = nbytes


def _mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 1 << 30


def memory_limit() -> tuple[int, str]:
    """(bytes, where the number comes from) -- the second part goes into error messages."""
    if _limit_override is not None:
        return _limit_override, "--map-memory-limit"
    env = os.environ.get("UBPF_MAP_MEMORY_LIMIT")
    if env:
        return parse_size(env), "UBPF_MAP_MEMORY_LIMIT"
    return _mem_available() // 2, "half of MemAvailable; raise it with --map-memory-limit"


def _r8(n: int) -> int:
    return (n + 7) & ~7


def footprint(spec: MapSpec, ncpus: int | None = None) -> tuple[int, int]:
    """(bytes allocated when the map is created, bytes when it is full)."""
    ncpus = ncpus or possible_cpus()
    n = max(spec.max_entries, 0)
    t = spec.type
    vcopies = ncpus if t in _PERCPU else 1
    if t in _HASH_TYPES:
        full = n * (_r8(spec.key_size) + _r8(spec.value_size) * vcopies + _HASH_OVERHEAD)
        if spec.flags & C.BPF_F_NO_PREALLOC:
            return 0, full
        return full, full
    if t == C.PERF_EVENT_ARRAY:
        return n * 8, n * 8
    if t in _ARRAYS:
        size = n * _r8(spec.value_size) * vcopies
        return size, size
    if t == C.RINGBUF:
        return 2 * n, 2 * n
    if t == C.STACK_TRACE:
        size = n * (_r8(spec.value_size) + 9)
        return size, size
    if t in (C.QUEUE, C.STACK):
        size = (n + 1) * spec.value_size
        return size, size
    if t == C.BLOOM_FILTER:
        size = n * max(spec.value_size, 1) * 2
        return size, size
    # LPM tries and others: allocated per element
    per = _r8(spec.key_size) + _r8(spec.value_size) + 64
    return 0, n * per


def _refuse(spec: MapSpec, needed: int, limit: int, source: str, what: str) -> MapError:
    errno = C.E2BIG if spec.type in _HASH_TYPES else C.ENOMEM
    err = MapError(f"map '{spec.name}' ({spec.type_name}, max_entries {spec.max_entries}, key "
                   f"{spec.key_size} value {spec.value_size}) {what} {_human(needed)}; the limit is "
                   f"{_human(limit)} ({source}) [{'E2BIG' if errno == C.E2BIG else 'ENOMEM'}]")
    err.errno = errno  # type: ignore[attr-defined]
    return err


def check_map(spec: MapSpec, ncpus: int | None = None, already: int = 0) -> int:
    """Raise MapError when ``spec`` cannot be honoured; returns its creation footprint.
    ``already``: bytes the other maps of the same object take."""
    if spec.type_name.startswith("type#"):
        err = MapError(f"map '{spec.name}': unknown map type {spec.type}; use a BPF_MAP_TYPE_ value "
                       f"[EINVAL]")
        err.errno = C.EINVAL  # type: ignore[attr-defined]
        raise err
    limit, source = memory_limit()
    now, full = footprint(spec, ncpus)
    if now > limit:
        raise _refuse(spec, now, limit, source, "needs")
    if full > 8 * limit:
        raise _refuse(spec, full, 8 * limit, f"8 x {_human(limit)}: {source}",
                      "would need when full (BPF_F_NO_PREALLOC)")
    if now + already > limit:
        raise _refuse(spec, now + already, limit, source, "needs, with the object's other maps,")
    return now


def check_spec_maps(spec) -> int:
    """Check every map of an ``ObjectSpec`` (and map-in-map inner templates); total bytes."""
    total = 0
    for m in spec.maps.values() if isinstance(spec.maps, dict) else spec.maps:
        total += check_map(m, already=total)
        inner = getattr(m, "inner", None)
        if inner is not None:
            total += check_map(inner, already=total)
    return total


def _human(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} bytes"
