"""Tristate numbers: which bits of a value are known and what they are.

A tnum is ``(value, mask)``: bits set in ``mask`` are unknown, the others equal
the bits of ``value`` (``value & mask == 0``).  This is the kernel verifier's
``struct tnum`` (kernel/bpf/tnum.c), re-derived here from its published
semantics; every operation over-approximates the set of concrete results.
Values are Python ints kept within ``bits`` bits (64 unless stated).
"""

from __future__ import annotations

from typing import NamedTuple

U64 = (1 << 64) - 1
U32 = (1 << 32) - 1


class Tnum(NamedTuple):
    value: int
    mask: int

    # -- queries -------------------------------------------------------------
    def is_const(self) -> bool:
        return self.mask == 0

    def contains(self, other: Tnum) -> bool:
        """True if every value ``other`` can take is a value of ``self``."""
        if other.mask & ~self.mask:
            return False
        return (other.value & ~self.mask) == self.value

    def has(self, v: int) -> bool:
        return (v & ~self.mask) == self.value

    @property
    def umin(self) -> int:
        return self.value

    @property
    def umax(self) -> int:
        return self.value | self.mask

    def __str__(self) -> str:
        if self.mask == 0:
            return hex(self.value)
        return f"({self.value:#x}; {self.mask:#x})"


UNKNOWN = Tnum(0, U64)
ZERO = Tnum(0, 0)


def const(v: int, bits: int = 64) -> Tnum:
    return Tnum(v & ((1 << bits) - 1), 0)


def unknown(bits: int = 64) -> Tnum:
    return Tnum(0, (1 << bits) - 1)


def trange(lo: int, hi: int) -> Tnum:
    """Smallest tnum holding every value in the unsigned range [lo, hi]."""
    chi = lo ^ hi
    if chi == 0:
        return Tnum(lo, 0)
    bits = chi.bit_length()
    if bits > 63:
        return UNKNOWN
    delta = (1 << bits) - 1
    return Tnum(lo & ~delta, delta)


def add(a: Tnum, b: Tnum, bits: int = 64) -> Tnum:
    m = (1 << bits) - 1
    sm = (a.mask + b.mask) & m
    sv = (a.value + b.value) & m
    sigma = (sm + sv) & m
    chi = sigma ^ sv
    mu = chi | a.mask | b.mask
    return Tnum(sv & ~mu & m, mu & m)


def sub(a: Tnum, b: Tnum, bits: int = 64) -> Tnum:
    m = (1 << bits) - 1
    dv = (a.value - b.value) & m
    alpha = (dv + a.mask) & m
    beta = (dv - b.mask) & m
    chi = alpha ^ beta
    mu = chi | a.mask | b.mask
    return Tnum(dv & ~mu & m, mu & m)


def and_(a: Tnum, b: Tnum) -> Tnum:
    alpha = a.value | a.mask
    beta = b.value | b.mask
    v = a.value & b.value
    return Tnum(v, alpha & beta & ~v)


def or_(a: Tnum, b: Tnum) -> Tnum:
    v = a.value | b.value
    mu = a.mask | b.mask
    return Tnum(v, mu & ~v)


def xor(a: Tnum, b: Tnum) -> Tnum:
    v = a.value ^ b.value
    mu = a.mask | b.mask
    return Tnum(v & ~mu, mu)


def mul(a: Tnum, b: Tnum, bits: int = 64) -> Tnum:
    """Long multiplication over tristate bits (sound, like the kernel's tnum_mul)."""
    m = (1 << bits) - 1
    acc_v = (a.value * b.value) & m
    acc_m = Tnum(0, 0)
    x, y = a, b
    while x.value or x.mask:
        if x.value & 1:
            acc_m = add(acc_m, Tnum(0, y.mask), bits)
        elif x.mask & 1:
            acc_m = add(acc_m, Tnum(0, y.value | y.mask), bits)
        x = Tnum(x.value >> 1, x.mask >> 1)
        y = Tnum((y.value << 1) & m, (y.mask << 1) & m)
    return add(Tnum(acc_v, 0), acc_m, bits)


def lshift(a: Tnum, shift: int, bits: int = 64) -> Tnum:
    m = (1 << bits) - 1
    return Tnum((a.value << shift) & m, (a.mask << shift) & m)


def rshift(a: Tnum, shift: int) -> Tnum:
    return Tnum(a.value >> shift, a.mask >> shift)


def arshift(a: Tnum, shift: int, bits: int = 64) -> Tnum:
    m = (1 << bits) - 1

    def sar(x: int) -> int:
        if x >> (bits - 1):
            x -= 1 << bits
        return (x >> shift) & m

    return Tnum(sar(a.value), sar(a.mask))


def intersect(a: Tnum, b: Tnum) -> Tnum:
    """Values known to both (caller guarantees the two are consistent)."""
    v = a.value | b.value
    mu = a.mask & b.mask
    return Tnum(v & ~mu, mu)


def consistent(a: Tnum, b: Tnum) -> bool:
    """Whether some value belongs to both tnums."""
    known = ~a.mask & ~b.mask
    return (a.value & known) == (b.value & known)


def cast(a: Tnum, size: int) -> Tnum:
    """Truncate to the low ``size`` bytes."""
    m = (1 << (size * 8)) - 1
    return Tnum(a.value & m, a.mask & m)


def subreg(a: Tnum) -> Tnum:
    return cast(a, 4)


def with_subreg(a: Tnum, sub: Tnum) -> Tnum:
    """``a`` with its low 32 bits replaced by ``sub``."""
    hi = Tnum(a.value & ~U32 & U64, a.mask & ~U32 & U64)
    return or_(hi, cast(sub, 4))


def sext(a: Tnum, size: int) -> Tnum:
    """Sign-extend the low ``size`` bytes to 64 bits."""
    bits = size * 8
    t = cast(a, size)
    sign = 1 << (bits - 1)
    ext = U64 & ~((1 << bits) - 1)
    if t.mask & sign:
        return Tnum(t.value, t.mask | ext)
    if t.value & sign:
        return Tnum(t.value | ext, t.mask)
    return t
