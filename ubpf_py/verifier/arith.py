"""ALU instructions of the walk: register moves, scalar arithmetic and pointer arithmetic.

``checker.Checker`` dispatches every BPF_ALU/BPF_ALU64 instruction here.  Scalars go through
``alu.scalar_alu`` (the kernel's ``adjust_scalar_min_max_vals``); pointer arithmetic follows the
kernel's ``adjust_ptr_min_max_vals`` and ``check_reg_sane_offset`` (which pointers may move, by
how much, and the messages when not).  ``read_reg``/``check_dst`` are the operand checks every
instruction kind shares.
"""

from __future__ import annotations

from ubpf_py.isa.instruction import Instruction
from ubpf_py.isa.opcodes import (
    BPF_ADD,
    BPF_ALU64,
    BPF_AND,
    BPF_ARSH,
    BPF_DIV,
    BPF_END,
    BPF_K,
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
from ubpf_py.verifier import alu as A
from ubpf_py.verifier import memory as M
from ubpf_py.verifier import state as S
from ubpf_py.verifier.context import CheckContext
from ubpf_py.verifier.memory import Reject
from ubpf_py.verifier.scalar import Scalar
from ubpf_py.verifier.state import (
    FUNC,
    MAP_PTR,
    NOT_INIT,
    OR_NULL,
    SCALAR,
    STACK,
    UNKNOWN_SCALAR,
    Reg,
    VerifierState,
)

_ALU_STR = {BPF_ADD: "+=", BPF_SUB: "-=", BPF_MUL: "*=", BPF_DIV: "/=", BPF_OR: "|=",
            BPF_AND: "&=", BPF_LSH: "<<=", BPF_RSH: ">>=", BPF_NEG: "neg",
            BPF_MOD: "%=", BPF_XOR: "^=", BPF_MOV: "=", BPF_ARSH: "s>>=",
            BPF_END: "endian"}
#: r = constant OP immediate is computed directly (the commonest loop step)
FAST_K = frozenset({BPF_ADD, BPF_SUB, BPF_AND, BPF_OR, BPF_XOR})
FAST_K64 = frozenset(BPF_ALU64 | BPF_K | o for o in FAST_K)


def check_dst(regno: int) -> None:
    if regno == 10:
        raise Reject("frame pointer is read only", "r10 cannot be written")


def read_reg(st: VerifierState, regno: int) -> Reg:
    r = st.frames[-1].regs[regno]
    if r.type == NOT_INIT:
        raise Reject(f"R{regno} !read_ok", f"r{regno} is read before anything was stored in it")
    return r


def check_alu(ck: CheckContext, st: VerifierState, ins: Instruction) -> None:
    code = ins.opcode
    bits = 64 if code & 0x07 == BPF_ALU64 else 32
    o = code & 0xF0
    regs = st.frames[-1].regs
    x = code & BPF_X
    if o == BPF_MOV:
        if x:  # the kernel reads the source before it checks the destination
            src = read_reg(st, ins.src)
            check_dst(ins.dst)
            if ins.off:  # movsx
                val = src.val.sext(ins.off // 8) if src.type == SCALAR else Scalar.unknown().sext(ins.off // 8)
                regs[ins.dst] = S.scalar_reg(val if bits == 64 else val.zext32())
            elif bits == 64:
                if src.type == SCALAR and not src.id and not src.val.is_const():
                    src = Reg(SCALAR, src.val, id=ck.new_id())
                    regs[ins.src] = src
                regs[ins.dst] = src
            elif src.type == SCALAR and src.val.umax <= 0xFFFFFFFF:
                # w3 = w2 of a value that fits in 32 bits: both registers stay linked
                if not src.id and not src.val.is_const():
                    src = Reg(SCALAR, src.val, id=ck.new_id())
                    regs[ins.src] = src
                regs[ins.dst] = src
            else:
                val = src.val.zext32() if src.type == SCALAR else Scalar.unknown().zext32()
                regs[ins.dst] = S.scalar_reg(val)
        else:
            check_dst(ins.dst)
            v = ins.imm & 0xFFFFFFFF if bits == 32 else ins.imm
            regs[ins.dst] = S.const_reg(v)
        return
    if x and o != BPF_END:  # BPF_TO_BE shares the BPF_X bit; END has no source
        read_reg(st, ins.src)
    dst = read_reg(st, ins.dst)
    check_dst(ins.dst)
    if not x and o in FAST_K and dst.type == SCALAR and dst.val.var.mask == 0:
        # constant OP immediate: the common loop-counter case, computed directly
        m = (1 << bits) - 1
        a = dst.val.var.value & m
        b = ins.imm & m
        r = (a + b) if o == BPF_ADD else (a - b) if o == BPF_SUB else \
            (a & b) if o == BPF_AND else (a | b) if o == BPF_OR else (a ^ b)
        regs[ins.dst] = S.scalar_reg(Scalar.const(r & m))
        return
    if o in (BPF_NEG, BPF_END):
        if dst.type != SCALAR:
            regs[ins.dst] = UNKNOWN_SCALAR
            return
        if o == BPF_NEG:
            regs[ins.dst] = S.scalar_reg(A.scalar_alu(BPF_NEG, dst.val, dst.val, bits))
        else:
            regs[ins.dst] = S.scalar_reg(_endian(dst.val, ins, bits))
        return
    if x:
        src = read_reg(st, ins.src)
    else:
        if o in (BPF_DIV, BPF_MOD) and ins.imm == 0:
            raise Reject("div by zero", "dividing by the constant 0")
        if o in (BPF_LSH, BPF_RSH, BPF_ARSH) and not 0 <= ins.imm < bits:
            raise Reject(f"invalid shift {ins.imm}", f"shift amounts are 0..{bits - 1}")
        src = S.const_reg(ins.imm if bits == 64 else ins.imm & 0xFFFFFFFF)
    if dst.type != SCALAR or src.type != SCALAR:
        regs[ins.dst] = _ptr_alu(o, bits, dst, src, ins)
        return
    if o in (BPF_DIV, BPF_MOD):
        # the kernel (adjust_scalar_min_max_vals, 6.18) tracks no range through a division, not
        # even of two constants: folding them here would accept programs the kernel refuses
        regs[ins.dst] = S.scalar_reg(Scalar.unknown() if bits == 64 else Scalar.unknown().zext32())
        return
    regs[ins.dst] = S.scalar_reg(A.scalar_alu(o, dst.val, src.val, bits))


def _ptr_alu(o: int, bits: int, dst: Reg, src: Reg, ins: Instruction) -> Reg:
    d = ins.dst
    if bits == 32:
        if o == BPF_SUB:
            return UNKNOWN_SCALAR
        raise Reject(f"R{d} 32-bit pointer arithmetic prohibited", "pointers are 64-bit; use 64-bit ALU")
    if dst.is_ptr and src.is_ptr:
        if o == BPF_SUB:
            return UNKNOWN_SCALAR
        raise Reject(f"R{d} pointer {_ALU_STR[o]} pointer prohibited")
    ptr, off = (dst, src) if dst.is_ptr else (src, dst)
    if ptr.type in OR_NULL:
        raise Reject(f"R{d} pointer arithmetic on {ptr.type} prohibited, null-check it first",
                     "compare the pointer with 0 before doing arithmetic on it")
    if ptr.type == S.RDONLY_UNTRUSTED_MEM:
        return ptr   # loads through it take any offset: the kernel tracks none (6.17+)
    if ptr.type == MAP_PTR and o == BPF_ADD and off.val.is_const() and off.val.value == 0:
        return ptr   # the kernel lets a map pointer take a known 0 (adjust_ptr_min_max_vals)
    if ptr.type in (MAP_PTR, FUNC):
        raise Reject(f"R{d} pointer arithmetic on {ptr.type} prohibited")
    _sane_offset(off.val, ptr)
    if o == BPF_ADD:
        return _ptr_offset(ptr, off, o, d)
    if o == BPF_SUB:
        if not dst.is_ptr:
            raise Reject(f"R{d} tried to subtract pointer from scalar")
        if ptr.type == STACK:
            raise Reject(f"R{d} subtraction from stack pointer prohibited",
                         "address stack slots by adding a negative offset (r1 += -8)")
        return _ptr_offset(ptr, off, o, d)
    if o in (BPF_AND, BPF_OR, BPF_XOR):
        raise Reject(f"R{d} bitwise operator {_ALU_STR[o]} on pointer prohibited")
    raise Reject(f"R{d} pointer arithmetic with {_ALU_STR[o]} operator prohibited",
                 "only adding or subtracting integers keeps a pointer a pointer")


def _ptr_offset(ptr: Reg, off: Reg, o: int, d: int) -> Reg:
    v = off.val
    if v.is_const():
        c = v.smin
        new_off = ptr.off + c if o == BPF_ADD else ptr.off - c
        if new_off >= M.MAX_VAR_OFF or new_off <= -M.MAX_VAR_OFF:
            raise Reject(f"{ptr.type} pointer offset {new_off} is not allowed")
        return Reg(ptr.type, ptr.val, new_off, ptr.map, ptr.size, ptr.id, ptr.ref, ptr.frame, ptr.subprog)
    nv = A.scalar_alu(o, ptr.val, v, 64)
    if nv.smin == -(1 << 63) or nv.smin <= -M.MAX_VAR_OFF or nv.smin >= M.MAX_VAR_OFF:
        raise Reject(f"math between {ptr.type} pointer and register with unbounded min value is not allowed")
    return Reg(ptr.type, nv, ptr.off, ptr.map, ptr.size, ptr.id, ptr.ref, ptr.frame, ptr.subprog)


def _sane_offset(v: Scalar, ptr: Reg) -> None:
    """The kernel's check_reg_sane_offset for the scalar added to a pointer."""
    t = ptr.type
    if v.is_const():
        c = v.smin
        if c >= M.MAX_VAR_OFF or c <= -M.MAX_VAR_OFF:
            raise Reject(f"math between {t} pointer and {c} is not allowed")
    elif v.smin == -(1 << 63):
        raise Reject(f"math between {t} pointer and register with unbounded min value is not allowed",
                     "bound the offset (e.g. 'if (i < N)' or 'i &= MASK') before adding it")
    elif v.smin >= M.MAX_VAR_OFF or v.smin <= -M.MAX_VAR_OFF:
        raise Reject(f"value {v.smin} makes {t} pointer be out of bounds")
    if ptr.off >= M.MAX_VAR_OFF or ptr.off <= -M.MAX_VAR_OFF:
        raise Reject(f"{t} pointer offset {ptr.off} is not allowed")


def _endian(v: Scalar, ins: Instruction, bits: int) -> Scalar:
    width = ins.imm
    m = (1 << width) - 1
    swap = (ins.opcode & 0x07 == BPF_ALU64) or (ins.opcode & BPF_TO_BE)
    if not swap:
        return v.trunc(width // 8)
    if v.is_const():
        b = (v.value & m).to_bytes(width // 8, "little")
        return Scalar.const(int.from_bytes(b, "big"))
    return Scalar.urange(0, m) if width < 64 else Scalar.unknown()
