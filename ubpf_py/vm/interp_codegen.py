"""Translate a BPF program into Python source, one function per basic block.

Why: dispatching one Python call per BPF instruction tops out around 4 million
instructions/s; a block function that runs its straight-line instructions as
plain Python statements and returns the next block's index is several times
faster and still trivially maps back to instruction indices (every statement
that can fault passes its pc as a constant).

The generated functions take the register file ``R`` (a list of 11 unsigned
64-bit ints) and return the pc of the next block, or -1 for "this frame
exits".  Names they use (LD8, ST4, CALL, ...) are bound by the interpreter in
the namespace it compiles the source in; see ``Interpreter._namespace``.
"""

from __future__ import annotations

import re

from ubpf_py.isa import opcodes as op
from ubpf_py.isa.instruction import Instruction

M64 = 0xFFFFFFFFFFFFFFFF
M32 = 0xFFFFFFFF
TAIL_CALL_HELPER = 12

_SIZE = {op.BPF_B: 1, op.BPF_H: 2, op.BPF_W: 4, op.BPF_DW: 8}
_SIZE_MASK = {1: 0xFF, 2: 0xFFFF, 4: M32, 8: M64}
_CMP = {op.BPF_JEQ: "==", op.BPF_JNE: "!=", op.BPF_JGT: ">", op.BPF_JGE: ">=", op.BPF_JLT: "<",
        op.BPF_JLE: "<=", op.BPF_JSGT: ">", op.BPF_JSGE: ">=", op.BPF_JSLT: "<", op.BPF_JSLE: "<="}
_SIGNED_JMP = {op.BPF_JSGT, op.BPF_JSGE, op.BPF_JSLT, op.BPF_JSLE}


def _mem_addr(reg: int, off: int) -> str:
    if off == 0:
        return f"R[{reg}]"
    return f"R[{reg}] + {off}" if off > 0 else f"R[{reg}] - {-off}"


def _alu64(ins: Instruction) -> str:
    code = ins.opcode & 0xF0
    d = ins.dst
    x = ins.opcode & op.BPF_X
    k = ins.imm & M64
    b = f"R[{ins.src}]" if x else str(k)
    rd = f"R[{d}]"
    if code == op.BPF_ADD:
        return f"{rd} = ({rd} + {b}) & M64"
    if code == op.BPF_SUB:
        return f"{rd} = ({rd} - {b}) & M64"
    if code == op.BPF_MUL:
        return f"{rd} = ({rd} * {b}) & M64"
    if code == op.BPF_DIV:
        if ins.off == 1:
            return f"{rd} = SDIV64({rd}, {b})"
        if x:
            return f"{rd} = ({rd} // {b}) if {b} else 0"
        return f"{rd} = {rd} // {b}" if k else f"{rd} = 0"
    if code == op.BPF_MOD:
        if ins.off == 1:
            return f"{rd} = SMOD64({rd}, {b})"
        if x:
            return f"{rd} = ({rd} % {b}) if {b} else {rd}"
        return f"{rd} = {rd} % {b}" if k else "pass"
    if code == op.BPF_OR:
        return f"{rd} |= {b}"
    if code == op.BPF_AND:
        return f"{rd} &= {b}"
    if code == op.BPF_XOR:
        return f"{rd} ^= {b}"
    if code == op.BPF_LSH:
        sh = f"({b} & 63)" if x else str(k & 63)
        return f"{rd} = ({rd} << {sh}) & M64"
    if code == op.BPF_RSH:
        sh = f"({b} & 63)" if x else str(k & 63)
        return f"{rd} >>= {sh}"
    if code == op.BPF_ARSH:
        sh = f"({b} & 63)" if x else str(k & 63)
        return f"{rd} = ((({rd} ^ S64) - S64) >> {sh}) & M64"
    if code == op.BPF_NEG:
        return f"{rd} = -{rd} & M64"
    if code == op.BPF_MOV:
        if not x:
            return f"{rd} = {k}"
        if ins.off == 0:
            return f"{rd} = {b}"
        bits = ins.off
        sign = 1 << (bits - 1)
        return f"{rd} = ((({b} & {(1 << bits) - 1}) ^ {sign}) - {sign}) & M64"
    if code == op.BPF_END:  # bswap (ALU64 class): unconditional swap
        return _swap(rd, ins.imm)
    raise AssertionError(f"unhandled ALU64 opcode 0x{ins.opcode:02x}")


def _swap(rd: str, width: int) -> str:
    if width == 16:
        return f"{rd} = (({rd} & 0xFF) << 8) | (({rd} >> 8) & 0xFF)"
    if width == 32:
        return f"{rd} = BSWAP32({rd})"
    return f"{rd} = BSWAP64({rd})"


