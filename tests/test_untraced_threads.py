"""Threads created after arming are not traced when every probe runs in the target (issue 10,
"Lifecycle": new threads need no ptrace stop per thread).

The target (tests/targets/untraced/late.c) starts its threads only once the tracer has armed
(a gate file).  Checked with ``ubpf-run``: exact counts from the new threads, each new thread's
TracerPid 0 (no clone stop: it was never attached), a fork from such a thread whose child runs
the probed function uncounted (the gate page is wiped in the child), a dlopen from such a thread
whose library probe counts exactly (the dynamic linker's in-target notification, no int3), an
exec from such a thread (the new image armed again);
detach with untraced threads inside probed functions and with replaced return addresses (text
and mappings byte-identical afterwards); a tracer SIGKILL with untraced threads (the guardian
puts the bytes back, the target finishes correctly); and a process with a probe on the ptrace
path, which still traces every thread.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from bpf_build import compile_bpf
from cli_util import NOBODY
from test_intarget_e2e import TIMEOUT, _events, attached, cli, file_text, kill_pid, patched, wait_for, workdir

from ubpf_py.intarget import runtime_obj

SRC = Path(__file__).resolve().parent / "targets"
CALLS = 5000
THREADS = 8

pytestmark = [
    pytest.mark.skipif(runtime_obj.unavailable_reason() is not None,
                       reason=f"in-target runtime unavailable: {runtime_obj.unavailable_reason()}"),
    pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is needed to build the targets"),
]


@pytest.fixture(scope="module")
def built():
    d = Path(tempfile.mkdtemp(prefix="ubpf-untraced-"))
    late = str(SRC / "untraced" / "late.c")
    subprocess.run(["gcc", "-O2", "-pthread", "-o", str(d / "dyn"), late, "-ldl"], check=True)
    subprocess.run(["gcc", "-O2", "-static", "-pthread", "-DNO_DLOPEN", "-o", str(d / "static"), late], check=True)
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(d / "libit.so"), str(SRC / "intarget" / "libit.c")],
                   check=True)
    compile_bpf((SRC / "intarget" / "it.bpf.c").read_text(), d, "it")
    for p in [d, *d.iterdir()]:
        p.chmod(0o755)                        # uid 65534 runs them
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _progs(d: Path, progs: dict[str, str]) -> list[str]:
    out = ["--no-auto"]
    for name, where in progs.items():
        out += ["-a", f"{name}={where}"]
    return out


def _counts(events: list[dict]) -> dict[int, int]:
    return next({k: v for k, v in e["decoded"]} for e in events if e.get("event") == "map" and e["name"] == "counts")


def _tracers(pid: int) -> dict[int, int]:
    """tid -> TracerPid of every thread of ``pid`` now."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
                if line.startswith("TracerPid:"):
                    out[int(tid)] = int(line.split()[1])
        except OSError:
            pass
    return out


def _run_gated(p: subprocess.Popen, out: Path, probes: int, gate: Path) -> tuple[str, str]:
    """Let the target's work start (the gate file) once ``probes`` are attached; its output."""
    try:
        wait_for(lambda: attached(out, probes), "the attach", p)
        gate.touch()
        return p.communicate(timeout=TIMEOUT)
    finally:
        kill_pid(p)


