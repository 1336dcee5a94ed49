"""LLVM IR for ALU and ALU64 instructions (RFC 9669 section 4.1, CPU v1-v4).

Kernel semantics that LLVM does not give for free, handled here:

* ALU32 results are zero-extended into the 64-bit register.
* Shift counts are masked (``& 31`` / ``& 63``); LLVM makes over-wide shifts poison.
* Division by zero yields 0 and modulo by zero leaves the destination unchanged;
  LLVM division by zero is UB, so the divisor is replaced by 1 behind a select.
* Signed division ``INT_MIN / -1`` is UB in LLVM (it traps on x86): a divisor of
  -1 is handled as negation (``sdiv``) or 0 (``smod``) and never reaches ``sdiv``.
* Immediates are sign-extended to 64 bits for ALU64 (so ``div r0, -1`` divides
  by 0xffff_ffff_ffff_ffff, unsigned).
"""

from __future__ import annotations

from ubpf_py.errors import InvalidInstructionError
from ubpf_py.isa.instruction import Instruction
from ubpf_py.isa.opcodes import (
    BPF_ADD,
    BPF_ALU64,
    BPF_AND,
    BPF_ARSH,
    BPF_DIV,
    BPF_END,
    BPF_LSH,
    BPF_MOD,
    BPF_MOV,
    BPF_MUL,
    BPF_NEG,
    BPF_OR,
    BPF_RSH,
    BPF_SUB,
    BPF_TO_BE,
    BPF_X,
    BPF_XOR,
)
from ubpf_py.vm.jit.emit import FunctionEmitter, s32, s64

_SIMPLE = {BPF_ADD: "add", BPF_SUB: "sub", BPF_MUL: "mul", BPF_OR: "or", BPF_AND: "and",
           BPF_XOR: "xor"}
_SHIFT = {BPF_LSH: "shl", BPF_RSH: "lshr", BPF_ARSH: "ashr"}


def emit_alu(f: FunctionEmitter, ins: Instruction) -> None:
    """Translate one ALU/ALU64 instruction (not lddw) into IR."""
    is64 = ins.opcode & 0x07 == BPF_ALU64
    op = ins.opcode & 0xF0
    use_reg = bool(ins.opcode & BPF_X)
    if op == BPF_END:
        _emit_end(f, ins, is64, use_reg)
        return
    ty = "i64" if is64 else "i32"
    bits = 64 if is64 else 32
    if op == BPF_MOV:
        _emit_mov(f, ins, is64, use_reg)
        return
    if ins.off and op not in (BPF_DIV, BPF_MOD):
        raise InvalidInstructionError(f.pc, f"ALU opcode 0x{ins.opcode:02x} needs offset 0, got {ins.off}")
    a = f.get(ins.dst) if is64 else f.get32(ins.dst)
    if op == BPF_NEG:
        _store(f, ins.dst, f.op(f"sub {ty} 0, {a}"), is64)
        return
    if use_reg:
        b = f.get(ins.src) if is64 else f.get32(ins.src)
        const = None
    else:
        const = s64(ins.imm) if is64 else s32(ins.imm)
        b = str(const)
    if op in _SIMPLE:
        result = f.op(f"{_SIMPLE[op]} {ty} {a}, {b}")
    elif op in _SHIFT:
        count = str(const & bits - 1) if const is not None else f.op(f"and {ty} {b}, {bits - 1}")
        result = f.op(f"{_SHIFT[op]} {ty} {a}, {count}")
    elif op in (BPF_DIV, BPF_MOD):
        if ins.off not in (0, 1):
            raise InvalidInstructionError(f.pc, f"division offset must be 0 (unsigned) or 1 (signed), got {ins.off}")
        result = _divmod(f, ty, a, b, const, signed=ins.off == 1, mod=op == BPF_MOD)
    else:
        raise InvalidInstructionError(f.pc, f"unknown ALU opcode 0x{ins.opcode:02x}")
    _store(f, ins.dst, result, is64)


def _store(f: FunctionEmitter, reg: int, value: str, is64: bool) -> None:
    if is64:
        f.put(reg, value)
    else:
        f.put32(reg, value)


