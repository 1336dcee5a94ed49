"""Targets in a child pid or user namespace (containers): ids as the kernel reports them.

The kernel's bpf_get_current_pid_tgid and bpf_get_current_uid_gid report the initial
namespaces' ids, which is what the tracer sees.  Inside the target, getpid()/getuid() give the
target's own namespace's ids, so a program that reports ids takes the ptrace path in such a
process (the reason is reported per probe), while a program that reports none stays in the
target.  The kernel backend, on the same target, is the oracle.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from bpf_build import compile_bpf
from cli_util import run_cli

from ubpf_py.kernel.syscall import kernel_bpf_skip_reason

TARGET_C = r"""
#include <stdio.h>
#include <unistd.h>
__attribute__((noinline)) int work(int x) { volatile int y = x; y = y * 3 + x; return y + 1; }
__attribute__((noinline)) int other(int x) { volatile int y = x; y = y * 5 + x; return y - 1; }
int main(void) {
    printf("ready %d\n", getpid()); fflush(stdout);
    for (int i = 0; i < 6000; i++) { work(i); other(i); usleep(5000); }
    return 0;
}
"""

PROG_C = r"""
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
struct { __uint(type, BPF_MAP_TYPE_ARRAY); __uint(max_entries, 2); __type(key, __u32); __type(value, __u64); } ids SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_ARRAY); __uint(max_entries, 1); __type(key, __u32); __type(value, __u64); } calls SEC(".maps");
SEC("uprobe")
int report_ids(void *ctx)
{
    __u32 k0 = 0, k1 = 1;
    __u64 pt = bpf_get_current_pid_tgid(), ug = bpf_get_current_uid_gid();
    bpf_map_update_elem(&ids, &k0, &pt, 0);
    bpf_map_update_elem(&ids, &k1, &ug, 0);
    return 0;
}
SEC("uprobe")
int count(void *ctx)
{
    __u32 k = 0;
    __u64 *v = bpf_map_lookup_elem(&calls, &k);
    if (v)
        __sync_fetch_and_add(v, 1);
    return 0;
}
char LICENSE[] SEC("license") = "GPL";
"""

#: how each namespace is made for the target (util-linux unshare), and the reason's words
SETUPS = {
    "pid": (["unshare", "--pid", "--fork", "--mount-proc"], "child pid namespace"),
    "user": (["unshare", "--user", "--map-user=1000", "--map-group=1000"], "user namespace"),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ns")
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the target")
    subprocess.run(["gcc", "-O1", "-o", str(d / "tgt"), "-x", "c", "-"], input=TARGET_C, text=True, check=True)
    compile_bpf(PROG_C, d, "ids")
    return d


def _start(built: Path, how: str) -> tuple[subprocess.Popen, int]:
    """The target in its namespace; (the unshare process, the target's pid as we see it)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create namespaces for another process")
    prefix, _ = SETUPS[how]
    p = subprocess.Popen([*prefix, str(built / "tgt")], stdout=subprocess.PIPE, text=True,
                         stderr=subprocess.PIPE, start_new_session=True)
    line = p.stdout.readline()
    if not line.startswith("ready"):
        p.kill()
        p.wait()
        pytest.skip(f"cannot create a {how} namespace here: {p.stderr.read().strip()[:200]}")
    pid = p.pid
    if how == "pid":      # unshare --fork: the target is unshare's child
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            kids = Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split()
            if kids:
                pid = int(kids[0])
                break
            time.sleep(0.01)
    return p, pid


def _stop(p: subprocess.Popen, pid: int) -> None:
    for victim in {pid, p.pid}:          # the namespace's init ignores SIGTERM from here
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)
    p.wait(timeout=20)


def _run(built: Path, pid: int, *extra: str) -> tuple[dict[str, dict], dict[str, list[int]]]:
    """(attached events by program, map name -> values by key) of a 0.5 s run."""
    r = run_cli(str(built / "ids.bpf.o"), "-f", "json", "--pid", str(pid), "-d", "0.5",
                "-a", f"report_ids={built / 'tgt'}:work", "-a", f"count={built / 'tgt'}:other", *extra)
    assert r.returncode == 0, r.stderr[-2000:]
    attached, maps = {}, {}
    for line in r.stdout.splitlines():
        ev = json.loads(line)
        if ev.get("event") == "attached":
            attached[ev["program"]] = ev
        elif ev.get("event") == "map":
            maps[ev["name"]] = [int.from_bytes(bytes.fromhex(v), "little") for _k, v in ev["entries"]]
    return attached, maps


@pytest.mark.parametrize("how", sorted(SETUPS))
def test_ids_in_a_namespaced_target_are_the_kernels(built, how):
    p, pid = _start(built, how)
    try:
        attached, maps = _run(built, pid)
        # the program that reports ids goes to the ptrace path, saying why; the other stays inside
        assert attached["report_ids"]["path"] == "ptrace", attached
        assert SETUPS[how][1] in attached["report_ids"]["path_reason"], attached
        assert attached["count"]["path"] == "in-target", attached
        assert maps["calls"][0] > 0
        pid_tgid, uid_gid = maps["ids"]
        assert pid_tgid == pid << 32 | pid          # the tracer's (and the kernel's) view
        assert uid_gid == os.getgid() << 32 | os.getuid()
        if kernel_bpf_skip_reason() is None:         # the kernel, on the same target, is the oracle
            _, k_maps = _run(built, pid, "--backend", "kernel")
            assert k_maps["ids"] == maps["ids"]
    finally:
        _stop(p, pid)
