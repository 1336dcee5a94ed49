"""What only sleepable programs are held to (``uprobe.s``, loaded with BPF_F_SLEEPABLE).

A sleepable program may call helpers that fault pages in (bpf_copy_from_user,
``protos.HelperProto.sleepable_only``; checked in ``calls``), and runs outside an RCU
read-side section, so pointers it loads from kernel objects are untrusted
(``btfptr._loaded_flags``).  In exchange the kernel lets it use only the map types whose
code copes with a sleeping user (check_map_prog_compatibility); it checks every map the
program's instructions name before verifying anything, reached or not, so this check
runs before the structural pass too.
"""

from __future__ import annotations

from ubpf_py.abi.bpf import MapType
from ubpf_py.isa import opcodes as op
from ubpf_py.isa.instruction import Instruction
from ubpf_py.obj.spec import MapSpec
from ubpf_py.verifier.structure import StructureError

#: map types a sleepable program may use (check_map_prog_compatibility, Linux 6.18)
SLEEPABLE_MAP_TYPES = frozenset({
    MapType.HASH, MapType.LRU_HASH, MapType.ARRAY, MapType.PERCPU_HASH, MapType.PERCPU_ARRAY,
    MapType.LRU_PERCPU_HASH, MapType.ARRAY_OF_MAPS, MapType.HASH_OF_MAPS, MapType.RINGBUF,
    MapType.USER_RINGBUF, MapType.INODE_STORAGE, MapType.SK_STORAGE, MapType.TASK_STORAGE,
    MapType.CGRP_STORAGE, MapType.QUEUE, MapType.STACK, MapType.ARENA,
})

_MAP_REFS = (op.BPF_PSEUDO_MAP_IDX, op.BPF_PSEUDO_MAP_IDX_VALUE)


def check_maps(insns: list[Instruction], maps: list[MapSpec]) -> None:
    """Raise StructureError at the first instruction naming a map a sleepable program may
    not use (the kernel's wording)."""
    for i, ins in enumerate(insns):
        if ins.opcode == op.LDDW and ins.src in _MAP_REFS and 0 <= ins.imm < len(maps):
            m = maps[ins.imm]
            if m.type not in SLEEPABLE_MAP_TYPES:
                raise StructureError("Sleepable programs can only use array, hash, ringbuf and local storage maps",
                                     i, f"map '{m.name}' ({m.type_name}) cannot be used by a sleepable "
                                        "(uprobe.s) program; use a ringbuf or a hash/array map")
