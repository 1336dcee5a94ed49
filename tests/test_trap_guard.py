"""The trap guard (ubpf_py/probe/trapguard.py): a SIGTRAP handler in the target that keeps it alive
when the tracer is killed while threads sit on, or run into, our int3 bytes.

Checked against what the target would see without us: its own int3 still kills it with SIGTRAP,
its own SIGTRAP handler is left alone, an unfollowed fork child and a detached target get the
default disposition back, and no mapping of ours is left.  The kill test is the one that failed
before the guard: under heavy probing (4 threads calling an entry- and return-probed function in a
tight loop) nearly every kill -9 of the tracer killed the target (benchmarks/ptrace_floor/
kill_survival.py: 0 of 10)."""

from __future__ import annotations

import ctypes
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_probe_support import FLOOR_DIR, REPO, build_c, func_offset

from ubpf_py.probe import ptrace as P
from ubpf_py.probe.trapguard import SIGTRAP, disposition

HERE = Path(__file__).resolve().parent
KILL_SCRIPT = REPO / "benchmarks" / "ptrace_floor" / "kill_survival.py"

#: a tracer in a subprocess (the guardian forks from it): probes tick() (entry and return) in a
#: launched target with the guardian on, records the SIGTRAP disposition at the first hit
DRIVER = """
import json, sys
sys.path.insert(0, sys.argv[1])
from ubpf_py.probe.engine import ProbeSession
from ubpf_py.probe.trapguard import disposition
target, mode, out = sys.argv[2], sys.argv[3], sys.argv[4]
fd = open(out, "w")
s = ProbeSession.launch([target, mode], stdout=fd.fileno(), guardian=True)
seen = {"hits": 0}
def entry(hit):
    if not seen["hits"]:
        seen["during"] = disposition(s.pid)
    seen["hits"] += 1
off = int(sys.argv[5])
s.add_probe(target, off, entry)
s.add_probe(target, off, lambda hit: None, is_return=True)
seen["rc"] = s.run()
print(json.dumps(seen))
"""


@pytest.fixture(scope="module")
def trap_target(tmp_path_factory):
    d = tmp_path_factory.mktemp("trap_guard")
    return build_c(HERE / "trap_guard_target.c", d / "trap_guard_target")


@pytest.fixture(scope="module")
def mt(tmp_path_factory):
    d = tmp_path_factory.mktemp("mt_target")
    return build_c(FLOOR_DIR / "mt_target.c", d / "mt_target", "-pthread")


def _traced(target: Path, mode: str, tmp_path: Path) -> tuple[dict, str]:
    out = tmp_path / f"{mode}.out"
    r = subprocess.run([sys.executable, "-c", DRIVER, str(REPO), str(target), mode, str(out),
                        str(func_offset(target, "tick"))], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1]), out.read_text()


def test_own_int3_still_kills_with_sigtrap(trap_target, tmp_path):
    """The guard is installed (the disposition reads 'caught' while we trace), yet the target's own
    int3 ends it as without a tracer: killed by SIGTRAP."""
    plain = subprocess.run([str(trap_target), "own-int3"], capture_output=True, timeout=30)
    assert plain.returncode == -SIGTRAP
    seen, out = _traced(trap_target, "own-int3", tmp_path)
    assert seen["during"] == "caught", "no trap guard was installed"
    assert seen["hits"] == 1000
    assert seen["rc"] == -SIGTRAP, seen
    assert out == "sum=1499500\n"


def test_target_handler_left_alone(trap_target, tmp_path):
    """A target with its own SIGTRAP handler gets no guard: its handler stays and catches."""
    seen, out = _traced(trap_target, "own-handler", tmp_path)
    assert seen["hits"] == 1000 and seen["rc"] == 0, seen
    assert out == "kept=1 caught=1\n"


def test_unfollowed_fork_child_gets_default_back(trap_target, tmp_path):
    seen, out = _traced(trap_target, "fork", tmp_path)
    assert seen["during"] == "caught"
    assert seen["hits"] == 2000 and seen["rc"] == 0, seen
    assert out == "child dfl=1\n"


