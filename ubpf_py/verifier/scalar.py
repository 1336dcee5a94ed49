"""Scalar value tracking: a tnum plus unsigned/signed 64-bit and 32-bit ranges.

This mirrors what the kernel keeps in ``struct bpf_reg_state`` for a scalar
(``var_off``, ``umin/umax``, ``smin/smax``, ``u32_min/u32_max``,
``s32_min/s32_max``) and how it keeps them consistent (``reg_bounds_sync``).
Every ALU operation and branch refinement over-approximates: the concrete value
is always inside all five descriptions at once.

The same class also describes the *variable part* of a pointer's offset.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ubpf_py.verifier import tnum as tn
from ubpf_py.verifier.tnum import U32, U64, Tnum

S64_MIN, S64_MAX = -(1 << 63), (1 << 63) - 1
S32_MIN, S32_MAX = -(1 << 31), (1 << 31) - 1


def s64(v: int) -> int:
    v &= U64
    return v - (1 << 64) if v >> 63 else v


def s32(v: int) -> int:
    v &= U32
    return v - (1 << 32) if v >> 31 else v


@dataclass(slots=True, eq=True)
class Scalar:
    """Immutable by convention (never assign a field): values are shared between states.
    Not a frozen dataclass because frozen construction is several times slower, and the
    verifier builds one of these for almost every instruction it walks."""

    var: Tnum
    umin: int
    umax: int
    smin: int
    smax: int
    u32min: int
    u32max: int
    s32min: int
    s32max: int
    #: cached hash (values are immutable and keys of the ALU memo tables)
    _h: int = field(default=0, compare=False, repr=False)

    def __hash__(self) -> int:
        h = self._h
        if not h:
            var = self.var
            if var.mask == 0:   # constants (equal scalars have equal tnums: the same formula)
                h = hash(var.value) ^ 0x5BD1E995 or 1
            else:
                h = hash((var, self.umin, self.umax, self.smin, self.smax, self.u32min, self.u32max,
                          self.s32min, self.s32max)) or 1
            self._h = h
        return h

    # -- construction ----------------------------------------------------------
    @staticmethod
    def const(v: int) -> Scalar:
        v &= U64
        c = _CONSTS.get(v)
        if c is not None:
            return c
        lo = v & U32
        sv = v - (1 << 64) if v >> 63 else v
        sl = lo - (1 << 32) if lo >> 31 else lo
        return Scalar(Tnum(v, 0), v, v, sv, sv, lo, lo, sl, sl)

    @staticmethod
    def unknown() -> Scalar:
        return UNKNOWN

    @staticmethod
    def urange(lo: int, hi: int) -> Scalar:
        return Scalar(tn.trange(lo, hi), lo, hi, S64_MIN, S64_MAX, 0, U32, S32_MIN, S32_MAX).sync()

    @staticmethod
    def srange(lo: int, hi: int) -> Scalar:
        return Scalar(tn.UNKNOWN, 0, U64, lo, hi, 0, U32, S32_MIN, S32_MAX).sync()

    # -- queries ---------------------------------------------------------------
    def is_const(self) -> bool:
        return self.var.mask == 0

    @property
    def value(self) -> int:
        return self.var.value

    def empty(self) -> bool:
        return (self.umin > self.umax or self.smin > self.smax or self.u32min > self.u32max
                or self.s32min > self.s32max)

    def within(self, other: Scalar) -> bool:
        """True if ``other``'s possible values are all possible values of self
        (the kernel's range_within plus tnum_in)."""
        if self is other:   # values are shared between states: the commonest case at a prune point
            return True
        return (self.umin <= other.umin and other.umax <= self.umax and self.smin <= other.smin
                and other.smax <= self.smax and self.u32min <= other.u32min
                and other.u32max <= self.u32max and self.s32min <= other.s32min
                and other.s32max <= self.s32max and self.var.contains(other.var))

    def __str__(self) -> str:
        if self.is_const():
            return str(s64(self.value))
        parts = []
        if self.smin != S64_MIN:
            parts.append(f"smin={self.smin}")
        if self.smax != S64_MAX:
            parts.append(f"smax={self.smax}")
        if self.umin != 0:
            parts.append(f"umin={self.umin}")
        if self.umax != U64:
            parts.append(f"umax={self.umax}")
        if self.u32max != U32 and self.u32max != self.umax:
            parts.append(f"umax32={self.u32max}")
        if self.var.mask != U64:
            parts.append(f"var_off={self.var}")
        return ",".join(parts) if parts else "unbounded"

    # -- consistency (reg_bounds_sync) ------------------------------------------
    def sync(self) -> Scalar:
        key = (self.var, self.umin, self.umax, self.smin, self.smax, self.u32min, self.u32max,
               self.s32min, self.s32max)
        r = _SYNCED.get(key)
        if r is None:
            r = self._sync()
            if len(_SYNCED) >= 65536:  # the same ranges recur on many paths; keep the cache bounded
                _SYNCED.clear()
            _SYNCED[key] = r
        return r

    def _sync(self) -> Scalar:
        v, umin, umax, smin, smax = self.var, self.umin, self.umax, self.smin, self.smax
        u32min, u32max, s32min, s32max = self.u32min, self.u32max, self.s32min, self.s32max
        if v.mask == 0 and umin <= v.value <= umax and smin <= s64(v.value) <= smax \
                and u32min <= v.value & U32 <= u32max and s32min <= s32(v.value) <= s32max:
            return Scalar.const(v.value)
        prev = None
        for _ in range(4):
            cur = (v, umin, umax, smin, smax, u32min, u32max, s32min, s32max)
            if cur == prev:
                break
            prev = cur
            # bounds from the tnum
            sv = tn.subreg(v)
            s32min = max(s32min, s32(sv.value | (sv.mask & 0x80000000)))
            s32max = min(s32max, s32(sv.value | (sv.mask & 0x7FFFFFFF)))
            u32min = max(u32min, sv.value)
            u32max = min(u32max, sv.value | sv.mask)
            smin = max(smin, s64(v.value | (v.mask & (1 << 63))))
            smax = min(smax, s64(v.value | (v.mask & S64_MAX)))
            umin = max(umin, v.value)
            umax = min(umax, v.value | v.mask)
            # 64 -> 32: when the upper halves agree the low halves form a range
            if umin >> 32 == umax >> 32:
                u32min = max(u32min, umin & U32)
                u32max = min(u32max, umax & U32)
                if s32(umin) <= s32(umax):
                    s32min = max(s32min, s32(umin))
                    s32max = min(s32max, s32(umax))
            if (smin >> 32) == (smax >> 32):
                lo, hi = smin & U32, smax & U32
                if lo <= hi:
                    u32min = max(u32min, lo)
                    u32max = min(u32max, hi)
                if s32(lo) <= s32(hi):
                    s32min = max(s32min, s32(lo))
                    s32max = min(s32max, s32(hi))
            # 32-bit signed <-> unsigned
            if s32(u32min) <= s32(u32max):
                s32min = max(s32min, s32(u32min))
                s32max = min(s32max, s32(u32max))
            if (s32min & U32) <= (s32max & U32):
                u32min = max(u32min, s32min & U32)
                u32max = min(u32max, s32max & U32)
            # 32 -> 64: if the upper 32 bits are a single value, combine
            if umin >> 32 == umax >> 32:
                hi = umin & ~U32 & U64
                umin = max(umin, hi | u32min)
                umax = min(umax, hi | u32max)
            # 64-bit signed <-> unsigned
            if s64(umin) <= s64(umax):
                smin = max(smin, s64(umin))
                smax = min(smax, s64(umax))
            if (smin & U64) <= (smax & U64):
                umin = max(umin, smin & U64)
                umax = min(umax, smax & U64)
            # ranges back into the tnum
            if umin <= umax:
                r = tn.trange(umin, umax)
                if tn.consistent(v, r):
                    v = tn.intersect(v, r)
            if u32min <= u32max:
                r = tn.trange(u32min, u32max)
                sv = tn.subreg(v)
                if tn.consistent(sv, r):
                    v = tn.with_subreg(v, tn.intersect(sv, r))
        return Scalar(v, umin, umax, smin, smax, u32min, u32max, s32min, s32max)

    # -- projections --------------------------------------------------------------
    def zext32(self) -> Scalar:
        """The low 32 bits, zero-extended (result of any 32-bit ALU op)."""
        sv = tn.subreg(self.var)
        return Scalar(sv, self.u32min, self.u32max, self.u32min, self.u32max,
                      self.u32min, self.u32max, self.s32min, self.s32max).sync()

    def trunc(self, size: int) -> Scalar:
        """Zero-extended low ``size`` bytes (a narrow load or a narrow spill fill)."""
        if size >= 8:
            return self
        if size == 4:
            return self.zext32()
        m = (1 << (size * 8)) - 1
        if self.umax <= m:
            return self
        v = tn.cast(self.var, size)
        return Scalar(v, 0, m, 0, m, 0, m, 0, m).sync()

    def sext(self, size: int) -> Scalar:
        """Sign-extend the low ``size`` bytes (movsx / ldsx)."""
        bits = size * 8
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        if lo <= self.smin and self.smax <= hi:
            return self
        v = tn.sext(self.var, size)
        return Scalar(v, 0, U64, lo, hi, 0, U32, S32_MIN, S32_MAX).sync()


#: results of Scalar.sync by field values (Scalars are immutable, sync is pure)
_SYNCED: dict[tuple, Scalar] = {}

#: small constants are built once (immediates and loop counters repeat a lot)
_CONSTS: dict[int, Scalar] = {}
_CONSTS.update({v & U64: Scalar.const(v) for v in range(-64, 4097)})

UNKNOWN = Scalar(tn.UNKNOWN, 0, U64, S64_MIN, S64_MAX, 0, U32, S32_MIN, S32_MAX)


def unknown_bits(size: int) -> Scalar:
    """A value loaded from ``size`` bytes of memory (zero-extended)."""
    if size >= 8:
        return UNKNOWN
    return Scalar.urange(0, (1 << (size * 8)) - 1)
