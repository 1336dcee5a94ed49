"""Helpers taking a ``struct task_struct *`` (ARG_PTR_TO_BTF_ID): bpf_task_pt_regs and
bpf_get_task_stack, verified as the kernel does, sleepable and not (a task loaded from another
is RCU-trusted only outside sleepable programs).  Every case's verdict and first error line is
checked against the running kernel's.
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

_TASK = "expected=ptr_, trusted_ptr_, rcu_ptr_"


def _off(struct: str, field: str) -> int:
    return BTF.member(BTF.find(struct, KIND_STRUCT), field)[1] // 8


def _cases() -> list[tuple[str, str, str, str]]:
    """(name, program, kernel's error when not sleepable, when sleepable)."""
    if BTF is None:
        return []
    ip, rparent, leader = _off("pt_regs", "ip"), _off("task_struct", "real_parent"), \
        _off("task_struct", "group_leader")
    regs = "call 158\nmov %r1, %r0\ncall 175\n"
    buf = "mov %r2, %r10\nadd %r2, -64\nmov %r3, 64\n"
    untrusted = f"R1 type=untrusted_ptr_ {_TASK}"
    return [
        ("pt_regs_ip", regs + f"ldxdw %r0, [%r0+{ip}]\nexit", "", ""),
        ("pt_regs_cs_union", regs + "ldxdw %r0, [%r0+136]\nexit", "", ""),
        ("pt_regs_returned", regs + "exit", "", ""),
        # a plain PTR_TO_BTF_ID may be NULL: both sides are walked
        ("pt_regs_may_be_null", regs + "jeq %r0, 0, +2\nmov %r0, 0\nexit\nstdw [%r10+8], 0\nmov %r0, 0\nexit",
         "invalid write to stack R10 off=8 size=8", "invalid write to stack R10 off=8 size=8"),
        ("pt_regs_beyond", regs + "ldxdw %r0, [%r0+168]\nexit",
         "access beyond struct pt_regs at off 168 size 8", "access beyond struct pt_regs at off 168 size 8"),
        ("pt_regs_store", regs + "stdw [%r0+0], 1\nmov %r0, 0\nexit", "only read is supported",
         "only read is supported"),
        ("pt_regs_probe_read_source", regs + "mov %r3, %r0\nmov %r1, %r10\nadd %r1, -8\nmov %r2, 8\ncall 113\n"
         "mov %r0, 0\nexit", "", ""),
        ("pt_regs_of_pt_regs", regs + "mov %r1, %r0\ncall 175\nmov %r0, 0\nexit",
         "R1 is of type pt_regs but task_struct is expected", "R1 is of type pt_regs but task_struct is expected"),
        ("pt_regs_of_scalar", "mov %r1, 0\ncall 175\nmov %r0, 0\nexit", f"R1 type=scalar {_TASK}",
         f"R1 type=scalar {_TASK}"),
        ("pt_regs_of_ctx", "call 175\nmov %r0, 0\nexit", f"R1 type=ctx {_TASK}", f"R1 type=ctx {_TASK}"),
        ("pt_regs_of_real_parent", f"call 158\nldxdw %r1, [%r0+{rparent}]\ncall 175\nldxdw %r0, [%r0+{ip}]\nexit",
         "", untrusted),
        ("pt_regs_of_group_leader", f"call 158\nldxdw %r1, [%r0+{leader}]\ncall 175\nmov %r0, 0\nexit",
         "", untrusted),
        ("task_stack", "call 158\nmov %r1, %r0\n" + buf + "mov %r4, 256\ncall 141\nmov %r0, 0\nexit", "", ""),
        # the result is at most the buffer's size (do_refine_retval_range), or a negative error
        ("task_stack_result_bounded", "call 158\nmov %r1, %r0\n" + buf + "mov %r4, 256\ncall 141\n"
         "jslt %r0, 1, +4\nmov %r1, %r10\nadd %r1, -65\nadd %r1, %r0\nstb [%r1+0], 0\nmov %r0, 0\nexit", "", ""),
        ("task_stack_result_unchecked", "call 158\nmov %r1, %r0\n" + buf + "mov %r4, 256\ncall 141\n"
         "mov %r1, %r10\nadd %r1, %r0\nstb [%r1-1], 0\nmov %r0, 0\nexit",
         "invalid variable-offset write to stack R1 var_off=(0x0; 0xffffffffffffffff) off=-1 size=1",
         "invalid variable-offset write to stack R1 var_off=(0x0; 0xffffffffffffffff) off=-1 size=1"),
        ("task_stack_buffer_too_small", "call 158\nmov %r1, %r0\nmov %r2, %r10\nadd %r2, -64\nmov %r3, 72\n"
         "mov %r4, 0\ncall 141\nmov %r0, 0\nexit",
         "invalid write to stack R2 off=-64 size=72", "invalid write to stack R2 off=-64 size=72"),
        ("task_stack_into_ctx", "mov %r6, %r1\ncall 158\nmov %r1, %r0\nmov %r2, %r6\nmov %r3, 8\nmov %r4, 0\n"
         "call 141\nmov %r0, 0\nexit",
         "R2 type=ctx expected=fp, pkt, pkt_meta, map_key, map_value, mem, ringbuf_mem, buf, trusted_ptr_",
         "R2 type=ctx expected=fp, pkt, pkt_meta, map_key, map_value, mem, ringbuf_mem, buf, trusted_ptr_"),
        ("task_stack_of_real_parent", f"call 158\nldxdw %r1, [%r0+{rparent}]\n" + buf + "mov %r4, 0\ncall 141\n"
         "mov %r0, 0\nexit", "", untrusted),
    ]


CASES = _cases()


@pytest.mark.parametrize("name,text,error,sleepable_error", CASES, ids=[c[0] for c in CASES])
def test_task_argument_helpers_like_the_kernel(name: str, text: str, error: str, sleepable_error: str) -> None:
    kernel = kernel_skip_reason() is None
    for sleepable, want in ((False, error), (True, sleepable_error)):
        p = dataclasses.replace(prog(text), sleepable=sleepable)
        r = verify_program(p, MAPS, mode="warn", time_budget=10)
        assert (r.ok, r.error) == (not want, want), (sleepable, r.log)
        if kernel:
            assert kernel_verdict(p, MAPS)[:2] == (r.ok, r.error), sleepable


def test_pt_regs_of_the_current_task_are_read_at_run_time() -> None:
    """The current task's registers have an object here (the probe's context), so loads through
    bpf_task_pt_regs's result stay loads; another task's have none and read 0."""
    ip, rparent = _off("pt_regs", "ip"), _off("task_struct", "real_parent")
    r = verify_program(prog(f"call 158\nmov %r1, %r0\ncall 175\nldxdw %r0, [%r0+{ip}]\nexit"), MAPS, mode="warn")
    assert r.ok and not r.rewrites and not r.notes, (r.rewrites, r.notes)
    r = verify_program(prog(f"call 158\nldxdw %r1, [%r0+{rparent}]\ncall 175\nldxdw %r0, [%r0+{ip}]\nexit"),
                       MAPS, mode="warn")
    assert r.ok and set(r.rewrites) == {3}, r.rewrites
