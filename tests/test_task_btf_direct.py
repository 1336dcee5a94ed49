"""Direct field loads through ``bpf_get_current_task_btf()`` give the traced thread's values.

``task->pid``, ``task->tgid``, ``task->real_parent->tgid``, ``task->group_leader->pid``,
``task->comm``, ``task->cred->uid`` and the ``real_parent`` chain up to the kernel's
init_task are plain loads from a PTR_TO_BTF_ID register; the
target passes what the kernel tells it (getppid, gettid, getpid) to the probed function, a
second thread renames itself, and the program compares.  The interpreter, the JIT and the
kernel (``--backend kernel``, the same object and target) must agree; a field with no
userspace source (``task->mm``) reads 0 here and the loader says so in a one-line warning.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from bpf_build import build_task_test
from cli_util import run_cli
from kernel_verdict import kernel_skip_reason

TARGET = r"""
#define _GNU_SOURCE
#include <pthread.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>
__attribute__((noinline)) int hit(long ppid, long tid, long pid) { __asm__ volatile(""); return (int)(ppid + tid + pid); }
static void *worker(void *a) { prctl(PR_SET_NAME, "worker"); hit(getppid(), syscall(SYS_gettid), getpid()); return a; }
int main(void) {
	pthread_t th;
	hit(getppid(), syscall(SYS_gettid), getpid());
	if (pthread_create(&th, 0, worker, 0)) return 1;
	pthread_join(th, 0);
	return 0;
}
"""

PROG = r"""
#include <vmlinux.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
long calls, pid_ok, tgid_ok, ppid_ok, leader_ok, thread_seen, uid_seen = -1, mm_null = -1, mm_count = -1;
char comm[2][16];
SEC("uprobe") int BPF_KPROBE(probe, long ppid, long tid, long pid)
{
	struct task_struct *t = bpf_get_current_task_btf();
	long i = __sync_fetch_and_add(&calls, 1);
	if (i > 1 || i < 0) return 0;
	pid_ok += t->pid == tid;
	tgid_ok += t->tgid == pid;
	ppid_ok += t->real_parent->tgid == ppid;
	leader_ok += t->group_leader->pid == pid;
	thread_seen += t->pid != t->tgid;
	*(__u64 *)&comm[i][0] = *(__u64 *)&t->comm[0];
	*(__u64 *)&comm[i][8] = *(__u64 *)&t->comm[8];
	const struct cred *c = t->cred;
	uid_seen = c ? c->uid.val : -2;
	mm_null = t->mm == 0;
	mm_count = t->mm->map_count;
	return 0;
}
long chain[8];
SEC("uprobe") int BPF_KPROBE(ancestry, long ppid)
{
	struct task_struct *t = bpf_get_current_task_btf();
	for (int i = 0; i < 8; i++) {
		t = t->real_parent;
		chain[i] = t->tgid;
	}
	return 0;
}
char LICENSE[] SEC("license") = "GPL";
"""

#: what every backend reports for the fields ubpf-py has a value for
EXPECTED = {"calls": 2, "pid_ok": 2, "tgid_ok": 2, "ppid_ok": 2, "leader_ok": 2, "thread_seen": 1,
            "comm": ["t", "worker"], "uid_seen": os.getuid()}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_task_test(tmp_path_factory.mktemp("taskbtf"), TARGET, ["-O1", "-pthread"], ("direct", PROG))


def _run(d: Path, *args: str) -> tuple[dict, list[dict], str]:
    p = run_cli("direct.bpf.o", *args, "-f", "json", "--attach", "probe=./t:hit", "--attach", "ancestry=./t:hit",
                "--", "./t", cwd=d)
    assert p.returncode == 0, p.stderr
    events = [json.loads(ln) for ln in p.stdout.splitlines() if ln.startswith("{")]
    return {e["name"]: e["value"] for e in events if e.get("event") == "global"}, events, p.stderr


@pytest.mark.parametrize("engine", ["interp", "jit"])
def test_direct_loads_give_the_threads_values(built: Path, engine: str) -> None:
    g, events, stderr = _run(built, "--engine", engine)
    assert {k: g[k] for k in EXPECTED} == EXPECTED
    # no source for task->mm: NULL here, and the load through it gives the faulting load's 0
    assert (g["mm_null"], g["mm_count"]) == (1, 0)
    warned = [ln for ln in stderr.splitlines() if "directly" in ln]
    assert warned and all(ln.startswith("ubpf-run: warning: program 'probe': insn ") for ln in warned)
    assert any("task_struct.mm" in ln for ln in warned) and any("mm_struct.map_count" in ln for ln in warned)
    assert not any(f in ln for ln in warned for f in ("task_struct.pid", "task_struct.tgid", "task_struct.comm"))
    # the real_parent chain: ubpf-run, this test process, ..., init, the kernel's init_task (pid 0)
    c = g["chain"]
    assert c[1] == os.getpid() and (1 not in c or not any(c[c.index(1) + 1:])), c
    if engine == "jit":   # the in-target runtime has no task object: the program runs in the tracer
        att = [e for e in events if e.get("event") == "attached"]
        assert att and "bpf_get_current_task_btf" in att[0]["path_reason"], att


def test_in_target_mode_says_why_not(built: Path) -> None:
    p = run_cli("direct.bpf.o", "--mode", "intarget", "--attach", "probe=./t:hit", "--", "./t", cwd=built)
    assert p.returncode != 0
    assert p.stderr.splitlines()[-1] == ("ubpf-run: error: --mode intarget: program probe cannot run in the "
                                         "target: helper bpf_get_current_task_btf (#158) is not available in "
                                         "the target")


def test_the_kernel_gives_the_same(built: Path) -> None:
    if (reason := kernel_skip_reason()) is not None:
        pytest.skip(reason)
    g, _events, _stderr = _run(built, "--backend", "kernel")
    assert {k: g[k] for k in EXPECTED} == EXPECTED
    assert g["mm_null"] == 0 and g["mm_count"] > 0    # the kernel has the mm ubpf-py does not model
    ours, _events, _stderr = _run(built, "--engine", "jit")
    assert g["chain"][1:] == ours["chain"][1:]        # [0] is the ubpf-run of each run


def test_check_names_the_fields_without_a_value(built: Path) -> None:
    p = run_cli("--check", "direct.bpf.o", cwd=built)
    assert p.returncode == 0, p.stderr
    assert sorted({ln.split(" reads ")[1].split(" directly")[0] for ln in p.stderr.splitlines()}) == \
        ["mm_struct.map_count", "task_struct.mm"], p.stderr
