"""Reads of ``struct bpf_map`` fields through a map pointer (the kernel's check_ptr_to_map_access).

A program may read ``((struct bpf_map *)&my_map)->max_entries``: the kernel treats the map
pointer as a pointer to the map type's kernel struct (``struct bpf_array``, ``struct bpf_htab``,
... each starting with ``struct bpf_map map``), walks that struct's BTF and gives the program
an unknown scalar for a scalar field.  The layout is the running kernel's (vmlinux BTF); the
object's CO-RE relocations put the same offsets into the program.

Here the map is not a kernel object, so a read has a value only for the fields that describe
the loaded map: ``map_type``, ``key_size``, ``value_size``, ``max_entries``, ``map_extra`` and
``map_flags``.  Each such load reads one map's field at one instruction; the loader replaces it
by a move of that constant (``rewrites``), so every engine -- interpreter, JIT, code in the
traced process -- gives the value without a kernel struct in memory.  Other fields (ids,
pointers, locks, the map type's own fields) are refused as not supported; what the kernel
refuses is refused with its message.
"""

from __future__ import annotations

from ubpf_py.isa import opcodes as op
from ubpf_py.isa.instruction import Instruction
from ubpf_py.obj.spec import MapSpec
from ubpf_py.verifier import state as S
from ubpf_py.verifier.btfwalk import struct_access
from ubpf_py.verifier.context import CheckContext
from ubpf_py.verifier.memory import Reject
from ubpf_py.verifier.scalar import Scalar, unknown_bits

#: map type -> the kernel struct its map pointer points to (map->ops->map_btf_id), for the
#: map types ubpf-py runs (helpers.protos.MODELLED_MAP_TYPES)
MAP_STRUCTS = {
    1: "bpf_htab", 5: "bpf_htab", 9: "bpf_htab", 10: "bpf_htab", 13: "bpf_htab",
    2: "bpf_array", 3: "bpf_array", 4: "bpf_array", 6: "bpf_array", 8: "bpf_array", 12: "bpf_array",
    7: "bpf_stack_map", 11: "lpm_trie", 22: "bpf_queue_stack", 23: "bpf_queue_stack",
    27: "bpf_ringbuf_map", 30: "bpf_bloom_filter",
}

#: fields of struct bpf_map that have a value for a map of this runtime
KNOWN_FIELDS = ("map_type", "key_size", "value_size", "max_entries", "map_extra", "map_flags")
_NOT_SUPPORTED = "not supported: only " + ", ".join(KNOWN_FIELDS) + " of struct bpf_map have a value here"


def field_value(m: MapSpec, name: str) -> int:
    """The value of a known ``struct bpf_map`` field for the loaded map ``m``."""
    return {"map_type": m.type, "key_size": m.key_size, "value_size": m.value_size,
            "max_entries": m.max_entries, "map_extra": m.map_extra, "map_flags": m.flags}[name]


def _kernel_btf():
    from ubpf_py.obj.btf import load_kernel_btf

    return load_kernel_btf()


def check_read(ck: CheckContext, reg: S.Reg, regno: int, off: int, size: int, write: bool, sext: bool,
               pc: int) -> S.Reg:
    """Check a load (or refuse a store) through map pointer ``reg``; returns the loaded register
    and records the constant the loader puts in its place (``ck.map_field_loads``)."""
    from ubpf_py.obj.btf import KIND_STRUCT

    m = ck.maps[reg.map]
    btf = _kernel_btf()
    if btf is None:
        raise Reject("map_ptr access not supported without CONFIG_DEBUG_INFO_BTF",
                     "reading struct bpf_map fields needs the kernel's BTF (/sys/kernel/btf/vmlinux)")
    sname = MAP_STRUCTS.get(m.type)
    tid = btf.find(sname, KIND_STRUCT) if sname else 0
    if not tid:
        raise Reject(f"map_ptr access not supported for map type {m.type}")
    if off < 0:
        raise Reject(f"R{regno} is {sname} invalid negative access: off={off}")
    if write:
        raise Reject(f"only read from {sname} is supported", "a map's kernel struct is read-only")
    w = struct_access(btf, tid, off, size)
    names = [mem for _struct, mem in w.path]
    name = names[-1]
    if w.pointer or names[:-1] != ["map"] or w.path[-1][0] != "bpf_map" or name not in KNOWN_FIELDS \
            or w.is_array:
        raise Reject(f"reading field '{'.'.join(names)}' of struct {sname} through a map pointer is not supported",
                     _NOT_SUPPORTED)
    if reg.map >= ck.n_object_maps:
        raise Reject(f"reading struct bpf_map field '{name}' of an inner map is not supported",
                     "not supported: the inner map is only known when the program runs")
    lo = w.inner_off
    value = int.from_bytes(field_value(m, name).to_bytes(w.msize, "little")[lo:lo + size], "little")
    if size == 8 and value >> 31:
        raise Reject(f"reading struct bpf_map field '{name}' = {value:#x} is not supported",
                     "not supported: 64-bit field values from 2**31 up")
    record(ck, pc, (reg.map, name, lo, size, sext), value)
    # like the kernel: an unknown scalar of the access size (the value is the loaded map's)
    return S.Reg(S.SCALAR, Scalar.unknown().sext(size) if sext else unknown_bits(size))


def record(ck: CheckContext, pc: int, key: tuple, value: int) -> None:
    loads = ck.map_field_loads
    old = loads.get(pc)
    if old is not None and old[0] != key:
        raise Reject("reading struct bpf_map fields of different maps or fields at one instruction is "
                     "not supported", "not supported: read the field of each map at its own instruction")
    loads[pc] = (key, value)


def rewrites(insns: list[Instruction], loads: dict[int, tuple[tuple, int]]) -> dict[int, Instruction]:
    """Instruction index -> the move of the constant that replaces a map field load."""
    out = {}
    for pc, ((_map, _name, _off, size, sext), value) in loads.items():
        dst = insns[pc].dst
        if sext:
            bits = size * 8
            value = value - (1 << bits) if value >> (bits - 1) else value
            out[pc] = Instruction(op.BPF_ALU64 | op.BPF_MOV | op.BPF_K, dst, 0, 0, value)
        elif size <= 4:
            # a 32-bit move zero-extends, as the load does
            out[pc] = Instruction(op.BPF_ALU | op.BPF_MOV | op.BPF_K, dst, 0, 0,
                                  value - (1 << 32) if value >> 31 else value)
        else:   # below 2**31 (check_read): a 64-bit move of the positive immediate
            out[pc] = Instruction(op.BPF_ALU64 | op.BPF_MOV | op.BPF_K, dst, 0, 0, value)
    return out