def _child_running(parent: int, word: str, timeout: float = TIMEOUT) -> int:
    """The pid of ``parent``'s child whose command line has ``word`` (once it has)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for task in Path(f"/proc/{parent}/task").iterdir():
            try:
                kids = (task / "children").read_text().split()
            except OSError:
                continue
            for kid in kids:
                try:
                    if word in Path(f"/proc/{kid}/cmdline").read_bytes().decode(errors="replace").split("\0"):
                        return int(kid)
                except OSError:
                    continue
        time.sleep(0.02)
    raise AssertionError(f"no child of {parent} runs {word!r}")


def run_late(d: Path, kind: str, *extra: str) -> tuple[subprocess.CompletedProcess, list[dict], list[tuple[int, int]]]:
    """``late`` with THREADS threads started after the attach; (ubpf-run's result, its events,
    [(tid, TracerPid)] of the late threads)."""
    w = workdir()
    gate, tids, out = w / "gate", w / "tids", w / "out.jsonl"
    exe = str(d / kind)
    progs = {"e0": f"{exe}:work", "r3": f"{exe}:fact"}
    argv = [exe, "late", str(THREADS), str(CALLS), str(gate), str(tids)]
    if kind == "dyn":
        progs["e1"] = f"{d / 'libit.so'}:lib_work"
        argv.append(str(d / "libit.so"))
    p = cli(str(d / "it.bpf.o"), *_progs(d, progs), "-f", "json", "-o", str(out), "-v", *extra, "--", *argv)
    so, se = _run_gated(p, out, len(progs), gate)
    late = [tuple(int(x) for x in line.split()) for line in tids.read_text().splitlines()] if tids.exists() else []
    r = subprocess.CompletedProcess(p.args, p.returncode, so, se)
    ev = _events(out)
    shutil.rmtree(w, ignore_errors=True)
    return r, ev, late


@pytest.mark.parametrize("kind", ["dyn", "static"])
def test_late_threads_are_not_traced_and_counted_exactly(built, kind):
    r, ev, late = run_late(built, kind)
    assert r.returncode == 0 and r.stdout == "ok\n", r.stderr[-3000:]
    assert len(late) == THREADS
    assert all(tracer == 0 for _tid, tracer in late), f"a late thread was ptrace-attached: {late}"
    assert all(e["path"] == "in-target" for e in ev if e.get("event") == "attached")
    counts = _counts(ev)
    # thread 0's fork child made CALLS calls of work too: none counted (its gate page is wiped)
    assert counts[0] == THREADS * CALLS
    if kind == "dyn":
        assert counts[1] == CALLS        # lib_work, in a library dlopen'ed by an untraced thread


def test_a_ptrace_path_probe_keeps_every_thread_traced(built):
    r, ev, late = run_late(built, "dyn", "--mode", "ptrace")
    assert r.returncode == 0 and r.stdout == "ok\n", r.stderr[-3000:]
    assert len(late) == THREADS and all(tracer != 0 for _tid, tracer in late)
    counts = _counts(ev)
    assert counts[0] == THREADS * CALLS and counts[1] == CALLS


def _size(maps_line: str) -> int:
    lo, hi = (int(x, 16) for x in maps_line.split()[0].split("-"))
    return hi - lo


SLOW_PROG = """
#include <linux/bpf.h>
#include <linux/ptrace.h>
#include <bpf/bpf_helpers.h>
char LICENSE[] SEC("license") = "GPL";
struct { __uint(type, BPF_MAP_TYPE_ARRAY); __uint(max_entries, 2); __type(key, __u32); __type(value, __u64); } counts SEC(".maps");
static __always_inline void bump(__u32 i)
{
	__u64 *v = bpf_map_lookup_elem(&counts, &i);
	if (v)
		__sync_fetch_and_add(v, 1);
}
SEC("uprobe") int e0(struct pt_regs *ctx) { bump(0); return 0; }
/* a helper the in-target runtime lacks: this program takes the ptrace path (an int3) */
SEC("uprobe") int slow(struct pt_regs *ctx)
{
	struct bpf_pidns_info ns = {};
	bpf_get_ns_current_pid_tgid(0, 0, &ns, sizeof(ns));
	bump(1);
	return 0;
}
"""


def test_late_library_with_a_ptrace_probe_traces_every_thread_again(built):
    """An untraced thread dlopens a library whose probe needs an int3: before it is armed, every
    untraced thread is seized for good (an int3 would kill an untraced thread); the probe then
    counts every call and nobody dies of SIGTRAP."""
    w = workdir()
    prog = compile_bpf(SLOW_PROG, w, "slow")
    gate, tids, out = w / "gate", w / "tids", w / "out.jsonl"
    exe, lib = str(built / "dyn"), str(built / "libit.so")
    p = cli(str(prog), *_progs(built, {"e0": f"{exe}:work", "slow": f"{lib}:lib_work"}), "-f", "json", "-o",
            str(out), "--", exe, "late", str(THREADS), str(CALLS), str(gate), str(tids), lib)
    so, se = _run_gated(p, out, 2, gate)
    try:
        assert p.returncode == 0 and so == "ok\n", se[-3000:]
        ev = _events(out)
        assert {e["program"]: e["path"] for e in ev if e.get("event") == "attached"} == \
            {"e0": "in-target", "slow": "ptrace"}
        assert _counts(ev) == {0: THREADS * CALLS, 1: CALLS}
    finally:
        shutil.rmtree(w, ignore_errors=True)


def _spin(d: Path, stop_how: str) -> None:
    """``spin``: attach (--pid), then the target starts 4 threads calling work/fact and sleeping in
    nap (return-probed: mostly blocked there with the return address replaced).  ``stop_how``:
    "detach" (--duration) or "kill" (SIGKILL of ubpf-run: the guardian restores)."""
    exe = d / "dyn"
    w = workdir()
    gate, stop, out = w / "gate", w / "stop", w / "out.jsonl"
    target = subprocess.Popen([str(exe), "spin", "4", str(gate), str(stop)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        assert target.stdout.readline() == "ready\n"
        before = file_text(target.pid, exe)
        maps_before = Path(f"/proc/{target.pid}/maps").read_text()
        progs = {"e0": f"{exe}:work", "r3": f"{exe}:work", "r0": f"{exe}:fact", "r4": f"{exe}:nap"}
        extra = ["--duration", "2"] if stop_how == "detach" else []
        p = cli(str(d / "it.bpf.o"), *_progs(d, progs), "-f", "json", "-o", str(out), "--pid", str(target.pid),
                *extra)
        try:
            wait_for(lambda: attached(out, len(progs)), "the attach", p)
            gate.touch()
            assert target.stdout.readline() == "started\n"
            time.sleep(0.3)
            tracers = _tracers(target.pid)
            assert len(tracers) == 5 and tracers.pop(target.pid) != 0
            assert all(t == 0 for t in tracers.values()), f"late threads traced: {tracers}"
            assert patched(target.pid, exe)
            if stop_how == "kill":
                os.kill(p.pid, signal.SIGKILL)
            _, se = p.communicate(timeout=TIMEOUT)
        finally:
            kill_pid(p)
        if stop_how == "kill":
            t0 = time.monotonic()
            while target.poll() is None and patched(target.pid, exe) and time.monotonic() - t0 < 5:
                time.sleep(0.05)
            assert target.poll() is None, f"the target died after the tracer's SIGKILL: {target.returncode}"
            assert not patched(target.pid, exe)
        else:
            assert p.returncode == 0, se[-3000:]
            assert file_text(target.pid, exe) == before
            # the only new mappings are the 4 threads' stacks and guard pages (glibc): nothing
            # of ours (arena, private area, image, trampolines) is left
            extra = set(Path(f"/proc/{target.pid}/maps").read_text().splitlines()) - set(maps_before.splitlines())
            assert len(extra) <= 8 and all(len(m.split()) == 5 and m.split()[1] in ("rw-p", "---p")
                                           and _size(m) <= 16 << 20 for m in extra), extra
            assert not set(maps_before.splitlines()) - set(Path(f"/proc/{target.pid}/maps").read_text().splitlines())
            assert all(t == 0 for t in _tracers(target.pid).values())
        time.sleep(0.2)                               # it keeps running correctly without us
        stop.touch()
        tso, tse = target.communicate(timeout=TIMEOUT)
        assert target.returncode == 0 and tso.endswith("ok\n"), tse[-2000:]
    finally:
        kill_pid(target)
        shutil.rmtree(w, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (attach to a non-child)")
def test_detach_puts_back_untraced_threads(built):
    _spin(built, "detach")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (attach to a non-child)")
def test_tracer_sigkill_with_untraced_threads(built):
    _spin(built, "kill")


def test_exec_by_an_untraced_thread_is_followed(built):
    """An exec by a thread we do not trace is reported to nobody; the leader's exit stop while a
    thread waits in the exec (state D) tells the tracer, which seizes the new image as soon as
    it takes the pid and arms it: the new image's calls count exactly and its late threads are
    untraced again."""
    w = workdir()
    gate, tids, out = w / "gate", w / "tids", w / "out.jsonl"
    exe = str(built / "dyn")
    p = cli(str(built / "it.bpf.o"), *_progs(built, {"e0": f"{exe}:work"}), "-f", "json", "-o", str(out), "--",
            exe, "exec", str(CALLS), str(gate), str(tids))
    try:
        wait_for(lambda: attached(out, 1), "the attach", p)
        gate.touch()
        # the new image waits for GATE.exec until the tracer has armed it: how soon the tracer
        # finds an image exec'd by an untraced thread depends on the load (untraced.py)
        target = _child_running(p.pid, "late")
        wait_for(lambda: patched(target, Path(exe)), "the new image armed", p)
        Path(f"{gate}.exec").touch()
        so, se = p.communicate(timeout=TIMEOUT)
    finally:
        kill_pid(p)
    try:
        assert p.returncode == 0 and so == "ok\n", se[-3000:]
        late = [tuple(int(x) for x in line.split()) for line in tids.read_text().splitlines()]
        assert len(late) == 2 and all(tracer == 0 for _tid, tracer in late), late
        # CALLS before the exec, 2 x CALLS by the new image's threads (its fork child: none)
        assert _counts(_events(out))[0] == 3 * CALLS
    finally:
        shutil.rmtree(w, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (trace another user's process)")
def test_dlopen_notification_in_another_users_process(built):
    """The target may not signal a tracer of another user (its SIGURG fails with EPERM): the
    tracer's own watcher of the request word wakes it, and the library is armed in time."""
    w = workdir()
    gate, tids, out = w / "gate", w / "tids", w / "out.jsonl"
    exe, lib = str(built / "dyn"), str(built / "libit.so")
    target = subprocess.Popen(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                               exe, "late", "4", str(CALLS), str(gate), str(tids), lib],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: Path(f"/proc/{target.pid}/exe").resolve() == Path(exe), "the target's exec")
        p = cli(str(built / "it.bpf.o"), *_progs(built, {"e0": f"{exe}:work", "e1": f"{lib}:lib_work"}), "-f", "json",
                "-o", str(out), "--pid", str(target.pid))
        try:
            wait_for(lambda: attached(out, 2), "the attach", p)
            gate.touch()
            tso, tse = target.communicate(timeout=TIMEOUT)
            p.send_signal(signal.SIGINT)
            _, se = p.communicate(timeout=TIMEOUT)
        finally:
            kill_pid(p)
        assert target.returncode == 0 and tso == "ok\n", tse[-2000:]
        assert p.returncode == 0, se[-3000:]
        counts = _counts(_events(out))
        assert (counts[0], counts[1]) == (4 * CALLS, CALLS)
    finally:
        kill_pid(target)
        shutil.rmtree(w, ignore_errors=True)


