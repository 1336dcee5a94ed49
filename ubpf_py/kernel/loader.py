"""Turning an ObjectSpec into live kernel objects: maps, BTF, programs.

This is the kernel backend's equivalent of ``live.Collection``: it takes the same
inert ``ObjectSpec`` the userspace engines get, so the kernel verifier and the kernel's
helpers judge exactly the bytecode we run.  Steps, in libbpf's order:

1. BTF: the object's ``.BTF`` (DATASEC sizes and VAR offsets filled in from the ELF,
   as libbpf does) is loaded with BPF_BTF_LOAD when it is accepted; it is optional --
   maps and programs fall back to no BTF when the kernel refuses it (PROG_ARRAY with
   ``__type(key)`` is the known case).
2. Maps: created in spec order (inner map templates first), global data maps get
   their initial bytes, ``.rodata``/``.kconfig`` are created BPF_F_RDONLY_PROG and
   frozen.
3. Programs: spec-level lddw map references are rewritten to fds (src 5 -> 1,
   src 6 -> 2), CO-RE relocations are applied against the kernel BTF, and each
   program is loaded as BPF_PROG_TYPE_KPROBE (the uprobe program type).
4. PROG_ARRAY and map-in-map slots from ``init_slots`` are filled.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from typing import Any

from ubpf_py.abi.bpf import MapType
from ubpf_py.errors import KernelBackendError, NotSupportedError, RelocationError
from ubpf_py.isa.instruction import Instruction
from ubpf_py.kernel.maps import KernelMap, possible_cpus
from ubpf_py.kernel.prog import BPF_F_SLEEPABLE, KPROBE, prog_load
from ubpf_py.obj.spec import MapSpec, ObjectSpec, ProgramSpec

BPF_PSEUDO_MAP_FD = 1
BPF_PSEUDO_MAP_VALUE = 2
BPF_PSEUDO_MAP_IDX = 5
BPF_PSEUDO_MAP_IDX_VALUE = 6
LDDW = 0x18

BPF_F_RDONLY_PROG = 1 << 7
BPF_F_MMAPABLE = 1 << 10

MAP_PROG_ARRAY = MapType.PROG_ARRAY
MAP_PERF_EVENT_ARRAY = MapType.PERF_EVENT_ARRAY
MAP_ARRAY_OF_MAPS = MapType.ARRAY_OF_MAPS
MAP_HASH_OF_MAPS = MapType.HASH_OF_MAPS
MAP_RINGBUF = 27
GLOBAL_SECTIONS = (".data", ".rodata", ".bss", ".kconfig")


@dataclass
class KernelCollection:
    """Live kernel maps and programs of one object, by name."""

    spec: ObjectSpec
    maps: dict[str, KernelMap] = field(default_factory=dict)
    #: in spec order (index = spec map index)
    map_list: list[KernelMap] = field(default_factory=list)
    programs: dict[str, int] = field(default_factory=dict)
    btf_fd: int = -1
    #: notes for the user (BTF refused, ...)
    notes: list[str] = field(default_factory=list)

    def close(self) -> None:
        for fd in self.programs.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self.programs.clear()
        for m in self.map_list:
            m.close()
        self.map_list.clear()
        self.maps.clear()
        if self.btf_fd >= 0:
            os.close(self.btf_fd)
            self.btf_fd = -1

    def __enter__(self) -> KernelCollection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_collection(spec: ObjectSpec, *, programs: list[str] | None = None, use_btf: bool = True,
                    log_level: int = 0) -> KernelCollection:
    """Create every map and load ``programs`` (default: all) of ``spec`` in the kernel.
    Raises KernelBackendError (verifier log in ``.log``) and closes what it created."""
    coll = KernelCollection(spec)
    try:
        if use_btf:
            coll.btf_fd = _try_load_btf(spec, coll.notes)
        for mspec in spec.maps:
            kmap = _create_map(mspec, coll.btf_fd, coll.notes)
            coll.map_list.append(kmap)
            coll.maps[mspec.name] = kmap
        for mspec, kmap in zip(spec.maps, coll.map_list, strict=True):
            _init_global_data(mspec, kmap)
        names = list(spec.programs) if programs is None else programs
        for name in names:
            pspec = spec.programs.get(name)
            if pspec is None:
                raise KernelBackendError(f"the object has no program {name!r} (programs: {', '.join(spec.programs)})")
            coll.programs[name] = _load_program(spec, pspec, coll, log_level)
        _fill_slots(spec, coll)
    except BaseException:
        coll.close()
        raise
    return coll


# ---------------------------------------------------------------------------------------
# BTF
# ---------------------------------------------------------------------------------------
def _try_load_btf(spec: ObjectSpec, notes: list[str]) -> int:
    from ubpf_py.kernel.btf_fixup import kernel_btf_bytes
    from ubpf_py.kernel.prog import btf_load

    raw = kernel_btf_bytes(spec)
    if raw is None:
        return -1
    try:
        return btf_load(raw)
    except KernelBackendError as exc:
        notes.append(f"kernel refused the object's BTF ({exc}); loading without BTF")
        return -1


# ---------------------------------------------------------------------------------------
# maps
# ---------------------------------------------------------------------------------------
def _map_params(m: MapSpec) -> tuple[int, int, int, int]:
    """(key_size, value_size, max_entries, flags) with libbpf's defaults applied."""
    key, value, entries, flags = m.key_size, m.value_size, m.max_entries, m.flags
    if m.type == MAP_PERF_EVENT_ARRAY:
        key, value = key or 4, value or 4
        entries = entries or possible_cpus()
    if m.internal or m.section.startswith(GLOBAL_SECTIONS):
        if m.readonly or m.section.startswith((".rodata", ".kconfig")):
            flags |= BPF_F_RDONLY_PROG
        flags |= BPF_F_MMAPABLE
    return key, value, entries, flags


