"""bpf_get_current_task: a task_struct laid out by the running kernel's BTF, with the fields
that have a userspace source filled for the traced thread; other fields fault like a failed
bpf_probe_read_kernel.  Cgroup helpers from /proc/PID/cgroup.  The kernel runs the same
object as the oracle."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from bpf_build import BPF_CFLAGS
from cli_util import run_cli
from paths import build_realworld

from ubpf_py.helpers.kernel_task import cgroup_classid, cgroup_id, net_cls_classid_file
from ubpf_py.kernel.syscall import kernel_bpf_skip_reason

TARGET = r"""
#define _GNU_SOURCE
#include <unistd.h>
__attribute__((noinline)) int hit(int x) { __asm__ volatile(""); return x; }
int main(void) {
	hit(1);
	if (getuid() == 0 && (setresgid(65533, 65533, 65533) || setresuid(65534, 65534, 65534))) return 3;
	hit(2);
	return 0;
}
"""

PROG = r"""
#include <vmlinux.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
struct { __uint(type, BPF_MAP_TYPE_CGROUP_ARRAY); __uint(max_entries, 1); __type(key, u32); __type(value, u32); }
    cg SEC(".maps");
long pid, tgid, ppid, parent_tgid, leader_pid, start_ok, cgid, classid = -1, under, bad_rc = 1, bad_val = -1;
long uid[3], gid[3], euid[3];
char comm[16], pcomm[16];
SEC("uprobe") int BPF_KPROBE(probe, unsigned int n)
{
	struct task_struct *t = (void *)bpf_get_current_task();
	if (n < 1 || n > 2) return 0;
	n &= 3;
	uid[n] = BPF_CORE_READ(t, cred, uid.val);
	gid[n] = BPF_CORE_READ(t, cred, gid.val);
	euid[n] = BPF_CORE_READ(t, real_cred, euid.val);
	if (n == 2) return 0;
	pid = BPF_CORE_READ(t, pid);
	tgid = BPF_CORE_READ(t, tgid);
	ppid = BPF_CORE_READ(t, real_parent, pid);
	parent_tgid = BPF_CORE_READ(t, real_parent, tgid);
	leader_pid = BPF_CORE_READ(t, group_leader, pid);
	BPF_CORE_READ_STR_INTO(&comm, t, comm);
	BPF_CORE_READ_STR_INTO(&pcomm, t, real_parent, comm);
	u64 st = BPF_CORE_READ(t, start_boottime);
	start_ok = st > 0 && st < bpf_ktime_get_boot_ns();
	cgid = bpf_get_current_cgroup_id();
	classid = bpf_get_cgroup_classid(0);   /* kprobe form: no argument */
	under = bpf_current_task_under_cgroup(&cg, 0);
	if (bpf_get_prandom_u32() != 12345) {   /* mm has no userspace source: it must fault */
		long v = 77;
		bad_rc = bpf_probe_read_kernel(&v, sizeof(v), &t->mm);
		bad_val = v;
	}
	return 0;
}
char LICENSE[] SEC("license") = "GPL";
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    clang = shutil.which("clang")
    if clang is None or shutil.which("gcc") is None or shutil.which("bpftool") is None:
        pytest.skip("clang, gcc and bpftool (vmlinux.h) are needed")
    inc = build_realworld() / "include"    # vmlinux.h of the running kernel and the current libbpf headers
    d = tmp_path_factory.mktemp("task")
    (d / "t.c").write_text(TARGET)
    subprocess.run(["gcc", "-O1", "-o", str(d / "t"), str(d / "t.c")], check=True)
    (d / "task.bpf.c").write_text(PROG)
    subprocess.run([clang, *BPF_CFLAGS[:-1], "-g", f"-I{inc}", "-c", str(d / "task.bpf.c"),
                    "-o", str(d / "task.bpf.o")], check=True, capture_output=True)
    return d


def _run(d: Path, backend: str) -> dict:
    p = run_cli("task.bpf.o", "--backend", backend, "-f", "json", "--attach", "probe=./t:hit", "--", "./t", cwd=d)
    assert p.returncode == 0, p.stderr
    return {g["name"]: g["value"] for g in map(json.loads, p.stdout.splitlines()) if g.get("event") == "global"}


def _comparable(g: dict) -> dict:
    return {"self": [g.get("pid") == g.get("tgid") == g.get("leader_pid"), g.get("ppid") == g.get("parent_tgid")],
            "comm": [g.get("comm"), g.get("pcomm")], "start_ok": g.get("start_ok"), "cgid": g.get("cgid"),
            "classid": g.get("classid", 0),
            "under": g.get("under"), "ids": [g.get("uid", [0] * 3)[1:], g.get("gid", [0] * 3)[1:],
                                            g.get("euid", [0] * 3)[1:]]}


def test_task_fields_and_cgroup_like_the_kernel(built: Path) -> None:
    ours = _run(built, "userspace")
    assert ours["bad_rc"] == -14 and ours.get("bad_val", 0) == 0  # -EFAULT, destination zeroed
    c = _comparable(ours)
    assert c["self"] == [True, True] and c["comm"][0] == "t" and c["start_ok"] == 1
    assert c["under"] == -11    # empty cgroup-array slot: -EAGAIN
    assert c["cgid"] == cgroup_id(os.getpid(), os.getpid())  # the target was born in our cgroup
    assert c["classid"] == cgroup_classid(os.getpid(), os.getpid())
    reason = kernel_bpf_skip_reason()
    if reason:
        pytest.skip(reason)
    kernel = _run(built, "kernel")
    assert _comparable(kernel) == c
    assert kernel["ppid"] != ours["ppid"] or kernel["pid"] != ours["pid"]  # real pids, not constants


def test_net_cls_classid_file() -> None:
    """bpf_get_cgroup_classid reads the thread's cgroup in the v1 hierarchy holding net_cls;
    with none mounted (cgroup v2 only) it is the controller's root: classid 0."""
    mountinfo = ("31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n"
                 "32 31 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n"
                 "33 31 0:30 / /sys/fs/cgroup/net_cls,net_prio rw - cgroup cgroup rw,net_cls,net_prio\n"
                 "41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n")
    cgroups = "3:cpu:/a\n2:net_cls,net_prio:/svc/x\n0::/user.slice\n"
    assert net_cls_classid_file(mountinfo, cgroups) == "/sys/fs/cgroup/net_cls,net_prio/svc/x/net_cls.classid"
    assert net_cls_classid_file(mountinfo.replace("net_cls,", ""), cgroups) is None
    assert net_cls_classid_file(mountinfo, "0::/user.slice\n") is None


def test_cgroup_array_slots() -> None:
    from ubpf_py.helpers.kernel_task import cgroup2_root, cgroup_path
    from ubpf_py.maps import create_map
    from ubpf_py.obj.spec import MapSpec

    m = create_map(MapSpec("cg", 8, 4, 4, 2))
    assert m.under(0, "/x") == -11 and m.under(5, "/x") == -7    # -EAGAIN empty, -E2BIG index
    root = cgroup2_root()
    if root is None:
        pytest.skip("no cgroup v2 hierarchy mounted")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert m.update((1).to_bytes(4, "little"), fd.to_bytes(4, "little")) == 0
    finally:
        os.close(fd)
    mine = cgroup_path(os.getpid(), os.getpid())
    assert m.under(1, mine) == 1 and m.under(1, None) == 0
    assert m.set_cgroup(0, os.path.join(root, "surely-not-a-cgroup")) == -9
