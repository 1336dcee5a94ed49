"""ELF relocations -> the spec contract (see ``obj/spec.py``), and subprogram linking.

Per instruction, as libbpf's bpf_program__record_reloc / bpf_object__relocate_data:

* lddw against a ``.maps``/legacy ``maps`` symbol -> ``src=5`` imm = map index;
* lddw against a data section symbol (incl. section symbols into
  ``.rodata.str1.1``) -> ``src=6`` imm = map index, imm_hi = insn imm + st_value;
* lddw against a ``.kconfig`` extern -> ``src=6`` into the .kconfig map at the
  extern's offset (the instruction's own imm is ignored, like libbpf);
* calls (``src=1``) and callback addresses (lddw ``src=4``) are resolved while
  linking: every subprogram a program reaches is appended after it in
  depth-first order of first use (bpf_object__reloc_code), and imm becomes the
  offset relative to the instruction.

func_info, line_info and CO-RE relocation records travel with each function's
instructions so that their indices are those of the linked program.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ubpf_py.errors import NotSupportedError, RelocationError
from ubpf_py.isa.instruction import Instruction
from ubpf_py.isa.opcodes import (
    BPF_CALL,
    BPF_JMP,
    BPF_PSEUDO_CALL,
    BPF_PSEUDO_FUNC,
    BPF_PSEUDO_KFUNC_CALL,
    BPF_PSEUDO_MAP_IDX,
    BPF_PSEUDO_MAP_IDX_VALUE,
    LDDW,
)
from ubpf_py.obj.btf_ext import BtfExt
from ubpf_py.obj.elffile import SHN_LORESERVE, SHN_UNDEF, STB_GLOBAL, STB_WEAK, STT_NOTYPE, RawElf
from ubpf_py.obj.mapdefs import MapTable
from ubpf_py.obj.spec import CoreReloc, LineInfo

CALL = BPF_JMP | BPF_CALL


@dataclass
class Function:
    """One function symbol's instructions inside an executable section."""

    name: str
    section: str
    shndx: int
    #: first instruction index within its section
    start: int
    insns: list[Instruction]
    is_global: bool
    #: local insn index -> (symbol index, rel type) for call / callback relocations
    code_relocs: dict[int, int] = field(default_factory=dict)
    func_info: int = 0
    line_info: list[tuple[int, LineInfo]] = field(default_factory=list)
    core: list[tuple[int, CoreReloc]] = field(default_factory=list)


def _set_lddw(insns: list[Instruction], i: int, src: int, imm: int, imm_hi: int) -> None:
    insns[i] = insns[i].replace(src=src, imm=_s32(imm), imm_hi=_s32(imm_hi))
    if i + 1 < len(insns):
        insns[i + 1] = insns[i + 1].replace(imm=_s32(imm_hi))


def _s32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v & 0x80000000 else v


def apply_data_relocs(raw: RawElf, fn: Function, rels: list[tuple[int, int]], table: MapTable,
                      text_shndx: int) -> None:
    """Patch map/global/extern lddws of ``fn`` in place; remember call/callback relocations.

    ``rels``: (local instruction index, symbol index).
    """
    for i, sym_idx in rels:
        sym = raw.symbols[sym_idx]
        ins = fn.insns[i]
        where = f"program '{fn.name}' instruction {i}"
        if ins.opcode == CALL:
            if sym.shndx == SHN_UNDEF and sym.type == STT_NOTYPE:
                # a kfunc call stays a kfunc call (no BTF id): the verifier refuses it where a
                # path reaches it and the engines refuse it, but the rest of the object loads
                fn.insns[i] = ins.replace(src=BPF_PSEUDO_KFUNC_CALL, imm=0)
                continue
            if ins.src != BPF_PSEUDO_CALL:
                raise RelocationError(f"{raw.path}: {where}: relocation '{sym.name}' on a helper call")
            fn.code_relocs[i] = sym_idx
            continue
        if ins.opcode != LDDW:
            raise RelocationError(f"{raw.path}: {where}: relocation against '{sym.name}' on opcode "
                                  f"{ins.opcode:#04x} (expected lddw or call)")
        if sym.shndx == SHN_UNDEF and sym.bind in (STB_GLOBAL, STB_WEAK):
            if sym.name in table.extern_offsets:
                _set_lddw(fn.insns, i, BPF_PSEUDO_MAP_IDX_VALUE, table.kconfig_index, table.extern_offsets[sym.name])
                continue
            raise NotSupportedError(f"extern '{sym.name}' (kernel symbols / .ksyms) used by {where}")
        if sym.shndx == SHN_UNDEF or sym.shndx >= SHN_LORESERVE:
            raise RelocationError(f"{raw.path}: {where}: relocation against '{sym.name}' in a special section "
                                  "(uninitialised global? initialise it or make it static)")
        target_sec = raw.sections[sym.shndx]
        if target_sec.is_exec:
            # a function address (callback): libbpf marks the lddw as BPF_PSEUDO_FUNC
            if sym.shndx != text_shndx:
                raise RelocationError(f"{raw.path}: {where}: function address '{sym.name}' in section "
                                      f"'{target_sec.name}'; callbacks must be in .text")
            fn.insns[i] = ins.replace(src=BPF_PSEUDO_FUNC)
            fn.code_relocs[i] = sym_idx
            continue
        key = (sym.shndx, sym.value)
        if key in table.by_symbol:
            _set_lddw(fn.insns, i, BPF_PSEUDO_MAP_IDX, table.by_symbol[key], 0)
            continue
        if sym.shndx in table.by_section:
            _set_lddw(fn.insns, i, BPF_PSEUDO_MAP_IDX_VALUE, table.by_section[sym.shndx],
                      ins.imm + sym.value)
            continue
        if target_sec.name in (".maps", "maps"):
            raise RelocationError(f"{raw.path}: {where}: no map at offset {sym.value} of {target_sec.name} "
                                  f"for symbol '{sym.name}'")
        raise RelocationError(f"{raw.path}: {where}: relocation against '{sym.name}' in section "
                              f"'{target_sec.name}', which is neither a map nor global data")


