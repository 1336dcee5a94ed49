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
_UNBOUNDED = "math between fp pointer and register with unbounded min value is not allowed"
CASES = {
    "prune_not_across_call_depths": (CROSS_DEPTH, "R3 !read_ok"),
    "prune_not_across_call_sites": (CROSS_SITE, "R3 !read_ok"),
    # 2**24 paths: accepted only because joins prune (no pruning: the 1M-instruction limit)
    "diamond_chain_prunes": (_diamonds(24), ""),
    # a tail call with a reserved ringbuf record outstanding; the program would release it if the
    # tail call returned, so only the call's own check refuses it (calls.py#20: that raise dropped)
    "tail_call_with_reference": ("\n".join(
        ["mov %r9, %r1", "lddw %r1, 0xfa00000002", "mov %r2, 8", "mov %r3, 0", "call 131", "jeq %r0, 0, out",
         "mov %r6, %r0", "mov %r1, %r9", "lddw %r2, 0xfa00000004", "mov %r3, 0", "call 12",
         "mov %r1, %r6", "mov %r2, 0", "call 132", "out:", "mov %r0, 0", "exit"]),
        "Unreleased reference id=2 alloc_insn=5"),
    # a null check on a lookup result also clears its copy spilled before the check
    # (checker.py#222: the spilled copies matched by a different id)
    "spilled_copy_checked_non_null": ("\n".join(
        ["stdw [%r10-8], 0", "mov %r2, %r10", "add %r2, -8", "lddw %r1, 0xfa00000000", "call 1",
         "stxdw [%r10-16], %r0", "jeq %r0, 0, out", "ldxdw %r1, [%r10-16]", "ldxdw %r0, [%r1+0]", "out:",
         "mov %r0, 0", "exit"]), ""),
    # r0 in [-2**31, 2**31]; r0 != 0x80000000 (a 64-bit constant) trims smax, not smin, so the
    # branch on r0 == -2**31 stays possible (alu.py#178: the constant's signed value taken as 32-bit)
    "exclude_64bit_constant_from_range": ("\n".join(
        ["call 7", "mov %r6, %r0", "and %r6, 1", "call 7", "lsh %r0, 32", "arsh %r0, 32", "add %r0, %r6",
         "lddw %r2, 0x80000000", "jeq %r0, %r2, out", "jsle %r0, -2147483648, bad", "out:", "mov %r0, 0", "exit",
         "bad:", "stdw [%r10+0], 0", "mov %r0, 0", "exit"]), "invalid write to stack R10 off=0 size=8"),
    # a map value pointer plus an index in [-4, 3]: the kernel's own reason (memory.py#53)
    "negative_map_value_index": ("\n".join(
        ["stw [%r10-4], 0", "mov %r2, %r10", "add %r2, -4", "lddw %r1, 0xfa00000001", "call 1", "jeq %r0, 0, out",
         "mov %r6, %r0", "call 7", "and %r0, 7", "sub %r0, 4", "add %r6, %r0", "ldxb %r1, [%r6+0]", "out:",
         "mov %r0, 0", "exit"]),
        "R6 min value is negative, either use unsigned index or do a if (index >=0) check."),
    # a complete lddw in the last two slots: the program lacks a final exit, not a whole lddw
    # (structure.py#464: the lddw bound checked one slot too far)
    "lddw_in_the_last_two_slots": ("mov %r0, 0\nexit\nlddw %r1, 5", "last insn is not an exit or jmp"),
    # a constant of 2**29 added to a pointer: the kernel's bound is exclusive (arith.py#95)
    "pointer_plus_max_var_off": ("mov %r1, %r10\nadd %r1, 0x20000000\nmov %r0, 0\nexit",
                                 "math between fp pointer and 536870912 is not allowed"),
    "pointer_plus_max_var_off_minus_1": ("mov %r1, %r10\nadd %r1, 0x1fffffff\nmov %r0, 0\nexit", ""),
    # the kernel (6.18) makes every div/mod result unknown, constants included (arith.py folded
    # them and accepted these; found through the surviving mutant arith.py#134)
    "div_of_constants_is_unknown": (
        "mov %r1, 16\nmov %r2, 2\ndiv %r1, %r2\nneg %r1\nmov %r3, %r10\nadd %r3, %r1\nstdw [%r3+0], 0\n"
        "mov %r0, 0\nexit", _UNBOUNDED),
    "sdiv_of_constants_is_unknown": (
        "mov %r1, 32\nmov %r2, -2\nsdiv %r1, %r2\nmov %r3, %r10\nadd %r3, %r1\nstdw [%r3+0], 0\n"
        "mov %r0, 0\nexit", _UNBOUNDED),
    "mod_imm_of_constant_is_unknown": (
        "mov %r1, 16\nmod %r1, 7\nneg %r1\nmov %r3, %r10\nadd %r3, %r1\nstb [%r3+0], 0\nmov %r0, 0\nexit",
        _UNBOUNDED),
    # the CI kernel (6.18) gives kprobe programs no private stacks: every frame counts toward the
    # combined 512 bytes (main 504 -> 512, f 1 -> 16); found judging the mutant checker.py#152
    "combined_stack_counts_every_frame": (
        "stb [%r10-504], 0\ncall local f\nmov %r0, 0\nexit\nf:\nstb [%r10-1], 0\nmov %r0, 0\nexit",
        "combined stack size of 2 calls is 528. Too large"),
    # without BTF func_info a subprogram may not tail call (check_abnormal_return), even unreached
    "tail_call_in_subprog_without_btf": (
        "mov %r6, %r1\ncall local f\nmov %r0, 0\nexit\nf:\nlddw %r2, 0xfa00000004\nmov %r3, 0\n"
        "call 12\nmov %r0, 0\nexit", "tail_call is not allowed in subprogs without BTF"),
}

