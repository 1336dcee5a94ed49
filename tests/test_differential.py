"""Differential test: the interpreter (reference) and the JIT agree on random programs.

``random_program`` builds VALID programs by construction: every register holds
data before it is read, pointers live in reserved registers that ALU code never
writes, branches only jump forward to segment boundaries, loops are
self-contained count-down segments, memory accesses stay inside the stack frame
or the test buffer.  The mix covers ALU32/ALU64 of every kind (including
sdiv/smod with 0 and -1 divisors, movsx, bswap/le/be, over-wide shifts), JMP and
JMP32 with every condition, loads/stores/sign-extending loads of every size on
the stack (r10 and a computed stack pointer) and on a buffer, every atomic in
32 and 64 bits, and BPF-to-BPF calls into a subprogram with its own frame.

Both engines must return the same r0 and leave the buffer and the stack frame
byte-identical.  10,000 programs with a fixed seed (half in checked, half in
unchecked JIT mode) plus a hypothesis-driven run; the JIT side is compiled in
batches (many programs per LLVM module) to keep the test fast.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
from engines import make_env

from ubpf_py.errors import VMFault
from ubpf_py.isa import opcodes as op
from ubpf_py.isa.instruction import Instruction
from ubpf_py.vm.interpreter import Interpreter
from ubpf_py.vm.jit import CODE_CACHE, JitProgram

#: registers that hold data (freely read and written by random ALU code)
DATA_REGS = (0, 1, 2, 3, 4, 5, 7)
LOOP_REG = 6      # count-down register of loops
STACK_PTR = 8     # r10 - 64, a computed stack pointer
BUF_PTR = 9       # the test buffer
BUF_SIZE = 64

ALU_OPS = (op.BPF_ADD, op.BPF_SUB, op.BPF_MUL, op.BPF_DIV, op.BPF_OR, op.BPF_AND, op.BPF_LSH,
           op.BPF_RSH, op.BPF_MOD, op.BPF_XOR, op.BPF_MOV, op.BPF_ARSH)
JMP_OPS = (op.BPF_JEQ, op.BPF_JGT, op.BPF_JGE, op.BPF_JSET, op.BPF_JNE, op.BPF_JSGT, op.BPF_JSGE,
           op.BPF_JLT, op.BPF_JLE, op.BPF_JSLT, op.BPF_JSLE)
ATOMICS = (op.ATOMIC_ADD, op.ATOMIC_OR, op.ATOMIC_AND, op.ATOMIC_XOR, op.ATOMIC_ADD | op.BPF_FETCH,
           op.ATOMIC_OR | op.BPF_FETCH, op.ATOMIC_AND | op.BPF_FETCH, op.ATOMIC_XOR | op.BPF_FETCH,
           op.BPF_XCHG, op.BPF_CMPXCHG)
SIZES = (op.BPF_B, op.BPF_H, op.BPF_W, op.BPF_DW)
EDGE_IMMS = (0, 1, -1, 2, 7, 31, 32, 63, 64, 0x7FFFFFFF, -0x80000000, 0xFFFF, -0x8000, 0x80)


def _imm(rng: random.Random) -> int:
    roll = rng.random()
    if roll < 0.4:
        return rng.choice(EDGE_IMMS)
    if roll < 0.7:
        return rng.randint(-300, 300)
    return rng.randint(-0x80000000, 0x7FFFFFFF)


def _imm64(rng: random.Random) -> int:
    return rng.choice((0, 1, (1 << 64) - 1, 1 << 63, (1 << 63) - 1, 0xFFFFFFFF, 1 << 32,
                       rng.getrandbits(64), rng.getrandbits(64), rng.getrandbits(33)))


def _lddw(dst: int, value: int) -> list[Instruction]:
    lo, hi = value & 0xFFFFFFFF, value >> 32
    lo_s = lo - (1 << 32) if lo >> 31 else lo
    hi_s = hi - (1 << 32) if hi >> 31 else hi
    return [Instruction(op.LDDW, dst, 0, 0, lo_s, hi_s), Instruction(0, 0, 0, 0, hi_s)]


def random_alu(rng: random.Random, dsts: tuple[int, ...] = DATA_REGS,
               srcs: tuple[int, ...] = (*DATA_REGS, LOOP_REG), kernel: bool = False) -> Instruction:
    """One random ALU/ALU64 instruction writing a data register.

    ``kernel=True`` avoids what the kernel verifier rejects statically (division by
    an immediate 0, shift immediates outside the operand width)."""
    cls = rng.choice((op.BPF_ALU, op.BPF_ALU64))
    dst = rng.choice(dsts)
    roll = rng.random()
    if roll < 0.06:
        return Instruction(cls | op.BPF_NEG, dst)
    if roll < 0.14:
        width = rng.choice((16, 32, 64))
        if cls == op.BPF_ALU64:
            return Instruction(op.BPF_ALU64 | op.BPF_END, dst, 0, 0, width)
        return Instruction(op.BPF_ALU | op.BPF_END | rng.choice((op.BPF_TO_LE, op.BPF_TO_BE)), dst, 0, 0, width)
    code = rng.choice(ALU_OPS)
    if rng.random() < 0.5:
        off = rng.choice((0, 1)) if code in (op.BPF_DIV, op.BPF_MOD) else 0
        imm = _imm(rng)
        if kernel and code in (op.BPF_DIV, op.BPF_MOD) and imm == 0:
            imm = 3
        if kernel and code in (op.BPF_LSH, op.BPF_RSH, op.BPF_ARSH):
            imm &= 31 if cls == op.BPF_ALU else 63
        return Instruction(cls | op.BPF_K | code, dst, 0, off, imm)
    off = 0
    if code in (op.BPF_DIV, op.BPF_MOD):
        off = rng.choice((0, 1))
    elif code == op.BPF_MOV and rng.random() < 0.5:
        off = rng.choice((8, 16, 32) if cls == op.BPF_ALU64 else (8, 16))
    return Instruction(cls | op.BPF_X | code, dst, rng.choice(srcs), off)


def _mem_target(rng: random.Random, size: int, atomic: bool, stack_ptr: int | None,
                buf_ptr: int) -> tuple[int, int]:
    """(base register, offset) of an access inside the frame or the buffer."""
    where = rng.random()
    align = size if atomic else 1
    if where < 0.4:
        base, lo, hi = 10, -64, -size            # [r10-64, r10)
    elif where < 0.6 and stack_ptr is not None:
        base, lo, hi = stack_ptr, 0, 64 - size   # [r10-64, r10) through r8
    else:
        base, lo, hi = buf_ptr, 0, BUF_SIZE - size
    off = rng.randint(lo, hi)
    return base, off - off % align   # lo and hi are multiples of align, so this stays inside


def random_mem(rng: random.Random, data: tuple[int, ...] = DATA_REGS, stack_ptr: int | None = STACK_PTR,
               buf_ptr: int = BUF_PTR) -> Instruction:
    """One random load, store or atomic (values in ``data`` registers)."""
    roll = rng.random()
    if roll < 0.15:
        size = rng.choice((op.BPF_W, op.BPF_DW))
        base, off = _mem_target(rng, op.SIZE_BYTES[size], True, stack_ptr, buf_ptr)
        return Instruction(op.BPF_STX | op.BPF_ATOMIC | size, base, rng.choice(data), off,
                           rng.choice(ATOMICS))
    size = rng.choice(SIZES)
    base, off = _mem_target(rng, op.SIZE_BYTES[size], False, stack_ptr, buf_ptr)
    if roll < 0.5:
        mode = op.BPF_MEMSX if size != op.BPF_DW and rng.random() < 0.3 else op.BPF_MEM
        return Instruction(op.BPF_LDX | mode | size, rng.choice(data), base, off)
    if roll < 0.7:
        return Instruction(op.BPF_ST | op.BPF_MEM | size, base, 0, off, _imm(rng))
    return Instruction(op.BPF_STX | op.BPF_MEM | size, base, rng.choice(data), off)


#: registers a subprogram computes with (r1 carries the buffer pointer into it)
SUB_DATA = (0, 2, 3, 4, 5)


def random_subprogram(rng: random.Random, length: int) -> list[Instruction]:
    """A straight-line BPF function: r1 = buffer, own stack frame, returns r0."""
    out = [Instruction(op.BPF_ALU64 | op.BPF_MOV, r, 0, 0, _imm(rng)) for r in SUB_DATA]
    for _ in range(length):
        if rng.random() < 0.4:
            out.append(random_mem(rng, SUB_DATA, None, 1))
        else:
            out.append(random_alu(rng, SUB_DATA, SUB_DATA))
    out.append(Instruction(op.BPF_JMP | op.BPF_EXIT))
    return out


def random_cond_jump(rng: random.Random, off: int, regs: tuple[int, ...] = (*DATA_REGS, LOOP_REG)) -> Instruction:
    cls = rng.choice((op.BPF_JMP, op.BPF_JMP32))
    code = rng.choice(JMP_OPS)
    if rng.random() < 0.5:
        return Instruction(cls | op.BPF_K | code, rng.choice(regs), 0, off, _imm(rng))
    return Instruction(cls | op.BPF_X | code, rng.choice(regs), rng.choice(regs), off)


@dataclass
class _Jump:
    index: int
    segment: int   # jump to the start of this segment


def random_program(rng: random.Random, segments: int = 6, seg_len: int = 5, memory: bool = True,
                   kernel: bool = False) -> list[Instruction]:
    """A random valid program: init, ``segments`` straight-line/loop segments, exit.

    Jumps go forward to segment starts; ``memory=False`` gives ALU/JMP only
    programs; ``kernel=True`` also avoids what the kernel verifier refuses
    (see ``random_alu``; no ``ja``, which would leave unreachable instructions).
    """
    out: list[Instruction] = []
    for r in DATA_REGS:
        if r == 1 and memory:
            continue
        out += _lddw(r, _imm64(rng)) if rng.random() < 0.5 else [Instruction(op.BPF_ALU64 | op.BPF_MOV, r, 0, 0, _imm(rng))]
    if memory:
        out.append(Instruction(op.BPF_ALU64 | op.BPF_X | op.BPF_MOV, BUF_PTR, 1))      # r9 = r1
        out.append(Instruction(op.BPF_ALU64 | op.BPF_X | op.BPF_MOV, STACK_PTR, 10))   # r8 = r10
        out.append(Instruction(op.BPF_ALU64 | op.BPF_ADD, STACK_PTR, 0, 0, -64))       # r8 -= 64
        out.append(Instruction(op.BPF_ALU64 | op.BPF_X | op.BPF_MOV, 1, 0))            # r1 = r0
    out.append(Instruction(op.BPF_ALU64 | op.BPF_MOV, LOOP_REG, 0, 0, rng.randint(0, 9)))
    starts: list[int] = []
    jumps: list[_Jump] = []
    calls: list[int] = []
    body = random_mem if memory else None
    for s in range(segments):
        starts.append(len(out))
        if rng.random() < 0.2:   # a bounded loop: r6 = n; body; r6 -= 1; if r6 != 0 goto body
            out.append(Instruction(op.BPF_ALU64 | op.BPF_MOV, LOOP_REG, 0, 0, rng.randint(1, 6)))
            top = len(out)
            for _ in range(rng.randint(1, seg_len)):
                out.append(body(rng) if body and rng.random() < 0.4 else random_alu(rng, kernel=kernel))
            out.append(Instruction(rng.choice((op.BPF_ALU64, op.BPF_ALU)) | op.BPF_ADD, LOOP_REG, 0, 0, -1))
            back = top - (len(out) + 1)
            out.append(Instruction(rng.choice((op.BPF_JMP, op.BPF_JMP32)) | op.BPF_JNE, LOOP_REG, 0, back, 0))
            continue
        if memory and not kernel and rng.random() < 0.15:   # r0 = sub(buffer); r1..r5 are clobbered
            out.append(Instruction(op.BPF_ALU64 | op.BPF_X | op.BPF_MOV, 1, BUF_PTR))
            calls.append(len(out))
            out.append(Instruction(op.BPF_JMP | op.BPF_CALL, 0, op.BPF_PSEUDO_CALL))
            out += [Instruction(op.BPF_ALU64 | op.BPF_MOV, r, 0, 0, _imm(rng)) for r in (1, 2, 3, 4, 5)]
        for _ in range(rng.randint(1, seg_len)):
            roll = rng.random()
            if roll < 0.2:
                jumps.append(_Jump(len(out), rng.randint(s + 1, segments)))
                if rng.random() < 0.15 and not kernel:
                    out.append(Instruction(rng.choice((op.BPF_JMP, op.BPF_JMP32)) | op.BPF_JA))
                else:
                    out.append(random_cond_jump(rng, 0))
            elif body and roll < 0.55:
                out.append(body(rng))
            else:
                out.append(random_alu(rng, kernel=kernel))
    starts.append(len(out))
    # every path ends here: fold all data registers into r0 so any difference shows
    for k, r in enumerate(DATA_REGS[1:]):
        out.append(Instruction(op.BPF_ALU64 | op.BPF_X | (op.BPF_XOR if k % 2 else op.BPF_ADD), 0, r))
    out.append(Instruction(op.BPF_JMP | op.BPF_EXIT))
    for j in jumps:
        ins = out[j.index]
        delta = starts[j.segment] - j.index - 1
        if ins.opcode == op.BPF_JMP32 | op.BPF_JA:
            out[j.index] = ins.replace(imm=delta)
        else:
            out[j.index] = ins.replace(off=delta)
    if calls:
        sub = len(out)
        out += random_subprogram(rng, rng.randint(2, 2 * seg_len))
        for c in calls:
            out[c] = out[c].replace(imm=sub - c - 1)
    return out


# --- running both engines ---------------------------------------------------------

def _outcome(run, te) -> tuple:
    try:
        r0 = run(te.mem_addr, te.mem_len)
        result: tuple = ("ok", r0)
    except VMFault as exc:
        result = ("fault", exc.pc)
    return result


def compare(insns: list[Instruction], seed_mem: bytes, checked: bool, opt_level: str) -> None:
    """Run ``insns`` on both engines from identical memory; assert identical results."""
    te_i = make_env(seed_mem)
    interp = Interpreter(insns, te_i.env)
    te_j = make_env(seed_mem)
    jit = JitProgram(insns, te_j.env, check_memory=checked, opt_level=opt_level)
    try:
        a = _outcome(interp.run, te_i)
        b = _outcome(jit.run, te_j)
        assert a == b, f"r0/fault differ: interpreter {a}, jit {b}"
        assert bytes(te_i.mem.view) == bytes(te_j.mem.view), "buffer contents differ"
        assert bytes(interp.stack_buffer.view[-512:]) == bytes(jit.stack.view[-512:]), "stack differs"
    finally:
        interp.close()
        jit.close()


def _programs(seed: int, count: int) -> list[tuple[list[Instruction], bytes]]:
    rng = random.Random(seed)
    return [(random_program(rng, segments=rng.randint(2, 5), seg_len=4), rng.randbytes(BUF_SIZE))
            for _ in range(count)]


CHUNKS = 20
PER_CHUNK = 500    # 20 x 500 = 10,000 programs


@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_random_programs_agree(chunk: int) -> None:
    checked = chunk % 2 == 0
    level = "O2" if chunk >= CHUNKS - 2 else "fast"   # 1,000 programs at O2, the rest at "fast"
    programs = _programs(0xB9F + chunk, PER_CHUNK)
    CODE_CACHE.precompile([p for p, _ in programs], checked, level)
    for i, (insns, mem) in enumerate(programs):
        try:
            compare(insns, mem, checked, level)
        except AssertionError as exc:
            raise AssertionError(f"chunk {chunk} program {i}: {exc}") from None


def test_generator_makes_valid_varied_programs() -> None:
    """The generator really produces what the differential test claims to cover."""
    from ubpf_py.isa.validate import validate

    seen: set[int] = set()
    for insns, _ in _programs(1, 400):
        validate(insns)
        seen.update(i.opcode for i in insns)
    for code in ALU_OPS:
        assert op.BPF_ALU | op.BPF_X | code in seen and op.BPF_ALU64 | op.BPF_K | code in seen
    for code in JMP_OPS:
        assert op.BPF_JMP32 | op.BPF_X | code in seen and op.BPF_JMP | op.BPF_K | code in seen
    for size in SIZES:
        assert op.BPF_LDX | op.BPF_MEM | size in seen and op.BPF_STX | op.BPF_MEM | size in seen
    assert op.BPF_STX | op.BPF_ATOMIC | op.BPF_W in seen and op.BPF_LDX | op.BPF_MEMSX | op.BPF_B in seen
    assert op.BPF_JMP | op.BPF_CALL in seen and op.BPF_JMP32 | op.BPF_JA in seen
    assert op.BPF_ALU64 | op.BPF_END in seen and op.BPF_ALU | op.BPF_END | op.BPF_TO_BE in seen


try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # the fixed-seed tests above still run
    given = None

if given is not None:
    @settings(max_examples=60, deadline=None)
    @given(seed=st.integers(0, 2**32 - 1), checked=st.booleans())
    def test_hypothesis_programs_agree(seed: int, checked: bool) -> None:
        rng = random.Random(seed)
        compare(random_program(rng, segments=rng.randint(1, 8), seg_len=8), rng.randbytes(BUF_SIZE),
                checked, "fast")
