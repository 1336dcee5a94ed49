"""Helpers that take the current task as a BTF-typed argument (ARG_PTR_TO_BTF_ID):
``bpf_task_pt_regs(task)`` is the probe's own registers (direct loads through the
``struct pt_regs *`` it returns) and ``bpf_get_task_stack(task, ..., BPF_F_USER_STACK)`` the
probe's user stack.  The interpreter, the JIT and the kernel (``--backend kernel``, same object
and target) must agree.  What has no source here is a clear not-supported fault at run time:
another task's registers or stack, and a task's kernel stack.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bpf_build import build_task_test
from cli_util import run_cli
from kernel_verdict import kernel_skip_reason

TARGET = r"""
__attribute__((noinline)) int leaf(long a, long b) { __asm__ volatile(""); return (int)(a + b); }
__attribute__((noinline)) int mid(long a) { return leaf(a, 7) + 1; }
int main(void) { return mid(5) == 13 ? 0 : 1; }
"""

PROG = r"""
#include <vmlinux.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
long same_ip, same_sp, arg_a, arg_b, n_task, n_ctx, same_stack = -1, bad_flags;
__u64 st_task[8], st_ctx[8];
SEC("uprobe") int BPF_KPROBE(probe, long a, long b)
{
	struct task_struct *t = bpf_get_current_task_btf();
	struct pt_regs *r = bpf_task_pt_regs(t);
	same_ip = r->ip == PT_REGS_IP(ctx);
	same_sp = r->sp == PT_REGS_SP(ctx);
	arg_a = r->di;
	arg_b = r->si;
	n_task = bpf_get_task_stack(t, st_task, sizeof(st_task), BPF_F_USER_STACK);
	n_ctx = bpf_get_stack(ctx, st_ctx, sizeof(st_ctx), BPF_F_USER_STACK);
	same_stack = n_task == n_ctx;
	for (int i = 0; i < 8; i++)
		if (st_task[i] != st_ctx[i])
			same_stack = 0;
	bad_flags = bpf_get_task_stack(t, st_task, sizeof(st_task), 1ULL << 20);   /* -EINVAL */
	return 0;
}
SEC("uprobe") int BPF_KPROBE(kernel_stack)
{
	struct task_struct *t = bpf_get_current_task_btf();
	return bpf_get_task_stack(t, st_task, sizeof(st_task), 0);
}
char LICENSE[] SEC("license") = "GPL";
"""

EXPECTED = {"same_ip": 1, "same_sp": 1, "arg_a": 5, "arg_b": 7, "same_stack": 1, "bad_flags": -22}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_task_test(tmp_path_factory.mktemp("taskhelpers"), TARGET, ["-O1", "-fno-omit-frame-pointer"], ("th", PROG))


def _run(d: Path, *args: str) -> dict:
    p = run_cli("th.bpf.o", *args, "-f", "json", "--no-autoload", "kernel_stack", "--attach", "probe=./t:leaf",
                "--", "./t", cwd=d)
    assert p.returncode == 0, p.stderr
    events = [json.loads(ln) for ln in p.stdout.splitlines() if ln.startswith("{")]
    return {e["name"]: e["value"] for e in events if e.get("event") == "global"}


@pytest.mark.parametrize("engine", ["interp", "jit"])
def test_current_task_registers_and_stack(built: Path, engine: str) -> None:
    g = _run(built, "--engine", engine)
    assert {k: g.get(k, 0) for k in EXPECTED} == EXPECTED
    assert g["n_task"] > 0


def test_the_kernel_gives_the_same(built: Path) -> None:
    if (reason := kernel_skip_reason()) is not None:
        pytest.skip(reason)
    g = _run(built, "--backend", "kernel")
    assert {k: g.get(k, 0) for k in EXPECTED} == EXPECTED
    ours = _run(built, "--engine", "jit")
    assert g["n_task"] == ours["n_task"]


def test_a_kernel_stack_is_a_clear_not_supported(built: Path) -> None:
    p = run_cli("th.bpf.o", "--no-autoload", "probe", "--attach", "kernel_stack=./t:leaf", "--", "./t", cwd=built)
    assert "not supported: kernel stacks" in p.stderr, p.stderr
