"""A sleepable uprobe (``SEC("uprobe.s")``) end to end: bpf_copy_from_user and
bpf_copy_from_user_task read the traced process; the kernel backend (which loads the
program with BPF_F_SLEEPABLE, as libbpf does) is the oracle for every result, failures
included."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bpf_build import build_target_and_program
from cli_util import run_cli

from ubpf_py.kernel.syscall import kernel_bpf_skip_reason
from ubpf_py.obj.elf import load_object
from ubpf_py.verifier import verify_program

TARGET = r"""
char secret[16] = "sleepable-read!";
__attribute__((noinline)) int hit(const char *p) { __asm__ volatile(""); return p[0]; }
int main(void) { return hit(secret) == 's' ? 0 : 1; }
"""

PROG = r"""
#include <linux/bpf.h>
#include <linux/ptrace.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
char got[16], got_task[16], bad[8] = {1, 1, 1, 1, 1, 1, 1, 1}, kept[8] = {2, 2, 2, 2, 2, 2, 2, 2};
long rc = 1, rc_task = 1, rc_flags = 1, rc_bad = 1;
SEC("uprobe.s") int BPF_KPROBE(probe, const char *p)
{
	struct task_struct *t = bpf_get_current_task_btf();
	rc = bpf_copy_from_user(got, sizeof(got), p);
	rc_task = bpf_copy_from_user_task(got_task, sizeof(got_task), p, t, 0);
	rc_flags = bpf_copy_from_user_task(kept, sizeof(kept), p, t, 1);   /* flags: -EINVAL, untouched */
	rc_bad = bpf_copy_from_user(bad, sizeof(bad), (void *)8);            /* -EFAULT, zeroed */
	return 0;
}
SEC("uprobe") int not_sleepable(struct pt_regs *ctx)
{
	char b[8];
	return bpf_copy_from_user(b, sizeof(b), (void *)PT_REGS_PARM1(ctx));
}
char LICENSE[] SEC("license") = "GPL";
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_target_and_program(tmp_path_factory.mktemp("sleepable"), ("t", TARGET), ("s", PROG))


def _run(d: Path, backend: str) -> dict:
    p = run_cli("s.bpf.o", "--backend", backend, "-f", "json", "--no-autoload", "not_sleepable",
                "--attach", "probe=./t:hit", "--", "./t", cwd=d)
    assert p.returncode == 0, p.stderr
    return {g["name"]: g["value"] for g in map(json.loads, p.stdout.splitlines()) if g.get("event") == "global"}


def test_the_section_makes_the_program_sleepable(built: Path) -> None:
    spec = load_object(str(built / "s.bpf.o"))
    assert spec.programs["probe"].sleepable and not spec.programs["not_sleepable"].sleepable
    assert verify_program(spec.programs["probe"], spec.maps, mode="warn").ok
    r = verify_program(spec.programs["not_sleepable"], spec.maps, mode="warn")
    assert r.error == "helper call might sleep in a non-sleepable prog"


def test_copies_from_user_like_the_kernel(built: Path) -> None:
    ours = _run(built, "userspace")
    assert ours["rc"] == 0 and ours["rc_task"] == 0 and ours["got"] == ours["got_task"] == "sleepable-read!"
    assert ours["rc_flags"] == -22 and ours["rc_bad"] == -14
    reason = kernel_bpf_skip_reason()
    if reason:
        pytest.skip(reason)
    assert _run(built, "kernel") == ours
