"""Scalar ALU transfer functions and conditional-branch refinement.

Given the abstract values of the operands, compute the abstract result of an
ALU instruction (64-bit or 32-bit), decide whether a conditional jump is always
or never taken, and narrow both operands on each side of a jump.  The rules
follow the kernel verifier's ``adjust_scalar_min_max_vals``, ``is_branch_taken``
and ``reg_set_min_max``: anything the kernel cannot bound stays unbounded here
too, so that we accept the same programs.
"""

from __future__ import annotations

from ubpf_py.isa.opcodes import (
    BPF_ADD,
    BPF_AND,
    BPF_ARSH,
    BPF_JEQ,
    BPF_JGE,
    BPF_JGT,
    BPF_JLE,
    BPF_JLT,
    BPF_JNE,
    BPF_JSET,
    BPF_JSGE,
    BPF_JSGT,
    BPF_JSLE,
    BPF_JSLT,
    BPF_LSH,
    BPF_MOV,
    BPF_MUL,
    BPF_NEG,
    BPF_OR,
    BPF_RSH,
    BPF_SUB,
    BPF_XOR,
)
from ubpf_py.verifier import tnum as tn
from ubpf_py.verifier.scalar import UNKNOWN, Scalar, s32, s64
from ubpf_py.verifier.tnum import U32, U64, Tnum

# a width-specific view: (tnum, umin, umax, smin, smax)
View = tuple[Tnum, int, int, int, int]


def view(s: Scalar, bits: int) -> View:
    if bits == 64:
        return s.var, s.umin, s.umax, s.smin, s.smax
    return tn.subreg(s.var), s.u32min, s.u32max, s.s32min, s.s32max


def _limits(bits: int) -> tuple[int, int, int]:
    return (1 << bits) - 1, -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def _binop(code: int, a: View, b: View, bits: int) -> View | None:
    """Result view of ``a OP b`` in ``bits``-bit arithmetic, or None for 'unknown'."""
    m, smin_l, smax_l = _limits(bits)
    at, aumin, aumax, asmin, asmax = a
    bt, bumin, bumax, bsmin, bsmax = b
    sgn = s64 if bits == 64 else s32
    if code == BPF_ADD:
        t = tn.add(at, bt, bits)
        umin, umax = aumin + bumin, aumax + bumax
        if umax > m:
            umin, umax = 0, m
        smin, smax = asmin + bsmin, asmax + bsmax
        if smin < smin_l or smax > smax_l:
            smin, smax = smin_l, smax_l
        return t, umin, umax, smin, smax
    if code == BPF_SUB:
        t = tn.sub(at, bt, bits)
        umin, umax = aumin - bumax, aumax - bumin
        if umin < 0:
            umin, umax = 0, m
        smin, smax = asmin - bsmax, asmax - bsmin
        if smin < smin_l or smax > smax_l:
            smin, smax = smin_l, smax_l
        return t, umin, umax, smin, smax
    if code == BPF_MUL:
        t = tn.mul(at, bt, bits)
        if aumax * bumax <= m:
            umin, umax = aumin * bumin, aumax * bumax
        else:
            umin, umax = 0, m
        corners = (asmin * bsmin, asmin * bsmax, asmax * bsmin, asmax * bsmax)
        smin, smax = min(corners), max(corners)
        if smin < smin_l or smax > smax_l:
            smin, smax = smin_l, smax_l
        return t, umin, umax, smin, smax
    if code == BPF_AND:
        t = tn.and_(at, bt)
        umin, umax = t.value, min(aumax, bumax)
        if asmin < 0 or bsmin < 0:
            smin, smax = smin_l, smax_l
        else:
            smin, smax = sgn(umin), sgn(umax)
            if smin > smax:
                smin, smax = smin_l, smax_l
        return t, umin, umax, smin, smax
    if code in (BPF_OR, BPF_XOR):
        t = tn.or_(at, bt) if code == BPF_OR else tn.xor(at, bt)
        umin = max(aumin, bumin) if code == BPF_OR else t.value
        umax = t.value | t.mask
        if asmin < 0 or bsmin < 0 or sgn(umax) < 0:
            smin, smax = smin_l, smax_l
        else:
            smin, smax = umin, umax
        return t, umin, umax, smin, smax
    if code in (BPF_LSH, BPF_RSH, BPF_ARSH):
        if not bt.is_const() or bt.value >= bits:
            return None
        sh = bt.value
        if code == BPF_LSH:
            t = tn.lshift(at, sh, bits)
            if aumax > (m >> sh):
                umin, umax = 0, m
            else:
                umin, umax = aumin << sh, aumax << sh
            return t, umin, umax, smin_l, smax_l
        if code == BPF_RSH:
            t = tn.rshift(at, sh)
            return t, aumin >> sh, aumax >> sh, smin_l, smax_l
        t = tn.arshift(at, sh, bits)
        return t, 0, m, asmin >> sh, asmax >> sh
    return None


