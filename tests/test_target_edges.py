"""Targets that end or change in awkward ways while probed (issue 12, items 1 and 7).

``tests/targets/exit_edge.c`` is probed at ``work()`` with an entry and a return probe
(threads sit inside it all the time); every case must end promptly with the target's own
status and output -- identical to an unprobed run -- on both stop loops.  A hang fails
the run: ``faulthandler`` prints the stacks and ends the worker after the time limit.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from test_probe_support import build_c, func_offset, run_plain, run_probed
from tests_edge_util import no_hang

from ubpf_py.probe import native as N
from ubpf_py.probe.engine import ProbeSession

pytestmark = pytest.mark.ptrace

HERE = Path(__file__).resolve().parent
_NO_C = pytest.mark.skipif(N.load() is None, reason="no C compiler for the native loop")
LOOPS = [pytest.param(False, id="python"), pytest.param(True, id="native", marks=_NO_C)]


@pytest.fixture(scope="module")
def target(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("exit_edge")
    return build_c(HERE / "targets" / "exit_edge.c", d / "exit_edge", "-pthread")


def _probes(b: Path):
    return [(b, "work", False), (b, "work", True)]


MODES = ["mainexit", "threadexit", "pthreadexit", "threadexec", "segv", "sigtrap", "forkstorm",
         "vforkexec"]


@pytest.mark.parametrize("native", LOOPS)
@pytest.mark.parametrize("mode", MODES)
def test_edge_same_as_unprobed(target, mode, native):
    plain_out, plain_rc = run_plain([str(target), mode])
    with no_hang(30):
        t0 = time.monotonic()
        run = run_probed([str(target), mode], _probes(target), native=native,
                         record=lambda name, is_ret, hit: is_ret)
        took = time.monotonic() - t0
    assert run.status == plain_rc, (mode, run.stdout)
    assert run.stdout == plain_out
    assert run.events, "the probes never fired"
    assert took < 20


@pytest.mark.parametrize("native", LOOPS)
def test_main_exit_repeated(target, native):
    """The issue's hang (1 in 10 on a quiet machine): main exits while 3 threads are inside a
    function with entry and return probes.  Repeated to make a race show."""
    for _ in range(6):
        with no_hang(30):
            run = run_probed([str(target), "mainexit"], _probes(target), native=native,
                             record=lambda name, is_ret, hit: is_ret)
        assert run.status == 5
        assert run.stdout == b"main exits 5\n"


@pytest.mark.parametrize("native", LOOPS)
def test_sigkill_of_target_ends_session(target, native):
    s = ProbeSession.launch([str(target), "spin"], stdout=subprocess_devnull(), native=native)
    off = func_offset(target, "work")
    s.add_probe(str(target), off, lambda hit: None)
    s.add_probe(str(target), off, lambda hit: None, is_return=True)
    killer = threading.Timer(0.4, os.kill, (s.pid, signal.SIGKILL))
    killer.start()
    try:
        with no_hang(30):
            t0 = time.monotonic()
            status = s.run()
            took = time.monotonic() - t0
    finally:
        killer.cancel()
        s.detach()
    assert status == -signal.SIGKILL
    assert took < 10
    assert not os.path.exists(f"/proc/{s.pid}")


@pytest.mark.parametrize("native", LOOPS)
@pytest.mark.parametrize("mode", ["spin", "zombieleader"])
def test_detach_mid_run_leaves_target_clean(target, mode, native):
    """Ending the session (duration) while threads are inside the probed function -- also
    with a zombie leader that can never stop -- detaches promptly and leaves the code as it
    is in the file; the target keeps running untouched until we kill it."""
    s = ProbeSession.launch([str(target), mode], stdout=subprocess_devnull(), native=native)
    off = func_offset(target, "work")
    hits = []
    s.add_probe(str(target), off, lambda hit: hits.append(1))
    s.add_probe(str(target), off, lambda hit: None, is_return=True)
    try:
        with no_hang(30):
            t0 = time.monotonic()
            status = s.run(duration=0.5)
            took = time.monotonic() - t0
        assert status is None
        assert took < 5
        assert hits
        time.sleep(0.2)
        assert _work_bytes(s.pid, target) == _file_bytes(target, off)
        assert os.path.exists(f"/proc/{s.pid}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(s.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(s.pid, 0)


@pytest.mark.parametrize("native", LOOPS)
def test_duration_ends_with_zombie_leader_and_sleeping_thread(target, native):
    """No thread ever stops on its own: the end of --duration must interrupt a live one (the
    leader is a zombie that cannot stop)."""
    s = ProbeSession.launch([str(target), "zombiesleep"], stdout=subprocess_devnull(), native=native)
    s.add_probe(str(target), func_offset(target, "work"), lambda hit: None)
    try:
        with no_hang(30):
            t0 = time.monotonic()
            assert s.run(duration=0.3) is None
            assert time.monotonic() - t0 < 3
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(s.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(s.pid, 0)


def _file_bytes(path: Path, off: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(off)
        return f.read(16)


def _work_bytes(pid: int, path: Path) -> bytes:
    off = func_offset(path, "work")
    # a zombie leader has an empty maps file: read it through a live thread
    tid = max(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    with open(f"/proc/{pid}/task/{tid}/maps") as maps:
        for line in maps:
            parts = line.split()
            if len(parts) >= 6 and "x" in parts[1] and parts[5] == str(path):
                start, end = (int(x, 16) for x in parts[0].split("-"))
                foff = int(parts[2], 16)
                if foff <= off < foff + (end - start):
                    with open(f"/proc/{pid}/task/{tid}/mem", "rb") as mem:
                        mem.seek(start + off - foff)
                        return mem.read(16)
    raise AssertionError("work() not mapped")


def subprocess_devnull() -> int:
    fd = os.open(os.devnull, os.O_WRONLY)
    _DEVNULLS.append(fd)
    return fd


_DEVNULLS: list[int] = []


def teardown_module(module) -> None:
    for fd in _DEVNULLS:
        with contextlib.suppress(OSError):
            os.close(fd)
    faulthandler.cancel_dump_traceback_later()


EDGE_BPF = r"""
#include <linux/bpf.h>
#include <linux/ptrace.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
struct { __uint(type, BPF_MAP_TYPE_HASH); __uint(max_entries, 1024); __type(key, __u32);
         __type(value, __u64); } starts SEC(".maps");