@dataclass
class Linked:
    insns: list[Instruction]
    functions: dict[int, str]
    func_info: dict[int, int]
    line_info: list[LineInfo]
    core: list[CoreReloc]


class Linker:
    """Appends the subprograms each entry program reaches (libbpf's order)."""

    def __init__(self, raw: RawElf, funcs_by_section: dict[int, list[Function]], text_shndx: int) -> None:
        self.raw = raw
        self.funcs = funcs_by_section
        self.text_shndx = text_shndx

    def _find(self, shndx: int, insn_idx: int, who: str) -> Function:
        for f in self.funcs.get(shndx, ()):
            if f.start == insn_idx:
                return f
        sec = self.raw.section_name(shndx)
        raise RelocationError(f"{self.raw.path}: {who}: no function starts at instruction {insn_idx} of '{sec}'")

    def link(self, entry: Function) -> Linked:
        out: list[Instruction] = []
        placed: dict[int, int] = {}  # id(Function) -> base
        functions: dict[int, str] = {}
        func_info: dict[int, int] = {}
        line_info: list[LineInfo] = []
        core: list[CoreReloc] = []

        def place(f: Function) -> int:
            base = len(out)
            placed[id(f)] = base
            functions[base] = f.name
            if f.func_info:
                func_info[base] = f.func_info
            out.extend(f.insns)
            for li, rec in f.line_info:
                line_info.append(LineInfo(base + li, rec.file, rec.line, rec.col, rec.source))
            for ci, rec in f.core:
                core.append(CoreReloc(base + ci, rec.type_id, rec.access, rec.kind))
            return base

        def process(f: Function, depth: int) -> None:
            if depth > 64:
                raise RelocationError(f"{self.raw.path}: call chain from '{entry.name}' is too deep")
            base = placed[id(f)]
            for i, ins in enumerate(f.insns):
                is_call = ins.opcode == CALL and ins.src == BPF_PSEUDO_CALL
                is_func = ins.opcode == LDDW and ins.src == BPF_PSEUDO_FUNC
                sym_idx = f.code_relocs.get(i)
                if not (is_call or is_func or (sym_idx is not None and ins.opcode == LDDW)):
                    continue
                who = f"program '{entry.name}' function '{f.name}' instruction {i}"
                if sym_idx is not None:
                    sym = self.raw.symbols[sym_idx]
                    if is_call:
                        if sym.shndx != self.text_shndx:
                            raise RelocationError(f"{self.raw.path}: {who}: call to '{sym.name}' in section "
                                                  f"'{self.raw.section_name(sym.shndx)}'; subprograms must be in .text")
                        if sym.value % 8:
                            raise RelocationError(f"{self.raw.path}: {who}: call target '{sym.name}' is misaligned")
                        tshndx, tidx = sym.shndx, sym.value // 8 + ins.imm + 1
                    else:
                        off = sym.value + ins.imm
                        if off % 8:
                            raise RelocationError(f"{self.raw.path}: {who}: function address '{sym.name}'+{ins.imm} "
                                                  "is misaligned")
                        tshndx, tidx = sym.shndx, off // 8
                elif is_func:
                    raise RelocationError(f"{self.raw.path}: {who}: function pointer without a relocation")
                else:
                    tshndx, tidx = f.shndx, f.start + i + ins.imm + 1
                target = self._find(tshndx, tidx, who)
                if id(target) not in placed:
                    place(target)
                    process(target, depth + 1)
                rel = placed[id(target)] - (base + i) - 1
                if is_call:
                    out[base + i] = ins.replace(imm=rel)
                else:
                    out[base + i] = ins.replace(src=BPF_PSEUDO_FUNC, imm=rel, imm_hi=0)
                    if base + i + 1 < len(out):
                        out[base + i + 1] = out[base + i + 1].replace(imm=0)

        place(entry)
        process(entry, 0)
        return Linked(out, functions, func_info, line_info, core)


def attach_btf_ext(funcs: list[Function], ext: BtfExt | None, section: str, sources: dict[str, list[str]]) -> None:
    """Distribute the section's func_info/line_info/core_relo records to its functions."""
    if ext is None:
        return
    ordered = sorted(funcs, key=lambda f: f.start)

    def owner(insn: int) -> Function | None:
        for f in ordered:
            if f.start <= insn < f.start + len(f.insns):
                return f
        return None

    for r in ext.func_info.get(section, ()):
        f = owner(r.insn_off // 8)
        if f is not None and r.insn_off // 8 == f.start:
            f.func_info = r.type_id
    for r in ext.line_info.get(section, ()):
        f = owner(r.insn_off // 8)
        if f is None:
            continue
        src = r.line
        if not src:
            lines = sources.get(r.file_name)
            if lines is None:
                lines = _read_source(r.file_name)
                sources[r.file_name] = lines
            if 0 < r.line_num <= len(lines):
                src = lines[r.line_num - 1]
        f.line_info.append((r.insn_off // 8 - f.start, LineInfo(0, r.file_name, r.line_num, r.col, src.strip())))
    for r in ext.core_relos.get(section, ()):
        f = owner(r.insn_off // 8)
        if f is not None:
            f.core.append((r.insn_off // 8 - f.start, CoreReloc(0, r.type_id, r.access, r.kind)))


def _read_source(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read().splitlines()
    except OSError:
        return []


