"""Pointer members of kernel structs that point to no struct (``int __user *clear_child_tid``,
``void *stack``, function pointers): Linux 6.17+ loads them as ``rdonly_untrusted_mem``
(PTR_TO_MEM | MEM_RDONLY | PTR_UNTRUSTED), a pointer that may be loaded through at any offset
and nothing else; ubpf-py took them for scalars (false rejects, found comparing sleepable
programs with the kernel).  Every case's verdict and first error line equal the running
kernel's, sleepable and not.  At run time no such object exists here: loads through the
pointer read 0, and the loader says so.
"""

from __future__ import annotations

import dataclasses

import pytest
from kernel_verdict import kernel_skip_reason, kernel_verdict
from test_verifier import MAPS, prog

from ubpf_py.obj.btf import KIND_STRUCT, load_kernel_btf
from ubpf_py.verifier import verify_program

BTF = load_kernel_btf()
pytestmark = pytest.mark.skipif(BTF is None, reason="needs the kernel's BTF (/sys/kernel/btf/vmlinux)")

_UM = "rdonly_untrusted_mem"


def _off(struct: str, field: str) -> int:
    return BTF.member(BTF.find(struct, KIND_STRUCT), field)[1] // 8


def _cases() -> list[tuple[str, str, str]]:
    if BTF is None:
        return []
    ctid, stack = _off("task_struct", "clear_child_tid"), _off("task_struct", "stack")
    fn = _off("task_struct", "restart_block") + _off("restart_block", "fn")
    load = f"call 158\nldxdw %r1, [%r0+{ctid}]\n"
    return [
        ("load_through_int_ptr", load + "ldxw %r0, [%r1+0]\nexit", ""),
        ("load_through_void_ptr", f"call 158\nldxdw %r1, [%r0+{stack}]\nldxdw %r0, [%r1+4096]\nexit", ""),
        ("load_through_function_ptr", f"call 158\nldxdw %r1, [%r0+{fn}]\nldxdw %r0, [%r1+0]\nexit", ""),
        ("negative_offset", load + "ldxb %r0, [%r1-8]\nexit", ""),
        ("sign_extending_load", load + "ldxsw %r0, [%r1+0]\nexit", ""),
        # offsets are not tracked: any arithmetic leaves the pointer as it was
        ("unbounded_variable_offset", load + "mov %r6, %r1\ncall 7\nadd %r6, %r0\nldxb %r0, [%r6+0]\nexit", ""),
        ("multiplied", load + "mul %r1, 2\nldxb %r0, [%r1+0]\nexit", ""),
        ("scalar_plus_pointer", load + "mov %r2, 5\nadd %r2, %r1\nldxb %r0, [%r2+0]\nexit", ""),
        ("spilled_and_filled", load + "stxdw [%r10-8], %r1\nldxdw %r2, [%r10-8]\nldxb %r0, [%r2+0]\nexit", ""),
        ("loaded_value_is_a_scalar", load + "ldxdw %r1, [%r1+0]\nldxdw %r0, [%r1+0]\nexit",
         "R1 invalid mem access 'scalar'"),
        ("may_be_null", load + "jeq %r1, 0, +2\nmov %r0, 0\nexit\nstdw [%r10+8], 0\nmov %r0, 0\nexit",
         "invalid write to stack R10 off=8 size=8"),
        ("store", load + "stw [%r1+0], 1\nmov %r0, 0\nexit", f"R1 cannot write into {_UM}"),
        ("atomic", load + "mov %r2, 1\nlock add [%r1+0], %r2\nmov %r0, 0\nexit", f"R1 cannot write into {_UM}"),
        ("alu32", load + "add32 %r1, 8\nmov %r0, 0\nexit", "R1 32-bit pointer arithmetic prohibited"),
        ("pointer_plus_pointer", load + "add %r1, %r1\nmov %r0, 0\nexit", "R1 pointer += pointer prohibited"),
        ("narrow_fill", load + "stxdw [%r10-8], %r1\nldxw %r2, [%r10-8]\nmov %r0, 0\nexit",
         "invalid size of register fill"),
        ("helper_memory_argument", load + "mov %r2, %r1\nlddw %r1, 0xfa00000002\nmov %r3, 8\nmov %r4, 0\n"
         "call 130\nmov %r0, 0\nexit",
         f"R2 type={_UM} expected=fp, pkt, pkt_meta, map_key, map_value, mem, ringbuf_mem, buf, trusted_ptr_"),
        ("helper_task_argument", load + "call 175\nmov %r0, 0\nexit",
         f"R1 type={_UM} expected=ptr_, trusted_ptr_, rcu_ptr_"),
        ("probe_read_source", load + "mov %r3, %r1\nmov %r1, %r10\nadd %r1, -8\nmov %r2, 8\ncall 113\n"
         "mov %r0, 0\nexit", ""),
    ]


CASES = _cases()


@pytest.mark.parametrize("name,text,error", CASES, ids=[c[0] for c in CASES])
def test_untyped_kernel_pointer_like_the_kernel(name: str, text: str, error: str) -> None:
    kernel = kernel_skip_reason() is None
    for sleepable in (False, True):
        p = dataclasses.replace(prog(text), sleepable=sleepable)
        r = verify_program(p, MAPS, mode="warn", time_budget=10)
        assert (r.ok, r.error) == (not error, error), (sleepable, r.log)
        if kernel:
            assert kernel_verdict(p, MAPS)[:2] == (r.ok, r.error), sleepable


def test_loads_through_it_read_zero_and_are_named() -> None:
    ctid = _off("task_struct", "clear_child_tid")
    r = verify_program(prog(f"call 158\nldxdw %r1, [%r0+{ctid}]\nmov %r2, %r1\nadd %r2, 4\n"
                            "ldxw %r0, [%r2+0]\nexit"), MAPS, mode="warn")
    assert r.ok, r.log
    assert set(r.rewrites) == {4} and (r.rewrites[4].opcode, r.rewrites[4].dst, r.rewrites[4].imm) == (0xB7, 0, 0)
    assert any("insn 4 reads memory through a 'int *' field directly" in n for n in r.notes), r.notes
