"""Precision and pruning: tests that fail if precision tracking is weakened.

Each program is safe on the path the verifier walks first and unsafe on a second
path that reaches the same prune point with a different constant.  A verifier
that prunes the second path as "the same" (treats the scalar as imprecise, drops a
spilled slot, forgets a loop counter) accepts it.  Every test also runs the
verifier with precision switched off and checks that the program is then wrongly
accepted, so the test really depends on precision; the kernel's verdict is
checked when root.  ``verifier_mutations.join_programs`` generates more of these
for the kernel differential campaign (``test_join_programs_match_kernel``).
"""

from __future__ import annotations

import pytest
import verifier_mutations as vm
from kernel_verdict import kernel_skip_reason, kernel_verdict
from test_verifier import MAPS, prog

from ubpf_py.verifier import checker, verify_program

SPILL_VS_MISC = "\n".join(
    ["call 7", "mov %r7, %r0", "mov %r9, 0", "jset %r7, 1, alt", "mov %r6, -8", "stxdw [%r10-24], %r6"]
    + ["add %r9, 1"] * 6 + ["ja join",
       "alt:", "mov %r1, %r10", "add %r1, -24", "mov %r2, 8", "mov %r3, 0", "call 113",
       "join:", "ldxdw %r6, [%r10-24]", "mov %r1, %r10", "add %r1, %r6", "stdw [%r1+0], 0", "mov %r0, 0", "exit"])

#: one path stores the array key 0, the other 100 (out of range for map 1, 4 entries): the lookup
#: cannot fail only for the first, so the key's stack slot must be live and precise at the join
CONST_KEY = "\n".join(
    ["call 7", "mov %r7, %r0", "mov %r9, 0", "jset %r7, 1, alt", "stw [%r10-8], 0"] + ["add %r9, 1"] * 6
    + ["ja join", "alt:", "stw [%r10-8], 100", "join:", "mov %r2, %r10", "add %r2, -8",
       "lddw %r1, 0xfa00000001", "call 1", "ldxdw %r0, [%r0+0]", "mov %r0, 0", "exit"])

#: name -> (program, the kernel's error line)
CASES = {
    # one path's constant (-608) must survive the join where the other (-8) was seen first
    "join_register": (vm.join_program(-8, -608, "none", "write"), "invalid write to stack R1 off=-608 size=8"),
    # the same through a spill and fill at fp-24
    "join_spill": (vm.join_program(-8, -608, "spill64", "write"), "invalid write to stack R1 off=-608 size=8"),
    # the same through a register copy, and a helper writing at the offset
    "join_copy_helper": (vm.join_program(-16, -520, "mov", "helper"),
                         "invalid write to stack R1 off=-520 size=8"),
    # the spill is filled (or made) through a stack pointer other than r10
    "join_fill_via_pointer": (vm.join_program(-8, -608, "fill_via_pointer", "write"),
                              "invalid write to stack R1 off=-608 size=8"),
    "join_spill_via_pointer": (vm.join_program(-8, -608, "spill_via_pointer", "write"),
                               "invalid write to stack R1 off=-608 size=8"),
    # one path spills -8 at fp-24, the other has a helper fill it (unknown bytes): a precise spill
    # never covers unknown bytes (an imprecise one does, as in the kernel's stacksafe)
    "join_spill_vs_helper_bytes": (SPILL_VS_MISC, "math between fp pointer and register with unbounded min "
                                                  "value is not allowed"),
    "join_const_map_key": (CONST_KEY, "R0 invalid mem access 'map_value_or_null'"),
    # a bounded loop between the join and the use: states inside the loop must keep r6 apart
    "join_loop": (vm.join_program(-8, 8, "loop", "read"), "invalid read from stack R1 off=8 size=8"),
    # the loop counter is the offset: iterations differ only in r1, the last one is out of the stack
    "loop_counter_offset": ("mov %r1, -8\nloop:\nmov %r2, %r10\nadd %r2, %r1\nstdw [%r2+0], 0\n"
                            "add %r1, -8\njsgt %r1, -528, loop\nmov %r0, 0\nexit",
                            "invalid write to stack R2 off=-520 size=8"),
}


def _verify(text: str) -> object:
    return verify_program(prog(text), MAPS, mode="warn", time_budget=20)


@pytest.mark.parametrize("name", sorted(CASES))
def test_precision_keeps_the_unsafe_path(name: str) -> None:
    text, kernel_error = CASES[name]
    r = _verify(text)
    assert not r.ok, f"accepted:\n{r.log}"
    assert r.error == kernel_error, r.error


@pytest.mark.parametrize("name", sorted(set(CASES) - {"loop_counter_offset"}))
def test_weakened_precision_would_accept(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same programs pass when no scalar is precise: the tests above depend on precision.
    (The loop case does not: a loop is unrolled, never pruned against its own open iteration.)"""
    monkeypatch.setattr(checker, "precision_demand", lambda insns, *a, **k: [0] * len(insns))
    assert _verify(CASES[name][0]).ok


@pytest.mark.parametrize("weaken", ["key_not_precise", "helper_reads_nothing"])
def test_const_key_slot_stays_live_and_precise(weaken: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The constant-key lookup's stack read keeps the slot live (observed helper reads) and
    precise (``precise_reads``); dropping either accepts the unsafe path."""
    if weaken == "key_not_precise":
        monkeypatch.setattr(checker.Checker, "note_precise_stack", lambda *a: None)
    else:
        monkeypatch.setattr(checker.Checker, "note_helper_stack_read", lambda *a: None)
    assert _verify(CONST_KEY).ok


def test_precise_spill_does_not_cover_unknown_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the spill/unknown-bytes rule applied to precise spills too, the unsafe path is pruned."""
    from ubpf_py.verifier import state

    monkeypatch.setattr(state, "_imprecise_spill_vs_misc", lambda *a: True)
    assert _verify(SPILL_VS_MISC).ok


@pytest.mark.parametrize("name", ["join_fill_via_pointer", "join_spill_via_pointer"])
def test_stack_pointer_accesses_keep_slots_precise(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only accesses the walk saw go through a stack pointer make stack slots precise; a
    verifier that forgot them (no access reaches the stack) would accept these."""
    from ubpf_py.verifier import structure

    real = structure.precision_demand
    monkeypatch.setattr(checker, "precision_demand",
                        lambda insns, cfg, helpers, decided=None, stack_access=None, precise=None, **kw:
                        real(insns, cfg, helpers, decided, set(), precise))
    assert _verify(CASES[name][0]).ok


@pytest.mark.kernel
@pytest.mark.parametrize("name", sorted(CASES))
def test_precision_cases_match_kernel(name: str) -> None:
    reason = kernel_skip_reason()
    if reason:
        pytest.skip(reason)
    ok, error, log = kernel_verdict(prog(CASES[name][0]), MAPS)
    assert not ok and error == CASES[name][1], log


def test_join_programs_pruned_and_safe_both_ways() -> None:
    """Safe joins are accepted (pruning does not reject what is safe) and prune."""
    r = _verify(vm.join_program(-8, -16, "spill64", "write"))
    assert r.ok, r.log


@pytest.mark.kernel
def test_join_programs_match_kernel() -> None:
    reason = kernel_skip_reason()
    if reason:
        pytest.skip(reason)
    res = vm.run_join_campaign(80, 20261203)
    wrong = [(o.mutant.detail, o.ours, o.our_error, o.kernel_error) for o in res.outcomes if o.ours != o.kernel]
    assert not wrong, wrong
    assert any(o.kernel for o in res.outcomes) and any(not o.kernel for o in res.outcomes)
