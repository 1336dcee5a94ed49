"""Exhaustive soundness of the scalar domain on small values (boundaries included).

The property tests in test_verifier.py sample; these enumerate every small tnum
and interval, so an off-by-one in a bound (``>`` for ``>=``), a wrong tnum
operation or a refinement that drops a value is always caught (mutation testing
found such changes surviving the sampled tests).
"""

from __future__ import annotations

import itertools

import pytest
from test_verifier import _contains

from ubpf_py.isa import opcodes as op
from ubpf_py.verifier import alu as A
from ubpf_py.verifier import tnum as tn
from ubpf_py.verifier.scalar import Scalar

BITS = 3
#: every 3-bit tnum: (value, mask) with value & mask == 0
TNUMS = [tn.Tnum(v, m) for v in range(8) for m in range(8) if not v & m]
#: small unsigned intervals
RANGES = [(lo, hi) for lo in range(6) for hi in range(lo, 6)]
_JMPS = [op.BPF_JEQ, op.BPF_JNE, op.BPF_JGT, op.BPF_JGE, op.BPF_JLT, op.BPF_JLE, op.BPF_JSGT,
         op.BPF_JSGE, op.BPF_JSLT, op.BPF_JSLE, op.BPF_JSET]
_HOLDS = {
    op.BPF_JEQ: lambda a, b: a == b, op.BPF_JNE: lambda a, b: a != b, op.BPF_JGT: lambda a, b: a > b,
    op.BPF_JGE: lambda a, b: a >= b, op.BPF_JLT: lambda a, b: a < b, op.BPF_JLE: lambda a, b: a <= b,
    op.BPF_JSGT: lambda a, b: a > b, op.BPF_JSGE: lambda a, b: a >= b, op.BPF_JSLT: lambda a, b: a < b,
    op.BPF_JSLE: lambda a, b: a <= b, op.BPF_JSET: lambda a, b: bool(a & b),
}


def _members(t: tn.Tnum) -> list[int]:
    return [v for v in range(1 << BITS) if t.has(v)]


@pytest.mark.parametrize("name", ["add", "sub", "mul", "and_", "or_", "xor"])
def test_tnum_ops_contain_every_result(name: str) -> None:
    fn = getattr(tn, name)
    concrete = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
                "and_": lambda a, b: a & b, "or_": lambda a, b: a | b, "xor": lambda a, b: a ^ b}[name]
    for a, b in itertools.product(TNUMS, TNUMS):
        r = fn(a, b, 64) if name in ("add", "sub", "mul") else fn(a, b)
        for x, y in itertools.product(_members(a), _members(b)):
            assert r.has(concrete(x, y) & tn.U64), (name, a, b, x, y, r)


def test_branch_taken_and_refine_are_exact_enough_and_sound() -> None:
    for (alo, ahi), (blo, bhi) in itertools.product(RANGES, RANGES):
        a, b = Scalar.urange(alo, ahi), Scalar.urange(blo, bhi)
        for code in _JMPS:
            pairs = [(x, y) for x in range(alo, ahi + 1) for y in range(blo, bhi + 1)]
            truth = [_HOLDS[code](x, y) for x, y in pairs]
            taken = A.branch_taken(code, a, b, 64)
            if taken == 1:
                assert all(truth), (code, a, b)
            elif taken == 0:
                assert not any(truth), (code, a, b)
            elif code != op.BPF_JSET:  # on intervals the comparisons are decided whenever they can be
                assert any(truth) and not all(truth), (code, a, b)
            for cond, want in ((code, True), (A.negate(code), False)):
                r = A.refine(cond, a, b, 64)
                kept = [(x, y) for (x, y), t in zip(pairs, truth, strict=True) if t == want]
                if r is None:
                    assert not kept, (cond, a, b)
                    continue
                for x, y in kept:
                    assert _contains(r[0], x, 64) and _contains(r[1], y, 64), (cond, a, b, x, y, r)


def _reference(code: int, a: int, b: int, bits: int) -> int | None:
    """BPF ALU semantics written out independently of the verifier's own folding."""
    m = (1 << bits) - 1
    a, b = a & m, b & m
    sa = a - (1 << bits) if a >> (bits - 1) else a
    if code in (op.BPF_LSH, op.BPF_RSH, op.BPF_ARSH) and b >= bits:
        return None  # undefined: the verifier must not assume a value
    return {op.BPF_ADD: a + b, op.BPF_SUB: a - b, op.BPF_MUL: a * b, op.BPF_AND: a & b, op.BPF_OR: a | b,
            op.BPF_XOR: a ^ b, op.BPF_LSH: a << b if b < bits else 0, op.BPF_RSH: a >> b if b < bits else 0,
            op.BPF_ARSH: sa >> b if b < bits else 0}[code] & m


_EDGES = [0, 1, 2, 3, 5, 31, 32, 33, 63, 64, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 1 << 32, (1 << 32) + 1,
          (1 << 63) - 1, 1 << 63, (1 << 64) - 1, (1 << 64) - 8]
_ALU = [op.BPF_ADD, op.BPF_SUB, op.BPF_MUL, op.BPF_AND, op.BPF_OR, op.BPF_XOR, op.BPF_LSH, op.BPF_RSH,
        op.BPF_ARSH]


@pytest.mark.parametrize("bits", [32, 64])
def test_scalar_alu_matches_reference_semantics(bits: int) -> None:
    """Constants fold to the exact result; ranges around edge values contain every result."""
    for code, a, b in itertools.product(_ALU, _EDGES, _EDGES):
        want = _reference(code, a, b, bits)
        if want is None:
            continue
        ca, cb = Scalar.const(a & ((1 << bits) - 1)), Scalar.const(b & ((1 << bits) - 1))
        r = A.scalar_alu(code, ca, cb, bits)
        assert r.is_const() and r.value == want, (code, bits, a, b, r, want)
        if code in (op.BPF_LSH, op.BPF_RSH, op.BPF_ARSH):
            continue
        lo, hi = max(a - 2, 0), min(a + 2, (1 << bits) - 1)
        ra = Scalar.urange(lo, hi) if bits == 64 else Scalar.urange(lo, hi).zext32()
        r = A.scalar_alu(code, ra, cb, bits)
        for x in range(lo, hi + 1):
            assert _contains(r, _reference(code, x, b, bits), 64), (code, bits, lo, hi, b, r)