def _create_map(m: MapSpec, btf_fd: int, notes: list[str]) -> KernelMap:
    inner_fd = 0
    inner: KernelMap | None = None
    if m.type in (MAP_ARRAY_OF_MAPS, MAP_HASH_OF_MAPS):
        if m.inner is None:
            raise KernelBackendError(f"map {m.name}: map-in-map without an inner map template "
                                     "(declare __array(values, ...))")
        inner = _create_map(m.inner, btf_fd, notes)
        inner_fd = inner.fd
    key, value, entries, flags = _map_params(m)
    use_btf = btf_fd >= 0 and m.key_type_id and m.value_type_id and m.type not in (MAP_PROG_ARRAY,)
    try:
        try:
            return KernelMap.create(m.type, key, value, entries, flags, name=m.name, inner_map_fd=inner_fd,
                                    map_extra=m.map_extra, numa_node=m.numa_node,
                                    btf_fd=btf_fd if use_btf else 0,
                                    btf_key_type_id=m.key_type_id if use_btf else 0,
                                    btf_value_type_id=m.value_type_id if use_btf else 0)
        except KernelBackendError:
            if not use_btf:
                raise
            # libbpf retries without BTF too (e.g. key types the kernel refuses for this map type)
            notes.append(f"map {m.name}: kernel refused its BTF; created without BTF")
            return KernelMap.create(m.type, key, value, entries, flags, name=m.name, inner_map_fd=inner_fd,
                                    map_extra=m.map_extra, numa_node=m.numa_node)
    finally:
        if inner is not None:
            inner.close()


def _init_global_data(m: MapSpec, kmap: KernelMap) -> None:
    if m.data is not None:
        data = bytes(m.data)[: kmap.value_size].ljust(kmap.value_size, b"\0")
        rc = kmap.update(bytes(kmap.key_size), data)
        if rc < 0:
            raise KernelBackendError(f"cannot write the initial data of {m.name}: {os.strerror(-rc)}", errno=-rc)
    if m.readonly or m.section.startswith((".rodata", ".kconfig")):
        rc = kmap.freeze()
        if rc < 0:
            raise KernelBackendError(f"cannot freeze {m.name}: {os.strerror(-rc)}", errno=-rc)


# ---------------------------------------------------------------------------------------
# programs
# ---------------------------------------------------------------------------------------
def relocate_for_kernel(insns: list[Instruction], map_fds: list[int], prog: str = "") -> list[Instruction]:
    """Spec-level map references (lddw src 5/6 with a map index) -> kernel map fds
    (src 1 BPF_PSEUDO_MAP_FD / src 2 BPF_PSEUDO_MAP_VALUE, offset in the second slot)."""
    out = list(insns)
    for i, ins in enumerate(out):
        if ins.opcode != LDDW or ins.src not in (BPF_PSEUDO_MAP_IDX, BPF_PSEUDO_MAP_IDX_VALUE):
            continue
        idx = ins.imm
        if not 0 <= idx < len(map_fds):
            raise RelocationError(f"program {prog}: instruction {i} refers to map index {idx}, "
                                  f"but the object has {len(map_fds)} maps")
        if ins.src == BPF_PSEUDO_MAP_IDX:
            out[i] = ins.replace(src=BPF_PSEUDO_MAP_FD, imm=map_fds[idx], imm_hi=0)
        else:
            out[i] = ins.replace(src=BPF_PSEUDO_MAP_VALUE, imm=map_fds[idx])  # imm_hi keeps the offset
    return out


