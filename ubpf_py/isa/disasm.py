"""Disassembler printing LLVM's BPF syntax, the one ``llvm-objdump -d`` shows.

BPF developers read ``r1 = *(u64 *)(r1 + 104)`` and ``if r1 > 5 goto +3`` all
day (objdump, verifier logs, bpftool), so every error and debug listing in
ubpf-py uses the same text.  Output matches clang-14's ``llvm-objdump -d
--no-show-raw-insn`` instruction text (without the ``<label>`` suffix of
jumps) for everything that version decodes; for the encodings it does not know
(v4 sdiv/smod/movsx/ldsx/bswap/gotol, jset, st with an immediate, 32-bit
atomics other than add) the text follows current LLVM.
"""

from __future__ import annotations

from ubpf_py.isa import opcodes as op
from ubpf_py.isa.instruction import Instruction
from ubpf_py.isa.validate import RULES

_ALU_SYM = {op.BPF_ADD: "+=", op.BPF_SUB: "-=", op.BPF_MUL: "*=", op.BPF_DIV: "/=", op.BPF_OR: "|=",
            op.BPF_AND: "&=", op.BPF_LSH: "<<=", op.BPF_RSH: ">>=", op.BPF_MOD: "%=", op.BPF_XOR: "^=",
            op.BPF_ARSH: "s>>="}
_JMP_SYM = {op.BPF_JEQ: "==", op.BPF_JGT: ">", op.BPF_JGE: ">=", op.BPF_JSET: "&", op.BPF_JNE: "!=",
            op.BPF_JSGT: "s>", op.BPF_JSGE: "s>=", op.BPF_JLT: "<", op.BPF_JLE: "<=", op.BPF_JSLT: "s<",
            op.BPF_JSLE: "s<="}
_SIZE_NAME = {op.BPF_B: "8", op.BPF_H: "16", op.BPF_W: "32", op.BPF_DW: "64"}
_ATOMIC_SYM = {op.ATOMIC_ADD: "+", op.ATOMIC_OR: "|", op.ATOMIC_AND: "&", op.ATOMIC_XOR: "^"}
_ATOMIC_NAME = {op.ATOMIC_ADD: "add", op.ATOMIC_OR: "or", op.ATOMIC_AND: "and", op.ATOMIC_XOR: "xor"}

UNKNOWN = "<unknown>"


def _s32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


def _s64(v: int) -> int:
    v &= 0xFFFFFFFFFFFFFFFF
    return v - (1 << 64) if v >= 1 << 63 else v


def _addr(reg: int, off: int) -> str:
    return f"r{reg} + {off}" if off >= 0 else f"r{reg} - {-off}"


def _target(off: int) -> str:
    return f"+{off}" if off >= 0 else str(off)


def _alu(ins: Instruction) -> str:
    code = ins.opcode & 0xF0
    wide = ins.opcode & 0x07 == op.BPF_ALU64
    p = "r" if wide else "w"
    d = f"{p}{ins.dst}"
    x = ins.opcode & op.BPF_X
    operand = f"{p}{ins.src}" if x else str(_s32(ins.imm))
    if code == op.BPF_NEG:
        return f"{d} = -{d}"
    if code == op.BPF_END:
        if wide:
            return f"r{ins.dst} = bswap{ins.imm} r{ins.dst}"
        kind = "be" if ins.opcode & op.BPF_TO_BE else "le"
        return f"r{ins.dst} = {kind}{ins.imm} r{ins.dst}"
    if code == op.BPF_MOV:
        if x and ins.off:
            return f"{d} = (s{ins.off}){p}{ins.src}"
        return f"{d} = {operand}"
    sym = _ALU_SYM[code]
    if code in (op.BPF_DIV, op.BPF_MOD) and ins.off == 1:
        sym = "s" + sym
    return f"{d} {sym} {operand}"


def _jmp(ins: Instruction) -> str:
    code = ins.opcode & 0xF0
    cls = ins.opcode & 0x07
    if ins.opcode == op.BPF_JMP | op.BPF_JA:
        return f"goto {_target(ins.off)}"
    if ins.opcode == op.BPF_JMP32 | op.BPF_JA:
        return f"gotol {_target(ins.imm)}"
    if ins.opcode == op.MAY_GOTO:
        return f"may_goto {_target(ins.off)}"
    if ins.opcode == op.BPF_JMP | op.BPF_CALL:
        return f"call {_s32(ins.imm)}"
    if ins.opcode == op.BPF_JMP | op.BPF_X | op.BPF_CALL:
        return f"callx r{ins.dst}"
    if ins.opcode == op.BPF_JMP | op.BPF_EXIT:
        return "exit"
    p = "w" if cls == op.BPF_JMP32 else "r"
    rhs = f"{p}{ins.src}" if ins.opcode & op.BPF_X else str(_s32(ins.imm))
    return f"if {p}{ins.dst} {_JMP_SYM[code]} {rhs} goto {_target(ins.off)}"


