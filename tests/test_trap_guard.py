"""The trap guard (ubpf_py/probe/trapguard.py): a SIGTRAP handler in the target that keeps it alive
when the tracer is killed while threads sit on, or run into, our int3 bytes.

Checked against what the target would see without us: its own int3 still kills it with SIGTRAP,
its own SIGTRAP handler is left alone, an unfollowed fork child gets the default disposition back.
The kill tests (every round survives) and the detach test (disposition back, nothing mapped) are
in tests/test_probe_detach.py, next to the guardian's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_probe_support import REPO, build_c, func_offset

from ubpf_py.probe.trapguard import SIGTRAP

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