def _apply_core(spec: ObjectSpec, pspec: ProgramSpec, poisoned: dict[int, str] | None = None) -> list[Instruction]:
    """The program's spec-level instructions with CO-RE relocations applied against the
    running kernel's BTF (the kernel, not a userspace target, is what programs read here)."""
    if not pspec.core_relocs:
        return list(pspec.instructions)
    try:
        from ubpf_py.obj.core import apply_core_relocs
    except ImportError:
        raise NotSupportedError(f"CO-RE relocations of program {pspec.name} in the kernel backend "
                                "(ubpf_py.obj.core is not available)") from None
    from ubpf_py.obj.btf import load_kernel_btf

    target: Any = load_kernel_btf()
    if target is None:
        raise KernelBackendError(f"program {pspec.name} needs CO-RE but the kernel has no BTF "
                                 "(/sys/kernel/btf/vmlinux missing)")
    # as libbpf: unresolvable relocations poison their instruction; the verifier decides
    return apply_core_relocs(pspec, spec.btf, target, strict=False, poisoned=poisoned)


def _func_info(pspec: ProgramSpec) -> bytes | None:
    """bpf_func_info records (insn_off, type_id) when every function has a BTF id."""
    if not pspec.func_info or 0 not in pspec.func_info:
        return None
    starts = sorted(set(pspec.functions) | {0})
    if any(s not in pspec.func_info for s in starts):
        return None
    return b"".join(struct.pack("<II", s, pspec.func_info[s]) for s in starts)


def _load_program(spec: ObjectSpec, pspec: ProgramSpec, coll: KernelCollection, log_level: int) -> int:
    poisoned: dict[int, str] = {}
    insns = _apply_core(spec, pspec, poisoned)
    try:
        return _load_relocated(spec, pspec, coll, log_level, insns)
    except KernelBackendError as exc:
        # libbpf's log fix-up: the kernel reached a poisoned CO-RE instruction
        if poisoned and "unknown#195896080" in (exc.log or str(exc)):
            from ubpf_py.errors import RelocationError

            why = next(iter(poisoned.values())) if len(poisoned) == 1 else "; ".join(sorted(set(poisoned.values())))
            raise RelocationError(f"program '{pspec.name}': {why}") from None
        raise


def _load_relocated(spec: ObjectSpec, pspec: ProgramSpec, coll: KernelCollection, log_level: int,
                    insns: list[Instruction]) -> int:
    insns = relocate_for_kernel(insns, [m.fd for m in coll.map_list], pspec.name)
    license = pspec.license or spec.license or "GPL"
    flags = BPF_F_SLEEPABLE if pspec.sleepable else 0
    func_info = _func_info(pspec) if coll.btf_fd >= 0 else None
    common = {"log_level": log_level, "prog_name": pspec.name, "prog_flags": flags,
              "kern_version": spec.kern_version}
    if func_info is not None:
        try:
            return prog_load(insns, KPROBE, license, btf_fd=coll.btf_fd, func_info=func_info, **common)
        except KernelBackendError as exc:
            if "func_info" not in exc.log and "BTF" not in exc.log and "btf" not in exc.log:
                raise
            coll.notes.append(f"program {pspec.name}: kernel refused its func_info; loaded without BTF")
    return prog_load(insns, KPROBE, license, **common)


def _fill_slots(spec: ObjectSpec, coll: KernelCollection) -> None:
    for mspec, kmap in zip(spec.maps, coll.map_list, strict=True):
        for slot, target in sorted(mspec.init_slots.items()):
            if mspec.type == MAP_PROG_ARRAY:
                fd = coll.programs.get(target)
                if fd is None:
                    raise KernelBackendError(f"map {mspec.name} slot {slot}: program {target!r} was not loaded")
            elif mspec.type in (MAP_ARRAY_OF_MAPS, MAP_HASH_OF_MAPS):
                inner = coll.maps.get(target)
                if inner is None:
                    raise KernelBackendError(f"map {mspec.name} slot {slot}: no map {target!r}")
                fd = inner.fd
            else:
                continue
            rc = kmap.update(struct.pack("<I", slot), struct.pack("<I", fd))
            if rc < 0:
                raise KernelBackendError(f"map {mspec.name}: cannot set slot {slot} to {target}: "
                                         f"{os.strerror(-rc)}", errno=-rc)