def _atomic(ins: Instruction) -> str:
    wide = ins.opcode & 0x18 == op.BPF_DW
    bits = "64" if wide else "32"
    p = "r" if wide else "w"
    addr = _addr(ins.dst, ins.off)
    imm = ins.imm
    if imm == op.BPF_XCHG:
        return f"r{ins.src} = xchg_64({addr}, r{ins.src})" if wide else f"w{ins.src} = xchg32_32({addr}, w{ins.src})"
    if imm == op.BPF_CMPXCHG:
        return f"r0 = cmpxchg_64({addr}, r0, r{ins.src})" if wide else f"w0 = cmpxchg32_32({addr}, w0, w{ins.src})"
    base = imm & ~op.BPF_FETCH
    if imm & op.BPF_FETCH:
        return f"{p}{ins.src} = atomic_fetch_{_ATOMIC_NAME[base]}((u{bits} *)({addr}), {p}{ins.src})"
    if not wide and base == op.ATOMIC_ADD:
        p = "r"  # clang-14 decodes the 32-bit xadd with a 64-bit register name
    return f"lock *(u{bits} *)({addr}) {_ATOMIC_SYM[base]}= {p}{ins.src}"


def _mem(ins: Instruction) -> str:
    cls = ins.opcode & 0x07
    size = _SIZE_NAME[ins.opcode & 0x18]
    mode = ins.opcode & 0xE0
    if cls == op.BPF_LDX:
        sign = "s" if mode == op.BPF_MEMSX else "u"
        return f"r{ins.dst} = *({sign}{size} *)({_addr(ins.src, ins.off)})"
    if cls == op.BPF_ST:
        return f"*(u{size} *)({_addr(ins.dst, ins.off)}) = {_s32(ins.imm)}"
    if mode == op.BPF_ATOMIC:
        return _atomic(ins)
    return f"*(u{size} *)({_addr(ins.dst, ins.off)}) = r{ins.src}"


def _ld(ins: Instruction) -> str:
    mode = ins.opcode & 0xE0
    size = _SIZE_NAME[ins.opcode & 0x18]
    if ins.opcode == op.LDDW:
        if ins.src == 0:
            return f"r{ins.dst} = {_s64(ins.imm64)} ll"
        return f"ld_pseudo r{ins.dst}, {ins.src}, {ins.imm & 0xFFFFFFFF}"
    if mode == op.BPF_ABS:
        return f"r0 = *(u{size} *)skb[{_s32(ins.imm)}]"
    return f"r0 = *(u{size} *)skb[r{ins.src}]"


_LEGACY = {op.BPF_LD | m | s for m in (op.BPF_ABS, op.BPF_IND) for s in (op.BPF_B, op.BPF_H, op.BPF_W)}


def format_instruction(ins: Instruction, index: int = 0) -> str:
    """One instruction in LLVM syntax (``index`` is accepted for callers that
    number lines; jump targets are printed relative, as objdump does)."""
    code = ins.opcode
    if code not in RULES and code not in _LEGACY:
        return UNKNOWN
    cls = code & 0x07
    try:
        if cls in (op.BPF_ALU, op.BPF_ALU64):
            return _alu(ins)
        if cls in (op.BPF_JMP, op.BPF_JMP32):
            return _jmp(ins)
        if cls == op.BPF_LD:
            return _ld(ins)
        return _mem(ins)
    except KeyError:  # e.g. an atomic with an invalid imm
        return UNKNOWN


def disassemble(insns: list[Instruction]) -> list[str]:
    """Numbered listing, one line per instruction (lddw's second slot is skipped,
    so numbers are slot indices exactly as in objdump and verifier logs)."""
    out: list[str] = []
    i = 0
    while i < len(insns):
        ins = insns[i]
        out.append(f"{i:>6}: {format_instruction(ins, i)}")
        i += 2 if ins.opcode == op.LDDW else 1
    return out
