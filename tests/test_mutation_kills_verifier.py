"""Verifier programs written to kill mutants that survived ``benchmarks/mutation_score.py``.

Each case is a behaviour the kernel has and the suite did not check: the
expected verdict is the kernel's (checked against the running kernel when root),
never a detail of ubpf-py's implementation.  The mutant each case was written
for is named in its comment (``path#index`` as the script names it, at the
commit that added the case).
"""

from __future__ import annotations

import pytest
from kernel_verdict import kernel_skip_reason, kernel_verdict
from test_verifier import MAPS, prog

from ubpf_py.verifier import verify_program


def _diamonds(n: int) -> str:
    """``n`` if/else diamonds in a row on bits of a random number; 2**n paths, all safe."""
    lines = ["call 7", "mov %r6, %r0", "mov %r7, 0"]
    for i in range(n):
        lines += [f"jset %r6, {1 << i}, alt{i}", "add %r7, 1", f"ja join{i}", f"alt{i}:", "add %r7, 2", f"join{i}:"]
    return "\n".join([*lines, "mov %r0, 0", "exit"])


_PAD = ["mov %r2, 0"] * 8
#: f is verified first from main (2 frames, the path finishes), then from g (3 frames) where the
#: code after the call reads r3, which the call clobbered: a state at a join inside f must not
#: cover one with another call stack (state.py#37: frame counts differing counted as covered)
CROSS_DEPTH = "\n".join(
    ["call 7", "jeq %r0, 0, viag", "call local f", "mov %r0, 0", "exit",
     "viag:", "call local g", "mov %r0, 0", "exit",
     "f:", *_PAD, "call 7", "jeq %r0, 0, mid", "mov %r0, 1", "mid:", "jeq %r0, 1, out", "mov %r0, 2", "out:", "exit",
     "g:", "call local f", "mov %r0, %r3", "exit"])

#: the same with one call depth and two call sites: returning to the second site must be verified
#: (state.py#76/#77: a different call site counted as covered)
CROSS_SITE = "\n".join(
    ["call 7", "jeq %r0, 0, other", "call local f", "mov %r0, 0", "exit",
     "other:", "call local f", "mov %r0, %r3", "exit",
     "f:", *_PAD, "call 7", "jeq %r0, 0, mid", "mov %r0, 1", "mid:", "jeq %r0, 1, out", "mov %r0, 2", "out:", "exit"])

#: name -> (program, the kernel's error line or "" when the kernel accepts)
CASES = {
    "prune_not_across_call_depths": (CROSS_DEPTH, "R3 !read_ok"),
    "prune_not_across_call_sites": (CROSS_SITE, "R3 !read_ok"),
    # 2**24 paths: accepted only because joins prune (no pruning: the 1M-instruction limit)
    "diamond_chain_prunes": (_diamonds(24), ""),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_verdict(name: str) -> None:
    text, kernel_error = CASES[name]
    r = verify_program(prog(text), MAPS, mode="warn", time_budget=10)
    assert r.ok == (not kernel_error), r.log
    assert r.error == kernel_error, r.log


@pytest.mark.kernel
@pytest.mark.parametrize("name", sorted(CASES))
def test_kernel_agrees(name: str) -> None:
    reason = kernel_skip_reason()
    if reason:
        pytest.skip(reason)
    text, kernel_error = CASES[name]
    ok, error, log = kernel_verdict(prog(text), MAPS)
    assert (ok, error) == (not kernel_error, kernel_error), log
