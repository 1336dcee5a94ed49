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