def _start(mt: Path, tmp_path: Path, threads: int, guardian: bool) -> tuple[subprocess.Popen, int, Path]:
    out = tmp_path / "target.out"
    with open(tmp_path / "tracer.err", "w") as err:
        tr = subprocess.Popen([sys.executable, str(KILL_SCRIPT), "--tracer", str(mt), str(threads), "-1",
                               "1" if guardian else "0", "1", str(out)], stdout=subprocess.PIPE, stderr=err,
                              text=True, cwd=REPO)
    return tr, int(tr.stdout.readline()), out


def _anon_exec(pid: int) -> list[str]:
    with open(f"/proc/{pid}/maps") as f:
        return [ln for ln in f if len(ln.split()) == 5 and "x" in ln.split()[1]]


def _gone(pid: int, timeout: float) -> bool:
    """Reaped within ``timeout`` (checked at least once; the target is our child or, its tracer
    gone, reparented to us: ``subreaper``)."""
    end = time.monotonic() + timeout
    while True:
        try:
            r, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return True
        if r == pid:
            return True
        if time.monotonic() >= end:
            return False
        time.sleep(0.02)


@pytest.fixture
def subreaper():
    """Orphaned targets (their tracer killed) come back to this process to be reaped."""
    ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)       # PR_SET_CHILD_SUBREAPER
    yield
    ctypes.CDLL(None).prctl(36, 0, 0, 0, 0)


def test_detach_puts_disposition_back(mt, tmp_path, subreaper):
    """A clean detach (SIGTERM to the tracer): the disposition is the default again and no mapping
    of ours is left; while traced it was the guard's."""
    tr, pid, out = _start(mt, tmp_path, 2, guardian=True)
    try:
        time.sleep(0.3)
        assert disposition(pid) == "caught"
        tr.send_signal(signal.SIGTERM)
        assert tr.wait(timeout=30) is not None
        assert P.tracer_pid(pid) == 0
        assert disposition(pid) == "default"
        assert _anon_exec(pid) == [], "a guard or scratch mapping was left"
        os.kill(pid, signal.SIGTERM)
        assert _gone(pid, 20)
        assert out.read_text() == "ready\nstopped total>0=1 bad=0\n"
    finally:
        if not _gone(pid, 0):
            os.kill(pid, signal.SIGKILL)
            _gone(pid, 5)


def test_every_kill9_under_heavy_probing_survives(mt, tmp_path, subreaper):
    """kill -9 of the tracer at a random moment while 4 threads call an entry- and return-probed
    function in a tight loop: every round, the target runs on with its code intact and every
    result right.  Without the guard a thread held on an int3 at the kill died of SIGTRAP."""
    data = mt.read_bytes()
    off = func_offset(mt, "tick")
    rng = random.Random(7)
    for rnd in range(6):
        tr, pid, out = _start(mt, tmp_path, 4, guardian=True)
        try:
            time.sleep(rng.uniform(0.1, 0.4))
            tr.kill()
            tr.wait()
            time.sleep(0.5)                          # the guardian repairs
            assert not _gone(pid, 0), f"round {rnd}: the target died with its tracer"
            mem = P.ProcMem(pid)
            try:
                with open(f"/proc/{pid}/maps") as f:
                    for ln in f:
                        p = ln.split()
                        if len(p) > 5 and p[5] == str(mt) and "x" in p[1]:
                            a = int(p[0].split("-")[0], 16) + off - int(p[2], 16)
                            assert mem.read(a, 8) == data[off:off + 8], f"round {rnd}: int3 left"
            finally:
                mem.close()
            time.sleep(0.2)                          # a stray trap would kill it now
            os.kill(pid, signal.SIGTERM)
            assert _gone(pid, 20), f"round {rnd}: hung"
            assert out.read_text() == "ready\nstopped total>0=1 bad=0\n", f"round {rnd}"
        finally:
            if not _gone(pid, 0):
                os.kill(pid, signal.SIGKILL)
                _gone(pid, 5)