_JUMPS = "call 7\nmov %r8, %r0\njeq %r8, 11, +0\njeq %r8, 12, +0\njeq %r8, 13, +0\n" + "mov %r7, 0\n" * 8
#: -16 spilled on the path walked first, -600 on the other; both reach j, then two more jumps
_JOIN = (_JUMPS + "jeq %r8, 0, b\nmov %r6, -16\nstxdw [%r10-24], %r6\nja j\nb:\nmov %r6, -600\n"
         "stxdw [%r10-24], %r6\nj:\n" + "mov %r7, 0\n" * 4 + "jeq %r8, 14, +0\njeq %r8, 15, +0\n")
#: the fetched value as an offset from the frame pointer
_USE = "mov %r1, %r10\nadd %r1, %r6\nstdw [%r1+0], 0\nmov %r0, 0\nexit"

#: an atomic fetch from a stack slot reads it as a load would (check_atomic_rmw calls
#: check_mem_access with the fetched register as the destination): a spilled register comes back
#: whole, and the slot then holds an unknown value.  ubpf-py returned an unknown scalar (false
#: rejects); the precision demand already treats an atomic on the stack as reading every slot.
_FETCH_CASES = {
    "atomic_fetch_of_spilled_pointer": (
        "stxdw [%r10-24], %r1\nmov %r3, 0\nlock fetch add [%r10-24], %r3\nldxdw %r0, [%r3+0]\n"
        "mov %r0, 0\nexit", ""),
    "atomic_fetch_of_spilled_constant": (
        "mov %r6, -16\nstxdw [%r10-24], %r6\nmov %r6, 0\nlock fetch add [%r10-24], %r6\nmov %r1, %r10\n"
        "add %r1, %r6\nstdw [%r1+0], 0\nmov %r0, 0\nexit", ""),
    "atomic_xchg_of_spilled_pointer_via_r2": (
        "stxdw [%r10-8], %r1\nmov %r2, %r10\nadd %r2, -8\nmov %r3, 0\nlock xchg [%r2+0], %r3\n"
        "ldxdw %r0, [%r3+0]\nmov %r0, 0\nexit", ""),
    "atomic_cmpxchg_of_spilled_pointer": (
        "stxdw [%r10-8], %r1\nmov %r3, 0\nmov %r0, 0\nlock cmpxchg [%r10-8], %r3\nldxdw %r0, [%r0+0]\n"
        "mov %r0, 0\nexit", ""),
    # the slot holds an unknown value after the fetch: a second fetch gets no constant
    "atomic_fetch_twice_is_unknown": (
        "mov %r6, -16\nstxdw [%r10-24], %r6\nmov %r6, 0\nlock fetch add [%r10-24], %r6\n"
        "lock fetch add [%r10-24], %r6\nmov %r1, %r10\nadd %r1, %r6\nstdw [%r1+0], 0\nmov %r0, 0\nexit",
        _UNBOUNDED),
    "atomic_fetch32_of_spilled_pointer": (
        "stxdw [%r10-24], %r1\nmov %r3, 0\nlock fetch add32 [%r10-24], %r3\nmov %r0, 0\nexit",
        "invalid size of register fill"),
    "atomic_fetch32_of_spilled_constant_truncates": (
        "mov %r6, -16\nstxdw [%r10-24], %r6\nmov %r6, 0\nlock fetch add32 [%r10-24], %r6\nmov %r1, %r10\n"
        "add %r1, %r6\nstdw [%r1+0], 0\nmov %r0, 0\nexit",
        "math between fp pointer and 4294967280 is not allowed"),
    # a reserved ringbuf record taken back out of the stack is still the reference to release
    "atomic_xchg_of_spilled_reference": (
        "lddw %r1, 0xfa00000002\nmov %r2, 8\nmov %r3, 0\ncall 131\njeq %r0, 0, out\nstxdw [%r10-8], %r0\n"
        "mov %r6, 0\nlock xchg [%r10-8], %r6\nmov %r1, %r6\nmov %r2, 0\ncall 132\nout:\nmov %r0, 0\nexit", ""),
    # two paths spill different constants and join before the fetch, far enough apart for a
    # checkpoint at the join: pruning there must not take -600 for -16 (the fetched value is
    # precise; with the atomic's stack demand dropped from precision_demand this was accepted)
    "atomic_fetch_after_join_is_precise": (_JOIN + "mov %r6, 0\nlock fetch add [%r10-24], %r6\n" + _USE,
                                           "invalid write to stack R1 off=-600 size=8"),
    "atomic_fetch_after_join_via_r2": (
        _JOIN + "mov %r2, %r10\nadd %r2, -24\nmov %r6, 0\nlock fetch add [%r2+0], %r6\n" + _USE,
        "invalid write to stack R1 off=-600 size=8"),
}
CASES.update(_FETCH_CASES)


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


def test_empty_program_is_refused_not_crashed() -> None:
    """No instructions: a one-line refusal (the kernel refuses insn_cnt 0 with EINVAL), never a
    traceback from the later passes (structure.py#20: the raise dropped)."""
    from ubpf_py.obj.spec import ProgramSpec

    r = verify_program(ProgramSpec("e", "uprobe", "uprobe", []), [], mode="warn")
    assert not r.ok and r.error == "empty program"


def test_tnum_lshift_contains_every_result() -> None:
    """Soundness of the shift on every 3-bit tnum: each concrete ``(x << s) mod 2**3`` is a member
    (tnum.py#138: the result kept a bit past the width, a value no register can hold)."""
    from ubpf_py.verifier import tnum as tn

    for v in range(8):
        for m in range(8):
            if v & m:
                continue
            a = tn.Tnum(v, m)
            for s in range(4):
                r = tn.lshift(a, s, 3)
                for x in (x for x in range(8) if a.has(x)):
                    assert r.has((x << s) & 7), (a, s, x, r)
