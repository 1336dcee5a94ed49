"""One test per kernel verifier rule, each checked against the running kernel too.

Every case is a small program with the verdict and message the kernel (Linux
6.18, kprobe program, privileged loader) gives.  ``test_rule`` checks ubpf-py's
verifier; ``test_rule_matches_kernel`` loads the same program into the kernel
(root only) so a case can never encode a rule the kernel does not have.  An
accept the kernel refuses is a safety bug: verified programs run unchecked.
"""

from __future__ import annotations

import pytest
from kernel_verdict import kernel_skip_reason, kernel_verdict
from test_verifier import MAPS, prog

from ubpf_py.obj.spec import MapSpec
from ubpf_py.verifier import verify_program

RDONLY = MapSpec("ro", 2, 4, 48, 1, flags=1 << 7)
WRONLY = MapSpec("wo", 2, 4, 48, 1, flags=1 << 8)
STACKS = MapSpec("st", 7, 4, 64, 16)
OUTER = MapSpec("outer", 12, 4, 4, 2, inner=MapSpec("inner", 2, 4, 8, 4))
SOCKMAP = MapSpec("socks", 15, 4, 4, 4)
RULE_MAPS = [*MAPS, RDONLY, WRONLY, STACKS, OUTER, SOCKMAP]


def _lookup(idx: int) -> str:
    """r0 = non-null value pointer of map ``idx`` (key 0), else return."""
    return (f"stw [%r10-8], 0\nmov %r2, %r10\nadd %r2, -8\nlddw %r1, 0xfa0000000{idx}\ncall 1\n"
            "jne %r0, 0, +2\nmov %r0, 0\nexit\n")


_UPDATE_RO = ("stw [%r10-8], 0\nmov %r2, %r10\nadd %r2, -8\nmov %r3, %r10\nadd %r3, -56\n"
              + "".join(f"stdw [%r10-{o}], 0\n" for o in range(16, 57, 8))
              + "mov %r4, 0\nlddw %r1, 0xfa00000005\ncall 2\nmov %r0, 0\nexit")
_CALLS_8 = "call local f1\nmov %r0, 0\nexit\n" + "".join(
    f"f{k}:\ncall local f{k + 1}\nexit\n" for k in range(1, 7)) + "f7:\nmov %r0, 0\nexit"
_CALLS_9 = "call local f1\nmov %r0, 0\nexit\n" + "".join(
    f"f{k}:\ncall local f{k + 1}\nexit\n" for k in range(1, 8)) + "f8:\nmov %r0, 0\nexit"
_INNER = "mov %r1, %r0\nmov %r2, %r10\nadd %r2, -8\ncall 1\njne %r0, 0, +2\nmov %r0, 0\nexit\n"
_STRTOL = ("stdw [%r10-16], 0x31\nmov %r1, %r10\nadd %r1, -16\nmov %r2, 4\nmov %r3, 0\nmov %r4, %r10\n"
           "add %r4, {res}\ncall {h}\nmov %r0, 0\nexit")
_VAR_FP = "ldxw %r2, [%r1+0]\nand %r2, {mask}\nmov %r1, %r10\nadd %r1, {base}\nadd %r1, %r2\n"

#: two paths join with r1 = fp-16 (explored first, safe) and r1 = fp-8 (unsafe: it writes at fp+0);
#: the state at the join may be pruned only if stack pointers with different offsets are told apart
_JOIN_STACK_PTRS = ("ldxw %r2, [%r1+0]\njne %r2, 0, +7\nmov %r1, %r10\nadd %r1, -16\n"
                    + "mov %r3, 0\n" * 4 + "ja +6\nmov %r1, %r10\nadd %r1, -8\n" + "mov %r3, 0\n" * 4
                    + "stdw [%r1+8], 0\nmov %r0, 0\nexit")

#: the same for map value pointers: value + 0 first (safe), then value + 24 (writes at off 32 of 32)
_JOIN_VALUE_PTRS = ("mov %r6, %r1\n" + _lookup(1) + "ldxw %r2, [%r6+0]\njne %r2, 0, +7\nmov %r1, %r0\nadd %r1, 0\n"
                    + "mov %r3, 0\n" * 4 + "ja +6\nmov %r1, %r0\nadd %r1, 24\n" + "mov %r3, 0\n" * 4
                    + "stdw [%r1+8], 0\nmov %r0, 0\nexit")