def _alu32(ins: Instruction) -> str:
    code = ins.opcode & 0xF0
    d = ins.dst
    x = ins.opcode & op.BPF_X
    k = ins.imm & M32
    b = f"(R[{ins.src}] & M32)" if x else str(k)
    rd = f"R[{d}]"
    if code == op.BPF_ADD:
        return f"{rd} = ({rd} + {b}) & M32"
    if code == op.BPF_SUB:
        return f"{rd} = ({rd} - {b}) & M32"
    if code == op.BPF_MUL:
        return f"{rd} = ({rd} * {b}) & M32"
    if code == op.BPF_DIV:
        if ins.off == 1:
            return f"{rd} = SDIV32({rd}, {b})"
        if x:
            return f"{rd} = (({rd} & M32) // {b}) if {b} else 0"
        return f"{rd} = ({rd} & M32) // {k}" if k else f"{rd} = 0"
    if code == op.BPF_MOD:
        if ins.off == 1:
            return f"{rd} = SMOD32({rd}, {b})"
        if x:
            return f"{rd} = (({rd} & M32) % {b}) if {b} else ({rd} & M32)"
        return f"{rd} = ({rd} & M32) % {k}" if k else f"{rd} &= M32"
    if code == op.BPF_OR:
        return f"{rd} = ({rd} | {b}) & M32"
    if code == op.BPF_AND:
        return f"{rd} = {rd} & {b}"
    if code == op.BPF_XOR:
        return f"{rd} = ({rd} ^ {b}) & M32"
    if code == op.BPF_LSH:
        sh = f"({b} & 31)" if x else str(k & 31)
        return f"{rd} = ({rd} << {sh}) & M32"
    if code == op.BPF_RSH:
        sh = f"({b} & 31)" if x else str(k & 31)
        return f"{rd} = ({rd} & M32) >> {sh}"
    if code == op.BPF_ARSH:
        sh = f"({b} & 31)" if x else str(k & 31)
        return f"{rd} = (((({rd} & M32) ^ S32) - S32) >> {sh}) & M32"
    if code == op.BPF_NEG:
        return f"{rd} = -{rd} & M32"
    if code == op.BPF_MOV:
        if not x:
            return f"{rd} = {k}"
        if ins.off == 0:
            return f"{rd} = R[{ins.src}] & M32"
        bits = ins.off
        sign = 1 << (bits - 1)
        return f"{rd} = (((R[{ins.src}] & {(1 << bits) - 1}) ^ {sign}) - {sign}) & M32"
    if code == op.BPF_END:
        if ins.opcode & op.BPF_TO_BE:
            return _swap(rd, ins.imm)
        if ins.imm == 64:
            return "pass"
        return f"{rd} &= {_SIZE_MASK[ins.imm // 8]}"
    raise AssertionError(f"unhandled ALU opcode 0x{ins.opcode:02x}")


_SHIFT = {1: 0, 2: 1, 4: 2, 8: 3}


def _frame_slot(base: int, off: int, size: int, stack: tuple[int, int] | None) -> str | None:
    """``r10 + off`` inside the current 512-byte frame needs no check at all: r10
    is read-only and always the top of a frame inside the stack buffer.  Such an
    access becomes an item of a typed view of the stack (``SV8[i]`` for an
    aligned u64), the cheapest memory access CPython offers."""
    if stack is None or base != 10 or not -op.STACK_SIZE <= off <= -size or off % size:
        return None
    delta = stack[0] - off
    index = f"R[10] - {delta}" if size == 1 else f"(R[10] - {delta}) >> {_SHIFT[size]}"
    return f"SV{size}[{index}]"