def _guardian_switches(tracer: int, target_exe: str) -> int:
    """Voluntary context switches (wake-ups) of ubpf-run's guardian child so far."""
    kids = Path(f"/proc/{tracer}/task/{tracer}/children").read_text().split()
    guard = [int(k) for k in kids if os.path.realpath(f"/proc/{k}/exe") != os.path.realpath(target_exe)]
    assert len(guard) == 1, f"expected one guardian child of {tracer} besides the target: {kids}"
    for line in Path(f"/proc/{guard[0]}/status").read_text().splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches in /proc/PID/status")


@pytest.mark.parametrize("mode", ["auto", "ptrace"])
def test_guardian_sleeps_while_nothing_in_the_target_traps(built, mode):
    """The guardian polls the tracer's PF_EXITING flag (every 500 us, real-time priority) only
    once an int3 is in a target: with every probe in-target it blocks on its pipe and takes no
    CPU time from the target's threads; a ptrace-path probe (an int3) turns the polling on."""
    w = workdir()
    gate, tids, out = w / "gate", w / "tids", w / "out.jsonl"
    exe = str(built / "dyn")
    p = cli(str(built / "it.bpf.o"), *_progs(built, {"e0": f"{exe}:work"}), "-f", "json", "-o", str(out),
            "--mode", mode, "--", exe, "late", "1", "10", str(gate), str(tids))
    try:
        wait_for(lambda: attached(out, 1), "the attach", p)
        time.sleep(0.1)
        before = _guardian_switches(p.pid, exe)
        time.sleep(1.0)
        woke = _guardian_switches(p.pid, exe) - before
        gate.touch()
        so, se = p.communicate(timeout=TIMEOUT)
        assert p.returncode == 0 and so == "ok\n", se[-3000:]
    finally:
        kill_pid(p)
        shutil.rmtree(w, ignore_errors=True)
    if mode == "auto":
        assert woke <= 5, f"the guardian woke {woke} times in 1 s with no int3 in the target"
    else:
        assert woke >= 100, f"the guardian woke only {woke} times in 1 s with an int3 in the target"