#: (name, program, None when accepted else the kernel's error line)
CASES = [
    # pruning: a checkpoint must not cover a stack pointer at another offset
    ("join_stack_pointers_differ", _JOIN_STACK_PTRS, "invalid write to stack R1 off=0 size=8"),
    ("join_map_value_pointers_differ", _JOIN_VALUE_PTRS,
     "invalid access to map value, value_size=32 off=32 size=8"),
    # map access flags (unsafe accepts before: an unchecked engine would write a read-only map)
    ("rdonly_prog_map_write", _lookup(5) + "stdw [%r0+0], 1\nmov %r0, 0\nexit",
     "write into map forbidden, value_size=48 off=0 size=8"),
    ("rdonly_prog_map_read", _lookup(5) + "ldxdw %r0, [%r0+0]\nexit", None),
    ("rdonly_prog_map_update_helper", _UPDATE_RO, "write into map forbidden"),
    ("rdonly_prog_map_helper_fills_value",
     _lookup(5) + "mov %r1, %r0\nmov %r2, 8\nmov %r3, 0\ncall 112\nmov %r0, 0\nexit",
     "write into map forbidden, value_size=48 off=0 size=8"),
    ("rodata_write", "lddw %r1, 0xfb00000003\nstw [%r1+0], 2\nmov %r0, 0\nexit",
     "write into map forbidden, value_size=8 off=0 size=4"),
    ("wronly_prog_map_read", _lookup(6) + "ldxdw %r0, [%r0+0]\nexit",
     "read from map forbidden, value_size=48 off=0 size=8"),
    ("wronly_prog_map_write", _lookup(6) + "stdw [%r0+8], 1\nmov %r0, 0\nexit", None),
    ("wronly_prog_map_helper_reads_value",
     _lookup(6) + "mov %r1, %r0\nmov %r2, 8\ncall 6\nmov %r0, 0\nexit",
     "read from map forbidden, value_size=48 off=0 size=8"),
    # helpers and map types per program type
    ("ktime_get_coarse_ns_not_for_kprobes", "call 160\nmov %r0, 0\nexit",
     "program of this type cannot use helper bpf_ktime_get_coarse_ns#160"),
    ("override_return_not_for_uprobes", "mov %r2, 0\ncall 58\nmov %r0, 0\nexit",
     "program of this type cannot use helper bpf_override_return#58"),
    ("lookup_in_stack_trace_map", _lookup(7) + "mov %r0, 0\nexit",
     "cannot pass map_type 7 into func bpf_map_lookup_elem#1"),
    # the context pointer is not known non-null: both sides of a comparison are walked
    ("ctx_compared_with_zero", "jne %r1, 0, +1\nldxdw %r0, [%r1+168]\nmov %r0, 0\nexit",
     "invalid bpf_context access off=168 size=8"),
    ("ctx_compared_with_zero_register",
     "mov %r2, 0\njeq %r1, %r2, +2\nmov %r0, 0\nexit\nldxdw %r0, [%r1+168]\nexit",
     "invalid bpf_context access off=168 size=8"),
    ("ctx_compared_with_zero_valid_access", "jeq %r1, 0, +1\nldxdw %r0, [%r1+160]\nmov %r0, 0\nexit", None),
    # stack pointer arithmetic
    ("subtract_from_stack_pointer", "mov %r1, %r10\nsub %r1, 8\nmov %r0, 0\nexit",
     "R1 subtraction from stack pointer prohibited"),
    ("subtract_register_from_stack_pointer", "mov %r1, %r10\nmov %r2, 8\nsub %r1, %r2\nmov %r0, 0\nexit",
     "R1 subtraction from stack pointer prohibited"),
    ("subtract_pointer_from_scalar", "mov %r1, 8\nsub %r1, %r10\nmov %r0, 0\nexit",
     "R1 tried to subtract pointer from scalar"),
    # call depth: 8 frames, checked on the static call graph too (recursion)
    ("eight_frames", _CALLS_8, None),
    ("nine_frames", _CALLS_9, "the call stack of 9 frames is too deep"),
    ("bounded_recursion", "mov %r1, 0\ncall local f\nmov %r0, 0\nexit\nf:\njgt %r1, 3, out\nadd %r1, 1\n"
     "call local f\nout:\nmov %r0, 0\nexit", "the call stack of 8 frames is too deep !"),
    # zero-sized and variable-offset stack accesses
    ("zero_sized_helper_access_at_r10", "mov %r1, %r10\nmov %r2, 0\nmov %r3, 0\ncall 113\nexit",
     "invalid write to stack R1 off=0 size=0"),
    ("zero_sized_helper_access_in_stack", "mov %r1, %r10\nadd %r1, -8\nmov %r2, 0\nmov %r3, 0\ncall 113\nexit",
     None),
    ("zero_sized_variable_offset_past_r10",
     "mov %r0, 0\nstxdw [%r10-16], %r0\nstxdw [%r10-8], %r0\nldxw %r1, [%r1+0]\nand %r1, 63\n"
     "add %r1, -16\nadd %r1, %r10\nmov %r2, 0\nmov %r3, 0\ncall 113\nexit",
     "invalid variable-offset write to stack R1 var_off=(0x0; 0xffffffffffffffff) off=0 size=0"),
    ("variable_offset_stack_write_misaligned", _VAR_FP.format(mask=63, base=-32) + "stdw [%r1+0], 0\n"
     "mov %r0, 0\nexit", "misaligned stack access off (0x0; 0x3f)+-32+0 size 8"),
    ("variable_offset_stack_read_aligned", _VAR_FP.format(mask=8, base=-32) + "ldxdw %r0, [%r1+0]\nexit", None),
    ("variable_offset_stack_write_out_of_bounds", _VAR_FP.format(mask=56, base=-32) + "stdw [%r1+0], 0\n"
     "mov %r0, 0\nexit", "invalid variable-offset write to stack R1 var_off=(0x0; 0x38) off=-32 size=8"),
    # scalar ids: copies through 32-bit moves and narrow spills stay linked, so a compare on
    # one decides the other and the dead branch (through uninitialised r9) is not walked
    ("linked_by_32bit_move", "call 7\nand32 %r0, 0x80000000\nmov32 %r1, %r0\nmov %r2, 0\n"
     "jne %r1, %r2, +3\njeq %r0, %r2, +2\nldxdw %r0, [%r9+0]\nexit\nmov %r0, 0\nexit", None),
    ("linked_by_32bit_spill", "call 7\nand32 %r0, 0x80000000\nstxw [%r10-8], %r0\nldxw %r1, [%r10-8]\n"
     "mov %r2, 0\njne %r1, %r2, +3\njeq %r0, %r2, +2\nldxdw %r0, [%r9+0]\nexit\nmov %r0, 0\nexit", None),
    ("linked_by_64bit_spill_32bit_fill", "call 7\nand32 %r0, 0xffffffff\nstxdw [%r10-8], %r0\n"
     "ldxw %r1, [%r10-8]\nmov %r2, 0\njne %r1, %r2, +3\njeq %r0, %r2, +2\nldxdw %r0, [%r9+0]\nexit\n"
     "mov %r0, 0\nexit", None),
    ("not_linked_when_the_fill_narrows", "call 7\nlsh %r0, 32\nadd %r0, 1\nstxdw [%r10-8], %r0\n"
     "ldxw %r1, [%r10-8]\nmov %r2, 1\njne %r1, %r2, +3\njeq %r0, %r2, +2\nldxdw %r0, [%r9+0]\nexit\n"
     "mov %r0, 0\nexit", "R9 !read_ok"),
    # bpf_strtol / bpf_strtoul: allowed for kprobe programs, result pointer = 8 aligned writable bytes
    ("strtol", _STRTOL.format(res=-8, h=105), None),
    ("strtoul", _STRTOL.format(res=-8, h=106), None),
    ("strtol_result_misaligned", _STRTOL.format(res=-12, h=105), "misaligned stack access off 0+-12+0 size 8"),
    ("strtol_result_out_of_stack", _STRTOL.format(res=-4, h=105), "invalid write to stack R4 off=-4 size=8"),
    # map-in-map: a lookup in the outer map gives the inner map, usable with map helpers
    ("map_in_map_inner_lookup", _lookup(8) + _INNER + "ldxdw %r0, [%r0+0]\nmov %r0, 0\nexit", None),
    ("map_in_map_inner_bounds", _lookup(8) + _INNER + "ldxdw %r0, [%r0+8]\nmov %r0, 0\nexit",
     "invalid access to map value, value_size=8 off=8 size=8"),
    ("map_in_map_update_from_program",
     "stw [%r10-8], 0\nstw [%r10-16], 0\nmov %r2, %r10\nadd %r2, -8\nmov %r3, %r10\nadd %r3, -16\n"
     "mov %r4, 0\nlddw %r1, 0xfa00000008\ncall 2\nmov %r0, 0\nexit",
     "cannot pass map_type 12 into func bpf_map_update_elem#2"),
    # byte swaps read only their destination (BPF_TO_BE shares the BPF_X bit)
    ("be16_reads_no_source", "mov %r2, 0\nbe16 %r2\njne %r2, 0, +2\nmov %r1, %r10\nadd %r1, %r2\n"
     "mov %r0, 0\nexit", None),
    # signed division and modulo (off=1) are valid ALU forms
    ("signed_division", "mov %r0, -7\nsdiv %r0, 2\nsmod %r0, 3\nexit", None),
    # cmpxchg compares with r0: it must be set
    ("cmpxchg_reads_r0", "stdw [%r10-8], 0\nmov %r2, 1\nmov %r1, %r10\nadd %r1, -8\n"
     "lock cmpxchg [%r1+0], %r2\nmov %r0, 0\nexit", "R0 !read_ok"),
    # a ringbuf record is gone once submitted: copies of its pointer too
    ("ringbuf_copy_used_after_submit",
     "lddw %r1, 0xfa00000002\nmov %r2, 8\nmov %r3, 0\ncall 131\njne %r0, 0, +2\nmov %r0, 0\nexit\n"
     "mov %r6, %r0\nmov %r1, %r0\nmov %r2, 0\ncall 132\nstdw [%r6+0], 1\nmov %r0, 0\nexit",
     "R6 invalid mem access 'scalar'"),
    ("variable_offset_odd_misaligned", _VAR_FP.format(mask=1, base=-32) + "stdw [%r1+0], 0\nmov %r0, 0\nexit",
     "misaligned stack access off (0x0; 0x1)+-32+0 size 8"),
    # map types the kernel restricts per program type (sockmap changes are not for kprobes)
    ("sockmap_delete", "stw [%r10-8], 0\nmov %r2, %r10\nadd %r2, -8\nlddw %r1, 0xfa00000009\ncall 3\n"
     "mov %r0, 0\nexit", "cannot update sockmap in this context"),
    # helper memory arguments take memory pointers only
    ("ctx_as_helper_memory", "mov %r2, 8\nmov %r3, 0\ncall 113\nmov %r0, 0\nexit",
     "R1 type=ctx expected=fp, pkt, pkt_meta, map_key, map_value, mem, ringbuf_mem, buf, trusted_ptr_"),
    # shifts by the register width or more give an unknown result (not the masked count)
    ("oversized_shift_is_unknown",
     "mov %r1, 1\nmov %r2, 70\nlsh %r1, %r2\nmov %r0, %r10\nadd %r0, -8\nadd %r0, %r1\nstdw [%r0+0], 0\n"
     "mov %r0, 0\nexit", "math between fp pointer and register with unbounded min value is not allowed"),
    ("oversized_shift32_is_unknown",
     "mov %r1, 1\nmov %r2, 33\nlsh32 %r1, %r2\nmov %r0, %r10\nadd %r0, -8\nadd %r0, %r1\nstdw [%r0+0], 0\n"
     "mov %r0, 0\nexit", "math between fp pointer and register with unbounded min value is not allowed"),
]


