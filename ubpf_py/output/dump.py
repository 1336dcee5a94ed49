"""Snapshots of maps and globals, in the shapes the writers print.

Entries are raw bytes here (``api.MapView.dump`` / ``api.Globals.dumps`` take
them from either backend); decoding through BTF happens in the writers so the
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
