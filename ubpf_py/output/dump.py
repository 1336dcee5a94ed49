"""Snapshots of live maps and globals, in the shapes the writers print.

Entries are raw bytes here; decoding through BTF happens in the writers so the
same snapshot serves text, JSON and the corpus oracle format.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: map types whose contents are not key/value data (the oracle prints null for them)
NO_ENTRIES = {"ringbuf", "perf_event_array", "prog_array", "user_ringbuf"}
PERCPU = {"percpu_hash", "percpu_array", "lru_percpu_hash"}


@dataclass
class MapDump:
    name: str
    type_name: str
    key_size: int
    value_size: int
    max_entries: int
    internal: bool
    key_type_id: int
    value_type_id: int
    #: (key, value) or (key, [per-cpu values]); None for maps without entries
    entries: list[tuple[bytes, Any]] | None
    section: str = ""


@dataclass
class GlobalDump:
    name: str
    map_name: str
    data: bytes
    type_id: int
    #: a static variable of a read-only section (bpf_printk format strings and the like)
    static_const: bool = False


#: arrays with more entries than this are dumped without their all-zero elements
DUMP_ALL_LIMIT = 1 << 16


def snapshot_map(m: Any) -> MapDump:
    """Copy a live map's entries (kernel iteration order; a huge array only its non-zero
    elements -- printing millions of zeros helps nobody and took minutes)."""
    spec = m.spec
    tname = spec.type_name
    entries: list[tuple[bytes, Any]] | None
    keys = m.nonzero_keys() if spec.max_entries > DUMP_ALL_LIMIT and hasattr(m, "nonzero_keys") else None
    if tname in NO_ENTRIES:
        entries = None
    elif keys is not None:
        entries = [(k, m.lookup_percpu(k) if tname in PERCPU else m.lookup(k)) for k in keys]
    elif tname in PERCPU:
        entries = [(k, m.lookup_percpu(k)) for k in m.keys()]  # noqa: SIM118 - Map.keys() walks get_next_key
    elif tname in ("queue", "stack", "bloom_filter"):
        entries = [(b"", v) for v in m.values()] if hasattr(m, "values") else []
    else:
        entries = [(k, m.lookup(k)) for k in m.keys()]  # noqa: SIM118 - Map.keys() walks get_next_key
        entries = [(k, v) for k, v in entries if v is not None]
    return MapDump(spec.name, tname, spec.key_size, spec.value_size, spec.max_entries, spec.internal,
                   spec.key_type_id, spec.value_type_id, entries, spec.section)


def snapshot_globals(spec: Any, maps: dict[str, Any]) -> list[GlobalDump]:
    """Every global variable of the object, read from its data map (.bss, .data, .rodata, .kconfig)."""
    out = []
    for var in spec.globals.values():
        m = maps.get(var.map_name)
        if m is None:
            continue
        value = m.lookup(b"\0" * m.spec.key_size)
        if value is None:
            continue
        static_const = var.linkage == "static" and m.spec.readonly
        out.append(GlobalDump(var.name, var.map_name, bytes(value[var.offset:var.offset + var.size]), var.type_id,
                              static_const))
    return out