@pytest.mark.parametrize(("name", "text", "kernel_error"), CASES, ids=[c[0] for c in CASES])
def test_rule(name: str, text: str, kernel_error: str | None) -> None:
    r = verify_program(prog(text, name), RULE_MAPS, mode="warn")
    if kernel_error is None:
        assert r.ok, r.log
    else:
        assert not r.ok, f"accepted; the kernel says: {kernel_error}\n{r.log}"
        assert kernel_error in r.error, (r.error, kernel_error)


@pytest.mark.kernel
@pytest.mark.parametrize(("name", "text", "kernel_error"), CASES, ids=[c[0] for c in CASES])
def test_rule_matches_kernel(name: str, text: str, kernel_error: str | None) -> None:
    reason = kernel_skip_reason()
    if reason:
        pytest.skip(reason)
    ok, error, log = kernel_verdict(prog(text, name), RULE_MAPS)
    if kernel_error is None:
        assert ok, log
    else:
        assert not ok and error == kernel_error, log


#: BPF_END (le/be) with a reserved field set, as (src, off, imm): each alone is refused
END_RESERVED = [(1, 0, 16), (0, 1, 32), (0, 0, 24)]


def _end_program(src: int, off: int, imm: int):
    from ubpf_py.isa.instruction import Instruction
    from ubpf_py.obj.spec import ProgramSpec

    insns = [Instruction(0xB7, 0, 0, 0, 0), Instruction(0xD4, 0, src, off, imm), Instruction(0x95)]
    return ProgramSpec("end", "uprobe", "uprobe", insns)


@pytest.mark.parametrize(("src", "off", "imm"), END_RESERVED)
def test_end_reserved_fields(src: int, off: int, imm: int) -> None:
    r = verify_program(_end_program(src, off, imm), RULE_MAPS, mode="warn")
    assert not r.ok and r.error == "BPF_END uses reserved fields", r.error
    assert verify_program(_end_program(0, 0, 16), RULE_MAPS, mode="warn").ok


@pytest.mark.kernel
@pytest.mark.parametrize(("src", "off", "imm"), END_RESERVED)
def test_end_reserved_fields_match_kernel(src: int, off: int, imm: int) -> None:
    reason = kernel_skip_reason()
    if reason:
        pytest.skip(reason)
    ours = verify_program(_end_program(src, off, imm), RULE_MAPS, mode="warn")
    ok, error, log = kernel_verdict(_end_program(src, off, imm), RULE_MAPS)
    assert (ok, error) == (ours.ok, ours.error), log