def _from_views(v64: View | None, v32: View | None) -> Scalar:
    if v64 is None:
        base = UNKNOWN
    else:
        t, umin, umax, smin, smax = v64
        base = Scalar(t, umin, umax, smin, smax, 0, U32, -(1 << 31), (1 << 31) - 1)
    if v32 is not None:
        t32, umin32, umax32, smin32, smax32 = v32
        if tn.consistent(tn.subreg(base.var), t32):
            var = tn.with_subreg(base.var, tn.intersect(tn.subreg(base.var), t32))
        else:
            var = base.var
        base = Scalar(var, base.umin, base.umax, base.smin, base.smax,
                      max(umin32, base.u32min), min(umax32, base.u32max),
                      max(smin32, base.s32min), min(smax32, base.s32max))
    return base.sync()


_SHIFTS = (BPF_LSH, BPF_RSH, BPF_ARSH)
_LOW_BITS_ONLY = (BPF_ADD, BPF_SUB, BPF_MUL, BPF_AND, BPF_OR, BPF_XOR)


#: memo tables of the pure transfer functions below, keyed by (op, operands, width).  The walk
#: repeats the same operations on the same values on many paths (a few percent of the calls
#: over the libbpf-tools are distinct), and values are immutable; bounded like Scalar.sync's,
#: and emptied for every program (``reset_memo``) so that timings never profit from an
#: earlier verification of the same program.
_MEMO_ALU: dict[tuple, Scalar] = {}
_MEMO_REFINE: dict[tuple, tuple[Scalar, Scalar] | None] = {}
_MEMO_TAKEN: dict[tuple, int] = {}
_MEMO_MAX = 65536


_MISS = object()


def reset_memo() -> None:
    _MEMO_ALU.clear()
    _MEMO_REFINE.clear()
    _MEMO_TAKEN.clear()


def _memoised(table: dict, compute):
    """``compute(code, a, b, bits)`` answered from ``table`` when it was asked before (its
    results, None included, depend on the arguments only)."""
    def cached(code: int, a: Scalar, b: Scalar, bits: int):
        key = (code, a, b, bits)
        r = table.get(key, _MISS)
        if r is _MISS:
            if len(table) >= _MEMO_MAX:
                table.clear()
            r = table[key] = compute(code, a, b, bits)
        return r
    cached.__doc__ = compute.__doc__
    cached.__name__ = compute.__name__.lstrip("_")
    return cached


def _scalar_alu(code: int, dst: Scalar, src: Scalar, bits: int) -> Scalar:
    """Abstract result of the scalar ALU operation ``code`` (BPF_ADD ... BPF_ARSH, BPF_NEG)."""
    if code in _SHIFTS and src.umax >= bits:
        # the kernel: shifts by bits or more are undefined, the result is unknown, all 64 bits
        # even for a 32-bit shift (the engines mask the count; no value may be assumed)
        return UNKNOWN
    if dst.is_const() and src.is_const():
        r = _concrete(code, dst.value, src.value, bits)
        if r is not None:
            return Scalar.const(r)
    if code == BPF_NEG:
        return scalar_alu(BPF_SUB, Scalar.const(0), dst, bits)
    if code == BPF_MOV:
        return src if bits == 64 else src.zext32()
    if bits == 32:
        r = _binop(code, view(dst, 32), view(src, 32), 32)
        if r is None:
            return UNKNOWN.zext32()
        t, umin, umax, smin, smax = r
        return Scalar(t, umin, umax, umin, umax, umin, umax, smin, smax).sync() if umin <= umax \
            else UNKNOWN.zext32()
    r64 = _binop(code, view(dst, 64), view(src, 64), 64)
    r32 = _binop(code, view(dst, 32), view(src, 32), 32) if code in _LOW_BITS_ONLY else None
    res = _from_views(r64, r32)
    return UNKNOWN if res.empty() else res


