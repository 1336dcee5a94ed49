"""The in-target runtime's mappings: the arena is one memory seen by tracer and target at the
same address, the private area and image are placed without disturbing the target, and
uninstalling leaves the target's mappings exactly as they were."""

from __future__ import annotations

import os
import signal

import pytest

from ubpf_py.intarget import space as S
from ubpf_py.intarget.arena import SharedArena
from ubpf_py.intarget.inject import TargetMapper
from ubpf_py.probe.engine import ProbeSession


def _maps(pid: int) -> list[str]:
    with open(f"/proc/{pid}/maps") as f:
        return [" ".join(line.split()[:2] + line.split()[5:]) for line in f]


@pytest.fixture
def stopped_target():
    s = ProbeSession.launch(["/bin/sleep", "30"], native=False)
    yield s
    try:
        os.kill(s.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    s.detach()


def test_arena_is_shared_at_one_address_and_uninstall_restores(stopped_target):
    s = stopped_target
    proc = s.tracer.main
    tid = proc.any_stopped_tid()
    before = _maps(s.pid)
    plan = S.plan_space(s.pid, arena_size=1 << 24)
    rt = S.ProcRuntime(s.pid)
    mapper = TargetMapper(proc.inj, s.pid)
    S.install_private(mapper, proc.mem, tid, plan, rt)
    fd = S.create_arena(mapper, proc.mem, tid, plan, rt)
    arena = SharedArena(plan.arena_size, addr_hint=plan.arena_addr, fd=fd)
    try:
        buf = arena.alloc(64)
        buf.view[:5] = b"hello"
        assert proc.mem.read(buf.addr, 5) == b"hello"           # the tracer's write, seen by the target
        assert proc.mem.write(buf.addr + 8, b"world")
        assert bytes(buf.view[8:13]) == b"world"                 # the target's memory, seen by the tracer
        S.write_header(proc.mem, plan, s.pid, printk_ring=0)
        hdr = proc.mem.read(plan.header_addr, 16)
        assert int.from_bytes(hdr[:8], "little") != 0
        target_fds = {os.readlink(f"/proc/{s.pid}/fd/{n}") for n in os.listdir(f"/proc/{s.pid}/fd")}
        assert not any("memfd" in t for t in target_fds), "the target keeps no descriptor of ours"
        S.uninstall(mapper, tid, plan, rt)
        assert _maps(s.pid) == before
    finally:
        arena.close()
