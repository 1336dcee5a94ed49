"""The verifier log: kernel-style lines plus the things the kernel leaves out.

A rejection names the instruction (index and LLVM-syntax text), the C source
line from BTF line_info, the register states on the failing path, the kernel's
own message (so it can be searched for), and a sentence saying what to do.
"""

from __future__ import annotations

from ubpf_py.isa.instruction import Instruction
from ubpf_py.obj.spec import ProgramSpec

try:
    from ubpf_py.isa.disasm import format_instruction as _fmt
except ImportError:  # pragma: no cover - disassembler written in parallel
    _fmt = None


def format_insn(ins: Instruction, index: int = 0) -> str:
    if _fmt is not None:
        try:
            return _fmt(ins, index)
        except Exception:
            pass
    return (f"op={ins.opcode:#04x} dst=r{ins.dst} src=r{ins.src} off={ins.off} imm={ins.imm}")


def source_line(prog: ProgramSpec, insn: int) -> str:
    """``file:line: source`` for the instruction, from BTF line_info (empty if none)."""
    best = None
    for li in prog.line_info:
        if li.insn_index <= insn and (best is None or li.insn_index >= best.insn_index):
            best = li
    if best is None:
        return ""
    src = best.source.strip()
    where = f"{best.file.rsplit('/', 1)[-1]}:{best.line}"
    return f"{where}: {src}" if src else where


def function_of(prog: ProgramSpec, insn: int) -> str:
    name, start = prog.name, -1
    for s, n in prog.functions.items():
        if start < s <= insn:
            name, start = n, s
    return name


def trail_lines(prog: ProgramSpec, trail: tuple | None, limit: int = 40) -> list[str]:
    """The last instructions the failing path executed, oldest first, with source lines."""
    pcs: list[int] = []
    node = trail
    while node is not None and len(pcs) < limit:
        pcs.append(node[0])
        node = node[1]
    pcs.reverse()
    out = []
    last_src = None
    for pc in pcs:
        src = source_line(prog, pc)
        if src and src != last_src:
            out.append(f"; {src}")
            last_src = src
        out.append(f"{pc}: {format_insn(prog.instructions[pc], pc)}")
    return out
