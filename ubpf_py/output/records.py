"""Decoding ring/perf buffer records into fields, the same way for both backends.

A record is decoded as the ``--event-type`` struct when given, else the only BTF
struct of the record's size, else the only DWARF struct of that size (clang
leaves structs used only on the stack out of BTF; perf records may carry up to
7 bytes of padding), else not at all (the writers print a hexdump).
"""

from __future__ import annotations

from typing import Any

from ubpf_py.errors import UbpfError, UsageError


def event_type_id(spec: Any, name: str | None) -> int:
    """The BTF id of ``--event-type NAME`` (0 when not given)."""
    if not name:
        return 0
    btf = spec.btf
    if btf is None:
        raise UsageError(f"--event-type {name}: the object has no BTF to find the type in")
    from ubpf_py.obj.btf import KIND_STRUCT

    tid = btf.find(name.removeprefix("struct ").strip(), KIND_STRUCT)
    if not tid:
        raise UsageError(f"--event-type {name}: no struct of that name in the object's BTF")
    return tid


def decode_record(decoder: Any, obj_path: str, type_id: int, data: bytes, perf: bool = False) -> Any:
    """Fields of one record, or None when no type describes it."""
    if decoder is None:
        return None
    tid = type_id or decoder.unique_struct_of_size(len(data))
    if tid:
        return decoder.value(tid, bytes(data))
    from ubpf_py.obj.dwarf_types import find_struct_by_size

    try:
        layout = find_struct_by_size(obj_path, len(data), slack=7 if perf else 0)
    except UbpfError:
        return None
    return layout.decode(bytes(data)) if layout is not None else None