def _concrete(code: int, a: int, b: int, bits: int) -> int | None:
    m = (1 << bits) - 1
    a &= m
    b &= m
    if code == BPF_ADD:
        return (a + b) & m
    if code == BPF_SUB:
        return (a - b) & m
    if code == BPF_MUL:
        return (a * b) & m
    if code == BPF_AND:
        return a & b
    if code == BPF_OR:
        return a | b
    if code == BPF_XOR:
        return a ^ b
    if code == BPF_NEG:
        return (-a) & m
    if code == BPF_MOV:
        return b
    if code == BPF_LSH:
        return (a << (b & (bits - 1))) & m
    if code == BPF_RSH:
        return a >> (b & (bits - 1))
    if code == BPF_ARSH:
        sa = a - (1 << bits) if a >> (bits - 1) else a
        return (sa >> (b & (bits - 1))) & m
    return None


# -- conditional jumps ----------------------------------------------------------

_NEGATE = {BPF_JEQ: BPF_JNE, BPF_JNE: BPF_JEQ, BPF_JGT: BPF_JLE,
           BPF_JLE: BPF_JGT, BPF_JGE: BPF_JLT, BPF_JLT: BPF_JGE,
           BPF_JSGT: BPF_JSLE, BPF_JSLE: BPF_JSGT, BPF_JSGE: BPF_JSLT,
           BPF_JSLT: BPF_JSGE, BPF_JSET: -1, -1: BPF_JSET}
_SWAP = {BPF_JEQ: BPF_JEQ, BPF_JNE: BPF_JNE, BPF_JGT: BPF_JLT,
         BPF_JLT: BPF_JGT, BPF_JGE: BPF_JLE, BPF_JLE: BPF_JGE,
         BPF_JSGT: BPF_JSLT, BPF_JSLT: BPF_JSGT, BPF_JSGE: BPF_JSLE,
         BPF_JSLE: BPF_JSGE, BPF_JSET: BPF_JSET, -1: -1}
JSET_FALSE = -1


def negate(code: int) -> int:
    return _NEGATE[code]


def _branch_taken(code: int, a: Scalar, b: Scalar, bits: int) -> int:
    """1 if ``a OP b`` always holds, 0 if never, -1 if it depends."""
    at, aumin, aumax, asmin, asmax = view(a, bits)
    bt, bumin, bumax, bsmin, bsmax = view(b, bits)
    if code == BPF_JEQ:
        if at.is_const() and bt.is_const():
            return int(at.value == bt.value)
        if aumin > bumax or aumax < bumin or asmin > bsmax or asmax < bsmin or not tn.consistent(at, bt):
            return 0
        return -1
    if code == BPF_JNE:
        r = branch_taken(BPF_JEQ, a, b, bits)
        return r if r < 0 else 1 - r
    if code == BPF_JSET:
        if at.value & bt.value:
            return 1
        if not ((at.value | at.mask) & (bt.value | bt.mask)):
            return 0
        return -1
    if code == JSET_FALSE:
        r = branch_taken(BPF_JSET, a, b, bits)
        return r if r < 0 else 1 - r
    if code == BPF_JGT:
        return 1 if aumin > bumax else 0 if aumax <= bumin else -1
    if code == BPF_JGE:
        return 1 if aumin >= bumax else 0 if aumax < bumin else -1
    if code == BPF_JLT:
        return 1 if aumax < bumin else 0 if aumin >= bumax else -1
    if code == BPF_JLE:
        return 1 if aumax <= bumin else 0 if aumin > bumax else -1
    if code == BPF_JSGT:
        return 1 if asmin > bsmax else 0 if asmax <= bsmin else -1
    if code == BPF_JSGE:
        return 1 if asmin >= bsmax else 0 if asmax < bsmin else -1
    if code == BPF_JSLT:
        return 1 if asmax < bsmin else 0 if asmin >= bsmax else -1
    if code == BPF_JSLE:
        return 1 if asmax <= bsmin else 0 if asmin > bsmax else -1
    return -1