def _mem(ins: Instruction, pc: int, stack: tuple[int, int] | None) -> str:
    """Loads/stores; with ``stack`` = (start, end) the stack case is inlined
    (bounds test + struct call on the stack's memoryview) and only other
    addresses go through the checked LD/ST functions."""
    cls = ins.opcode & 0x07
    size = _SIZE[ins.opcode & 0x18]
    mode = ins.opcode & 0xE0
    if cls == op.BPF_LDX:
        addr = _mem_addr(ins.src, ins.off)
        frame = _frame_slot(ins.src, ins.off, size, stack)
        if frame is not None:
            load = frame
        elif stack is None:
            load = f"LD{size}({addr}, {pc})"
        else:
            s0, s1 = stack[0], stack[1] - size
            load = f"(UN{size}(SV, _a - {s0})[0] if {s0} <= (_a := {addr}) <= {s1} else LD{size}(_a, {pc}))"
        if mode == op.BPF_MEMSX:
            sign = 1 << (size * 8 - 1)
            return f"R[{ins.dst}] = (({load} ^ {sign}) - {sign}) & M64"
        return f"R[{ins.dst}] = {load}"
    addr = _mem_addr(ins.dst, ins.off)
    if cls == op.BPF_ST or mode == op.BPF_MEM:
        if cls == op.BPF_ST:
            value = str(ins.imm & _SIZE_MASK[size])
        else:
            value = f"R[{ins.src}]" if size == 8 else f"R[{ins.src}] & {_SIZE_MASK[size]}"
        frame = _frame_slot(ins.dst, ins.off, size, stack)
        if frame is not None:
            return f"{frame} = {value}"
        if stack is None:
            return f"ST{size}({addr}, {value}, {pc})"
        s0, s1 = stack[0], stack[1] - size
        return (f"if {s0} <= (_a := {addr}) <= {s1}: PK{size}(SV, _a - {s0}, {value})\n"
                f"else: ST{size}(_a, {value}, {pc})")
    # atomics
    imm = ins.imm
    if imm == op.BPF_CMPXCHG:
        return f"R[0] = CMPXCHG({addr}, {size}, R[0], R[{ins.src}], {pc})"
    call = f"ATOMIC({addr}, {size}, {imm}, R[{ins.src}], {pc})"
    if imm & op.BPF_FETCH:
        return f"R[{ins.src}] = {call}"
    return call


def _cond(ins: Instruction) -> str:
    code = ins.opcode & 0xF0
    is32 = ins.opcode & 0x07 == op.BPF_JMP32
    x = ins.opcode & op.BPF_X
    if is32:
        a = f"(R[{ins.dst}] & M32)"
        b = f"(R[{ins.src}] & M32)" if x else str(ins.imm & M32)
        bias, bias_name = 1 << 31, "S32"
    else:
        a = f"R[{ins.dst}]"
        b = f"R[{ins.src}]" if x else str(ins.imm & M64)
        bias, bias_name = 1 << 63, "S64"
    if code == op.BPF_JSET:
        return f"{a} & {b}"
    if code in _SIGNED_JMP:
        sb = f"({b} ^ {bias_name})" if x else str((ins.imm & (M32 if is32 else M64)) ^ bias)
        return f"({a} ^ {bias_name}) {_CMP[code]} {sb}"
    return f"{a} {_CMP[code]} {b}"


def is_block_end(ins: Instruction) -> bool:
    """Instructions after which control does not simply fall through."""
    cls = ins.opcode & 0x07
    if cls not in (op.BPF_JMP, op.BPF_JMP32):
        return False
    code = ins.opcode & 0xF0
    if code == op.BPF_CALL:
        if ins.opcode & op.BPF_X:
            return True
        return ins.src == op.BPF_PSEUDO_CALL or (ins.src == op.BPF_CALL_HELPER and ins.imm == TAIL_CALL_HELPER)
    return True


def leaders(insns: list[Instruction]) -> list[int]:
    """Sorted pcs where a basic block starts (entry, targets, after terminators)."""
    n = len(insns)
    out = {0}
    i = 0
    while i < n:
        ins = insns[i]
        if ins.opcode == op.LDDW:
            if ins.src == op.BPF_PSEUDO_FUNC:
                out.add(i + 1 + ins.imm)
            i += 2
            continue
        cls = ins.opcode & 0x07
        if cls in (op.BPF_JMP, op.BPF_JMP32):
            code = ins.opcode & 0xF0
            if ins.opcode == op.BPF_JMP32 | op.BPF_JA:
                out.add(i + 1 + ins.imm)
            elif code == op.BPF_CALL:
                if ins.src == op.BPF_PSEUDO_CALL and not ins.opcode & op.BPF_X:
                    out.add(i + 1 + ins.imm)
            elif code != op.BPF_EXIT:
                out.add(i + 1 + ins.off)
            if is_block_end(ins) and i + 1 < n:
                out.add(i + 1)
        i += 1
    return sorted(out)


def _terminator(ins: Instruction, pc: int) -> str:
    code = ins.opcode & 0xF0
    nxt = pc + 1
    if code == op.BPF_EXIT:
        return "return -1"
    if code == op.BPF_CALL:
        if ins.opcode & op.BPF_X:
            return f"return CALLX(R, R[{ins.dst}], {nxt}, {pc})"
        if ins.src == op.BPF_PSEUDO_CALL:
            return f"return CALL(R, {nxt}, {nxt + ins.imm}, {pc})"
        return f"return TAIL(R, {pc})"
    if ins.opcode == op.BPF_JMP32 | op.BPF_JA:
        return f"return {nxt + ins.imm}"
    if code == op.BPF_JA:
        return f"return {nxt + ins.off}"
    if ins.opcode == op.MAY_GOTO:
        return f"return MAYGOTO(R, {nxt + ins.off}, {nxt})"
    return f"return {nxt + ins.off} if {_cond(ins)} else {nxt}"


