"""Runaway unverified programs, signals and the launched command's lifetime (issue 12 item 2,
issue 13 item 5).  ubpf-run runs as a subprocess; every wait has a timeout."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from bpf_build import compile_bpf
from cli_util import REPO, assert_one_line_error, run_cli
from test_probe_support import build_c, func_offset

pytestmark = pytest.mark.ptrace

HERE = Path(__file__).resolve().parent

RUNAWAY = r"""
#include <linux/bpf.h>
#include <linux/ptrace.h>
#include <bpf/bpf_helpers.h>
SEC("uprobe")
int spin(struct pt_regs *ctx)
{
	asm volatile("r0 = 0\n1: r0 += 1\n goto 1b\n" ::: "r0");
	return 0;
}
char LICENSE[] SEC("license") = "GPL";
"""

COUNT = r"""
#include <linux/bpf.h>
#include <linux/ptrace.h>
#include <bpf/bpf_helpers.h>
__u64 calls;
SEC("uprobe")
int count(struct pt_regs *ctx) { __sync_fetch_and_add(&calls, 1); return 0; }
char LICENSE[] SEC("license") = "GPL";
"""


@pytest.fixture(scope="module")
def target(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("lifetime")
    return build_c(HERE / "targets" / "exit_edge.c", d / "exit_edge", "-pthread")


@pytest.fixture(scope="module")
def objs(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("lifetime_bpf")
    return {"spin": compile_bpf(RUNAWAY, d, "runaway"), "count": compile_bpf(COUNT, d, "count")}


def _start(*args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "ubpf_py.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)


def _wait_for(path_pred, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path_pred():
            return
        time.sleep(0.02)
    raise AssertionError("condition not reached")


def _traced(pid: int) -> bool:
    with open(f"/proc/{pid}/status") as f:
        return any(line.startswith("TracerPid:") and line.split()[1] != "0" for line in f)


@pytest.mark.parametrize("engine", ["jit", "interp"])
@pytest.mark.parametrize("verifier", ["off", "warn"])
def test_runaway_program_is_stopped(objs, target, engine, verifier):
    t0 = time.monotonic()
    p = run_cli(str(objs["spin"]), "--engine", engine, "--verifier", verifier, "-a", f"spin={target}:work",
                "--", str(target), "segv", timeout=60)
    took = time.monotonic() - t0
    line = assert_one_line_error(p, "runaway program 'spin'", "budget of 1000000", "instruction")
    assert p.returncode == 1
    assert ("(r0 += 1)" in line) if engine == "interp" else ("(goto -2)" in line)
    assert took < 30


@pytest.mark.parametrize("engine, limit_s", [("interp", 1.5), ("jit", 0.1)])
def test_runaway_stop_time_and_verified_programs_pay_nothing(objs, engine, limit_s):
    from ubpf_py.errors import VMFault
    from ubpf_py.live.collection import Collection
    from ubpf_py.obj.elf import load_object

    coll = Collection.load(load_object(objs["spin"]), engine=engine, verifier="off")
    t0 = time.thread_time()          # CPU time of this thread: stable on a loaded machine
    with pytest.raises(VMFault, match="runaway program 'spin'"):
        coll.program("spin").run(0)
    assert time.thread_time() - t0 < limit_s
    small = Collection.load(load_object(objs["spin"]), engine=engine, verifier="off", budget=1000)
    with pytest.raises(VMFault, match="budget of 1000 "):
        small.program("spin").run(0)
    verified = Collection.load(load_object(objs["count"]), engine=engine, verifier="strict")
    ex = verified.program("count").executable
    assert getattr(ex, "budget", None) is None and getattr(ex, "max_instructions", None) is None


@pytest.mark.serial
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("prog", ["count", "spin"])
def test_signal_ends_session_fast_and_restores(objs, target, sig, prog):
    """Attached with --pid to a target whose threads are always in the probed function: the
    signal ends ubpf-run within a second (a runaway program included: its budget ends each
    run) and the target runs on, untraced, with its code as in the file."""
    tgt = subprocess.Popen([str(target), "spin"], stdout=subprocess.DEVNULL)
    try:
        extra = ["--verifier", "off"] if prog == "spin" else []
        p = _start(str(objs[prog]), *extra, "-a", f"{prog}={target}:work", "--pid", str(tgt.pid))
        try:
            _wait_for(lambda: _traced(tgt.pid))
            time.sleep(0.5)
            t0 = time.monotonic()
            p.send_signal(sig)
            _, err = p.communicate(timeout=20)
            took = time.monotonic() - t0
        finally:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
        assert "Traceback" not in err
        assert took < 1.5, (took, err)
        assert tgt.poll() is None
        assert not _traced(tgt.pid)
        off = func_offset(target, "work")
        with open(target, "rb") as f:
            f.seek(off)
            want = f.read(16)
        assert _code_at(tgt.pid, target, off) == want
    finally:
        tgt.kill()
        tgt.wait()


def _code_at(pid: int, path: Path, off: int) -> bytes:
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            parts = line.split()
            if len(parts) >= 6 and "x" in parts[1] and parts[5] == str(path):
                start, end = (int(x, 16) for x in parts[0].split("-"))
                foff = int(parts[2], 16)
                if foff <= off < foff + end - start:
                    with open(f"/proc/{pid}/mem", "rb") as mem:
                        mem.seek(start + off - foff)
                        return mem.read(16)
    raise AssertionError("not mapped")


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def _target_pid(err: str) -> int:
    for line in err.splitlines():
        if line.startswith("ubpf-run: command "):
            return int(line.split()[2])
    raise AssertionError(err)


@pytest.mark.parametrize("backend", ["userspace", "kernel"])
def test_command_ends_with_the_session(objs, target, backend):
    if backend == "kernel":
        from ubpf_py.kernel.syscall import kernel_bpf_skip_reason

        if reason := kernel_bpf_skip_reason():
            pytest.skip(reason)
    p = run_cli(str(objs["count"]), "--backend", backend, "-a", f"count={target}:work", "-d", "0.5", "--",
                str(target), "spin", timeout=60)
    assert p.returncode == 0, p.stderr
    assert "ended with the session (SIGTERM" in p.stderr
    assert "was killed by signal 15" in p.stderr
    assert "calls = " in p.stdout
    assert _gone(_target_pid(p.stderr))


def test_keep_command_refused_by_kernel_backend(objs, target):
    p = run_cli(str(objs["count"]), "--backend", "kernel", "--keep-command", "-a", f"count={target}:work",
                "--", str(target), "segv")
    assert_one_line_error(p, "not supported", "--keep-command")


def test_keep_command_keeps_it(objs, target, tmp_path):
    # the kept command inherits ubpf-run's stdout/stderr: files, not pipes nobody would close;
    # it outlives ubpf-run, so this process becomes its reaper (no zombie left under init)
    import ctypes

    prctl = ctypes.CDLL(None).prctl
    prctl(36, 1, 0, 0, 0)          # PR_SET_CHILD_SUBREAPER
    pid = 0
    with open(tmp_path / "out.txt", "w+") as out, open(tmp_path / "err.txt", "w+") as errf:
        p = subprocess.Popen([sys.executable, "-m", "ubpf_py.cli", str(objs["count"]), "-a",
                              f"count={target}:work", "-d", "0.5", "--keep-command", "--", str(target), "spin"],
                             stdout=out, stderr=errf, env=dict(os.environ, PYTHONPATH=str(REPO)))
        try:
            assert p.wait(timeout=60) == 0
            errf.seek(0)
            err = errf.read()
            assert "keeps running, no longer traced (--keep-command)" in err
            pid = _target_pid(err)
            assert pid > 0
            assert not _gone(pid) and not _traced(pid)
        finally:
            if pid > 0:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
            prctl(36, 0, 0, 0, 0)


@pytest.mark.serial
def test_terminal_ctrl_c_reaches_both(objs, target):
    """A terminal Ctrl-C is SIGINT to the foreground process group: ubpf-run and the command it
    started (same group).  The command's own SIGINT handler runs as without tracing, and
    ubpf-run ends within a second having printed its maps."""
    p = _start(str(objs["count"]), "-a", f"count={target}:work", "--", str(target), "sigint")
    try:
        first = p.stdout.readline()          # the target runs main: tracing has started
        assert first == "spinning\n"
        time.sleep(0.4)
        t0 = time.monotonic()
        os.killpg(p.pid, signal.SIGINT)
        out, err = p.communicate(timeout=20)
        took = time.monotonic() - t0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
    assert "Traceback" not in err
    assert "got SIGINT" in out, (out, err)
    assert "calls = " in out
    assert took < 1.5
    assert p.returncode == 0, err