def _emit_mov(f: FunctionEmitter, ins: Instruction, is64: bool, use_reg: bool) -> None:
    if not use_reg:
        if ins.off:
            raise InvalidInstructionError(f.pc, "mov with an immediate needs offset 0")
        f.put(ins.dst, str(s64(ins.imm) if is64 else ins.imm & 0xFFFFFFFF))
        return
    if ins.off == 0:
        if is64:
            f.put(ins.dst, f.get(ins.src))
        else:
            f.put32(ins.dst, f.get32(ins.src))
        return
    allowed = (8, 16, 32) if is64 else (8, 16)
    if ins.off not in allowed:
        raise InvalidInstructionError(f.pc, f"movsx offset must be one of {allowed}, got {ins.off}")
    low = f.op(f"trunc i64 {f.get(ins.src)} to i{ins.off}")
    if is64:
        f.put(ins.dst, f.op(f"sext i{ins.off} {low} to i64"))
    else:
        f.put32(ins.dst, f.op(f"sext i{ins.off} {low} to i32"))


def _divmod(f: FunctionEmitter, ty: str, a: str, b: str, const: int | None, *, signed: bool,
            mod: bool) -> str:
    """Division/modulo with the kernel's answers for the cases LLVM leaves undefined."""
    if const is not None:
        # a constant divisor lets LLVM strength-reduce; the special cases are static
        if const == 0:
            return a if mod else "0"
        if signed and const == -1:
            return "0" if mod else f.op(f"sub {ty} 0, {a}")
        instr = ("srem" if mod else "sdiv") if signed else ("urem" if mod else "udiv")
        return f.op(f"{instr} {ty} {a}, {const}")
    zero = f.op(f"icmp eq {ty} {b}, 0")
    if not signed:
        safe = f.op(f"select i1 {zero}, {ty} 1, {ty} {b}")
        q = f.op(f"{'urem' if mod else 'udiv'} {ty} {a}, {safe}")
        return f.op(f"select i1 {zero}, {ty} {a if mod else 0}, {ty} {q}")
    minus1 = f.op(f"icmp eq {ty} {b}, -1")
    bad = f.op(f"or i1 {zero}, {minus1}")
    safe = f.op(f"select i1 {bad}, {ty} 1, {ty} {b}")
    q = f.op(f"{'srem' if mod else 'sdiv'} {ty} {a}, {safe}")
    if mod:
        q = f.op(f"select i1 {minus1}, {ty} 0, {ty} {q}")
        return f.op(f"select i1 {zero}, {ty} {a}, {ty} {q}")
    neg = f.op(f"sub {ty} 0, {a}")
    q = f.op(f"select i1 {minus1}, {ty} {neg}, {ty} {q}")
    return f.op(f"select i1 {zero}, {ty} 0, {ty} {q}")


def _emit_end(f: FunctionEmitter, ins: Instruction, is64: bool, use_reg: bool) -> None:
    """Byte swaps: ``le``/``be`` (ALU class, source bit picks the order) and ``bswap`` (ALU64)."""
    width = ins.imm
    if width not in (16, 32, 64):
        raise InvalidInstructionError(f.pc, f"byte swap width must be 16, 32 or 64, got {width}")
    if is64 and use_reg:
        raise InvalidInstructionError(f.pc, "bswap (ALU64 END) must use source bit 0")
    swap = is64 or (ins.opcode & BPF_TO_BE) == BPF_TO_BE  # host is little-endian
    value = f.get(ins.dst)
    if width != 64:
        value = f.op(f"trunc i64 {value} to i{width}")
    if swap:
        value = f.op(f"call i{width} @llvm.bswap.i{width}(i{width} {value})")
    if width != 64:
        value = f.op(f"zext i{width} {value} to i64")
    f.put(ins.dst, value)


INTRINSICS = (
    "declare i16 @llvm.bswap.i16(i16)\n"
    "declare i32 @llvm.bswap.i32(i32)\n"
    "declare i64 @llvm.bswap.i64(i64)\n"
)