def statement(ins: Instruction, pc: int, func_ptr_base: int, stack: tuple[int, int] | None = None) -> str:
    """Python statement for a non-terminating instruction."""
    cls = ins.opcode & 0x07
    if cls == op.BPF_ALU64:
        return _alu64(ins)
    if cls == op.BPF_ALU:
        return _alu32(ins)
    if ins.opcode == op.LDDW:
        if ins.src == op.BPF_PSEUDO_FUNC:
            return f"R[{ins.dst}] = {func_ptr_base + pc + 1 + ins.imm}"
        return f"R[{ins.dst}] = {ins.imm64}"
    if cls in (op.BPF_LDX, op.BPF_ST, op.BPF_STX):
        return _mem(ins, pc, stack)
    if cls == op.BPF_JMP and ins.opcode & 0xF0 == op.BPF_CALL:  # helper call
        return f"R[0] = HELPER({ins.imm}, R[1], R[2], R[3], R[4], R[5], {pc})"
    raise AssertionError(f"unhandled opcode 0x{ins.opcode:02x} at {pc}")


_REG_REF = re.compile(r"R\[(\d+)\]")
_REG_WRITE = re.compile(r"^R\[(\d+)\] \S*=")


def _cache_registers(body: list[str], term: str) -> list[str]:
    """Rewrite a block to keep the registers it uses in Python locals.

    ``R[3]`` becomes ``r3``: locals are loaded once at block entry and the
    registers the block writes are stored back before its terminator, which
    is the only place code outside the block (calls, tail calls, the frame
    logic) looks at ``R``.  Helpers get register values as arguments, so a
    mid-block helper call needs no synchronisation.  Only worth it for blocks
    that touch their registers often (measured: ~8% on long blocks, a loss on
    short ones, where list subscripts are already cheap in CPython 3.11).
    """
    refs = [int(m) for line in [*body, term] for m in _REG_REF.findall(line)]
    used = sorted(set(refs))
    written = sorted({int(m) for line in body for m in _REG_WRITE.findall(line.strip())})
    if len(refs) < 3 * (len(used) + len(written)):
        return [*body, term]  # short blocks: loading/storing the locals costs more than it saves
    out: list[str] = []
    if used:
        out.append(", ".join(f"r{r}" for r in used) + ", = " + ", ".join(f"R[{r}]" for r in used) + ",")
    out.extend(_REG_REF.sub(r"r\1", line) for line in body)
    if written:
        out.append(", ".join(f"R[{r}]" for r in written) + ", = " + ", ".join(f"r{r}" for r in written) + ",")
    out.append(_REG_REF.sub(r"r\1", term))
    return out


def generate(insns: list[Instruction], func_ptr_base: int,
             stack: tuple[int, int] | None = None) -> tuple[str, list[int], dict[int, int]]:
    """Python source defining ``B<pc>(R)`` for every block, the leader list and
    the number of instructions in each block (for the instruction budget).

    ``stack`` = (start, end) of the stack region enables the inlined stack
    fast path (names UN<size>, PK<size> and SV must then be bound)."""
    starts = leaders(insns)
    n = len(insns)
    lines: list[str] = []
    counts: dict[int, int] = {}
    for bi, start in enumerate(starts):
        end = starts[bi + 1] if bi + 1 < len(starts) else n
        pc = start
        count = 0
        body: list[str] = []
        term = ""
        while pc < end:
            ins = insns[pc]
            count += 1
            body.append(f"# {pc}")
            if is_block_end(ins):
                term = _terminator(ins, pc)
                break
            body.extend(statement(ins, pc, func_ptr_base, stack).split("\n"))
            pc += 2 if ins.opcode == op.LDDW else 1
        if not term:
            term = f"return {end}" if end < n else f"return FALLOFF({pc - 1})"
        lines.append(f"def B{start}(R):")
        lines.extend("    " + line for line in _cache_registers(body, term))
        counts[start] = count
    source = "\n".join(lines) + "\n"
    # constants as literals: LOAD_CONST is a little cheaper than a global lookup
    for name, value in (("M64", M64), ("M32", M32), ("S64", 1 << 63), ("S32", 1 << 31)):
        source = re.sub(rf"\b{name}\b", str(value), source)
    return source, starts, counts
