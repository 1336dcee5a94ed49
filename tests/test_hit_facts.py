"""Per-hit facts are the traced thread's, at that moment, as the kernel reports them.

Kernel-differential: the tracer is pinned to CPU 0, the target to CPU 1; the target
calls ``mark`` from its main thread, from a thread renamed "worker", and after
``setresgid(65533)``/``setresuid(65534)``, sleeping between calls so jiffies move.
``--backend kernel`` runs the same object and command as the oracle.  A run as uid
65534 (no root) checks the ids are not a constant 0.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from bpf_build import compile_bpf
from cli_util import NOBODY, run_cli, unprivileged_python_reason

from ubpf_py.kernel.syscall import kernel_bpf_skip_reason

TARGET = r"""
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>
__attribute__((noinline)) void mark(unsigned id) { __asm__ volatile("" :: "r"(id)); }
static void *worker(void *a) { prctl(PR_SET_NAME, "worker"); mark(2); return a; }
int main(int argc, char **argv) {
	cpu_set_t set; CPU_ZERO(&set); CPU_SET(atoi(argv[1]), &set);
	if (sched_setaffinity(0, sizeof(set), &set)) return 2;
	mark(1);
	pthread_t t; pthread_create(&t, 0, worker, 0); pthread_join(t, 0);
	struct timespec ts = {0, 400 * 1000 * 1000}; nanosleep(&ts, 0);
	if (getuid() == 0 && (setresgid(65533, 65533, 65533) || setresuid(65534, 65534, 65534))) return 3;
	mark(3);
	return 0;
}
"""

PROG = r"""
#include <linux/bpf.h>
#include <linux/ptrace.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
__u64 cpu[4], uid[4], gid[4], pid[4], tid[4], jif[4], kt[4], kt0[4];
char comm1[16], comm2[16], comm3[16];
struct { __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY); __uint(max_entries, 1); __type(key, __u32); __type(value, __u64); }
    percpu SEC(".maps");
SEC("uprobe") int BPF_KPROBE(mark, unsigned int id)
{
	__u32 k = 0;
	__u64 *n = bpf_map_lookup_elem(&percpu, &k);   /* the hit's CPU picks the copy */
	if (n) *n += 1;
	if (id < 1 || id > 3) return 0;
	id &= 3;
	__u64 ug = bpf_get_current_uid_gid(), pt = bpf_get_current_pid_tgid();
	cpu[id] = bpf_get_smp_processor_id(); uid[id] = (__u32)ug; gid[id] = ug >> 32;
	pid[id] = pt >> 32; tid[id] = (__u32)pt;
	kt0[id] = bpf_ktime_get_ns(); jif[id] = bpf_jiffies64(); kt[id] = bpf_ktime_get_ns();
	if (id == 1) bpf_get_current_comm(comm1, 16);
	if (id == 2) bpf_get_current_comm(comm2, 16);
	if (id == 3) bpf_get_current_comm(comm3, 16);
	return 0;
}
char LICENSE[] SEC("license") = "GPL";
"""


@pytest.fixture(scope="module")
def built() -> Iterator[Path]:
    if not {0, 1} <= os.sched_getaffinity(0):
        pytest.skip("needs CPUs 0 and 1 to put the tracer and the target on different CPUs")
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the target")
    d = Path(tempfile.mkdtemp(prefix="ubpf-facts-"))  # pytest's tmp_path is private to root
    os.chmod(d, 0o755)
    (d / "facts.c").write_text(TARGET)
    subprocess.run(["gcc", "-O1", "-pthread", "-o", str(d / "facts"), str(d / "facts.c")], check=True)
    compile_bpf(PROG, d, "facts")
    for f in d.iterdir():
        os.chmod(f, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _run(built: Path, *extra: str, user: str | None = None) -> dict:
    argv = ["facts.bpf.o", "-f", "json", "--attach", "mark=./facts:mark", *extra, "--", "./facts", "1"]
    p = run_cli(*argv, cwd=built, user=user, taskset="0")
    assert p.returncode == 0, p.stderr
    out = {}
    for d in map(json.loads, p.stdout.splitlines()):
        if d.get("event") == "global":
            out[d["name"]] = d["value"]
        elif d.get("event") == "map" and d["name"] == "percpu":
            out["percpu"] = d["decoded"][0][1]
    return out


def _facts(g: dict) -> dict:
    """What must equal between backends (pids differ per run: kept as relations)."""
    return {"cpu": g["cpu"][1:], "uid": g["uid"][1:], "gid": g["gid"][1:],
            "comm": [g["comm1"], g["comm2"], g["comm3"]],
            "threads": [g["tid"][1] == g["pid"][1], g["tid"][2] != g["pid"][2], g["pid"][2] == g["pid"][1]],
            "percpu_cpu1": g["percpu"][1]}


def _hz(g: dict) -> float:
    return (g["jif"][3] - g["jif"][1]) * 1e9 / (g["kt"][3] - g["kt"][1])


def test_facts_equal_the_kernel(built: Path) -> None:
    reason = kernel_bpf_skip_reason()
    if reason:
        pytest.skip(reason)
    kernel = _run(built, "--backend", "kernel")
    want = _facts(kernel)
    assert want["cpu"] == [1, 1, 1] and want["uid"][2] == 65534 and want["comm"][1] == "worker"
    for engine in ("jit", "interp"):
        ours = _run(built, "--engine", engine)
        assert _facts(ours) == want, engine
        # jiffies: the same rate as the kernel's (HZ derived from the kernel's own counter
        # and clock, not from the config file the runtime reads), and the same count
        hz = min((100, 250, 300, 1000), key=lambda h: abs(h - _hz(kernel)))   # the kernel's CONFIG_HZ
        assert abs(_hz(ours) - hz) < 0.05 * hz
        # the same count: the kernel's jiffies carried forward at its HZ to our sample.  Each sample
        # is quantised to one jiffy (two of slack), and the jiffies call lies somewhere between two
        # clock reads (on a loaded machine the tracer may be preempted between them: their gap is slack)
        gap = (ours["kt"][1] - ours["kt0"][1] + kernel["kt"][1] - kernel["kt0"][1]) * hz / 1e9
        expect = kernel["jif"][1] + (ours["kt"][1] - kernel["kt"][1]) * hz / 1e9
        assert abs(ours["jif"][1] - expect) <= 2 + gap


def test_approximation_is_an_option_not_the_default(built: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the target changes credentials only when started as root")
    approx = _facts(_run(built, "--approx-facts"))
    assert approx["cpu"] != [1, 1, 1] or approx["uid"][2] != 65534  # the tracer's CPU / cached uid


def test_facts_as_non_root(built: Path) -> None:
    reason = unprivileged_python_reason()
    if reason:
        pytest.skip(reason)
    g = _run(built, user=NOBODY)
    f = _facts(g)
    assert f["uid"] == [65534] * 3 and f["gid"] == [65534] * 3
    assert f["cpu"] == [1, 1, 1] and f["comm"] == ["facts", "worker", "facts"] and all(f["threads"])
    assert f["percpu_cpu1"] == 3 and sum(g["percpu"]) == 3