__u64 calls, rets;
SEC("uprobe")
int BPF_KPROBE(on_entry, long x)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	__u64 t = bpf_ktime_get_ns();
	bpf_map_update_elem(&starts, &tid, &t, BPF_ANY);
	__sync_fetch_and_add(&calls, 1);
	return 0;
}
SEC("uretprobe")
int BPF_KRETPROBE(on_ret, long r)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	bpf_map_delete_elem(&starts, &tid);
	__sync_fetch_and_add(&rets, 1);
	return 0;
}
char LICENSE[] SEC("license") = "GPL";
"""


def test_cli_main_exit_with_threads_in_probed_function(target, tmp_path):
    """The campaign's exact case through ubpf-run: exit(5) from main while 3 threads run a
    function with an entry and a return program; the session ends with status 5."""
    from bpf_build import compile_bpf
    from cli_util import run_cli

    obj = compile_bpf(EDGE_BPF, tmp_path, "edge")
    for _ in range(3):
        p = run_cli(str(obj), "--no-auto", "-a", f"on_entry={target}:work", "-a", f"on_ret={target}:work",
                    "--", str(target), "mainexit", timeout=60)
        assert p.returncode == 0, p.stderr
        assert "exited with status 5" in p.stderr + p.stdout
        assert "main exits 5" in p.stdout


@pytest.mark.parametrize("native", LOOPS)
@pytest.mark.parametrize("is_return", [False, True])
def test_target_killed_while_held_at_a_probe(target, native, is_return):
    """The target dies while one of its threads is held at our breakpoint (the handler runs):
    finishing that hit meets a vanished thread; the session ends with the real status."""
    s = ProbeSession.launch([str(target), "mainexit"], stdout=subprocess_devnull(), native=native)
    off = func_offset(target, "work")
    seen = []

    def handler(hit):
        seen.append(hit.tid)
        if len(seen) == 50:
            os.kill(s.pid, signal.SIGKILL)
            time.sleep(0.05)        # the kill lands while this thread is still held

    s.add_probe(str(target), off, handler, is_return=is_return)
    s.add_probe(str(target), off, lambda hit: None, is_return=not is_return)
    try:
        with no_hang(30):
            status = s.run()
    finally:
        s.detach()
    assert status == -signal.SIGKILL
    assert len(seen) >= 50