def _apply(s: Scalar, v: View, bits: int) -> Scalar | None:
    t, umin, umax, smin, smax = v
    if bits == 64:
        if not tn.consistent(s.var, t):
            return None
        r = Scalar(tn.intersect(s.var, t), max(s.umin, umin), min(s.umax, umax),
                   max(s.smin, smin), min(s.smax, smax), s.u32min, s.u32max, s.s32min, s.s32max)
    else:
        sub = tn.subreg(s.var)
        if not tn.consistent(sub, t):
            return None
        r = Scalar(tn.with_subreg(s.var, tn.intersect(sub, t)), s.umin, s.umax, s.smin, s.smax,
                   max(s.u32min, umin), min(s.u32max, umax), max(s.s32min, smin), min(s.s32max, smax))
    if r.empty():
        return None
    r = r.sync()
    return None if r.empty() else r




def _refine(code: int, a: Scalar, b: Scalar, bits: int) -> tuple[Scalar, Scalar] | None:
    """Narrow ``a`` and ``b`` assuming ``a OP b`` holds; None if it cannot hold."""
    m, smin_l, smax_l = _limits(bits)
    at, aumin, aumax, asmin, asmax = view(a, bits)
    bt, bumin, bumax, bsmin, bsmax = view(b, bits)
    full = tn.unknown(bits)
    if code == BPF_JEQ:
        t = tn.intersect(at, bt) if tn.consistent(at, bt) else None
        if t is None:
            return None
        v = (t, max(aumin, bumin), min(aumax, bumax), max(asmin, bsmin), min(asmax, bsmax))
        na, nb = _apply(a, v, bits), _apply(b, v, bits)
    elif code == BPF_JNE:
        na, nb = a, b
        if bt.is_const():
            na = _exclude(a, bt.value, bits)
        if at.is_const():
            nb = _exclude(b, at.value, bits)
    elif code == BPF_JSET:
        na, nb = a, b
        if bt.is_const() and bt.value and bt.value & (bt.value - 1) == 0:
            na = _apply(a, (Tnum(bt.value, full.mask & ~bt.value), 0, m, smin_l, smax_l), bits)
    elif code == JSET_FALSE:
        na, nb = a, b
        if bt.is_const():
            na = _apply(a, (Tnum(0, full.mask & ~bt.value), 0, m, smin_l, smax_l), bits)
    elif code in (BPF_JGT, BPF_JGE):
        d = 1 if code == BPF_JGT else 0
        na = _apply(a, (full, bumin + d, m, smin_l, smax_l), bits) if bumin + d <= m else None
        nb = _apply(b, (full, 0, aumax - d, smin_l, smax_l), bits) if aumax - d >= 0 else None
    elif code in (BPF_JLT, BPF_JLE):
        r = refine(_SWAP[code], b, a, bits)
        return None if r is None else (r[1], r[0])
    elif code in (BPF_JSGT, BPF_JSGE):
        d = 1 if code == BPF_JSGT else 0
        na = _apply(a, (full, 0, m, bsmin + d, smax_l), bits) if bsmin + d <= smax_l else None
        nb = _apply(b, (full, 0, m, smin_l, asmax - d), bits) if asmax - d >= smin_l else None
    elif code in (BPF_JSLT, BPF_JSLE):
        r = refine(_SWAP[code], b, a, bits)
        return None if r is None else (r[1], r[0])
    else:
        return a, b
    if na is None or nb is None:
        return None
    return na, nb


def _exclude(s: Scalar, c: int, bits: int) -> Scalar | None:
    """``s`` known to differ from the constant ``c``: trim range ends equal to c."""
    t, umin, umax, smin, smax = view(s, bits)
    sc = s64(c) if bits == 64 else s32(c)
    if t.is_const():
        return None if t.value == c else s
    if umin == c:
        umin += 1
    if umax == c:
        umax -= 1
    if smin == sc:
        smin += 1
    if smax == sc:
        smax -= 1
    if umin > umax or smin > smax:
        return None
    return _apply(s, (tn.unknown(bits), umin, umax, smin, smax), bits)


# the transfer functions the walk calls, memoised (see _MEMO_ALU)
scalar_alu = _memoised(_MEMO_ALU, _scalar_alu)
branch_taken = _memoised(_MEMO_TAKEN, _branch_taken)
refine = _memoised(_MEMO_REFINE, _refine)


__all__ = ["JSET_FALSE", "U64", "branch_taken", "negate", "refine", "scalar_alu", "view"]
