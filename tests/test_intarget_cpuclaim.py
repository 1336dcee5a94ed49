"""CPU ids owned per hit (runtime/cpuclaim.c): the in-target form of the kernel's
migrate_disable, so two hits never use one CPU's copy of a per-CPU map at once.

The race itself is rare (a thread migrated between sampling its CPU and its update, while
another thread runs there), so the mechanism is shown deterministically: the test holds CPU
ids through the arena's CPU_OWNER lines (the same shared memory a tracer and its targets
map) and pins itself to a CPU.  A hit must then take a free id -- not the CPU it runs on --
and use that id for everything per-CPU: map lookups, bpf_get_smp_processor_id, the
for_each walker, tail-called programs; with every id held it gives up after the bound and
counts a miss.  The target code runs in this process, linked with the runtime exactly as
into a target (tests/test_intarget_foreach.py does the same); the end-to-end runs (8
threads on the real path, detach with held ids) are in test_intarget_percpu_e2e.py.
"""

from __future__ import annotations

import ctypes
import os
import time
from pathlib import Path

import pytest
from bpf_build import compile_bpf
from intarget_fixture import make_frame, needs_runtime

from ubpf_py.abi.runtime import CPU_OWNER, HIT_FRAME, PROBE_BLOCK, RT_F_RDPID, RUNTIME_HEADER
from ubpf_py.intarget import runtime_obj
from ubpf_py.intarget.arena import SharedArena
from ubpf_py.intarget.selfload import load_here
from ubpf_py.live.collection import Collection
from ubpf_py.obj.elf import load_object
from ubpf_py.vm.jit.target import compile_for_target

pytestmark = needs_runtime
SRC = Path(__file__).resolve().parent / "targets" / "cpuclaim" / "cpuclaim.bpf.c"
ENTRY = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint64)
M64 = (1 << 64) - 1
KEY = bytes(4)


class Target:
    """The object's programs compiled for the target and linked here; the prog array's slot 0
    holds pcount's tail-call entry."""

    def __init__(self, path: Path) -> None:
        self.arena = SharedArena(16 << 20)
        self.coll = Collection.load(load_object(str(path)), engine="jit", arena=self.arena)
        self.frame = make_frame(self.arena)
        progs = self.coll.maps["progs"]
        table = self.arena.alloc(8, 64)
        codes = {name: compile_for_target(lp.instructions, name, self.coll.env.maps_by_addr,
                                          tail_tables={progs.handle_addr: (table.addr, 1)})
                 for name, lp in self.coll.programs.items()}
        img = load_here([("runtime", runtime_obj.object_bytes())]
                        + [(f"prog:{n}", c.obj) for n, c in codes.items()])
        self.entries = {n: img.fn(c.entry, ENTRY) for n, c in codes.items()}
        table.view.cast("Q")[0] = img.addr(codes["pcount"].tail_entry)
        self.owners, self.ids = self.arena.cpu_owners()

    def run(self, prog: str) -> None:
        self.entries[prog](self.frame.regs_addr, self.frame.addr)

    def owner(self, cpu_id: int) -> ctypes.c_uint64:
        return ctypes.c_uint64.from_address(self.owners + cpu_id * CPU_OWNER.size + CPU_OWNER.off("owner"))

    def hold(self, ids) -> None:
        for i in range(self.ids):
            self.owner(i).value = 1 if i in ids else 0

    def copies(self, name: str) -> list[int]:
        return [int.from_bytes(v, "little") for v in self.coll.maps[name].lookup_percpu(KEY)]

    def reset(self) -> None:
        for name in ("pcpu", "ids"):
            m = self.coll.maps[name]
            assert m.update(KEY, bytes(8 * m.ncpus)) == 0
        self.frame.set_probe("missed", 0)
        self.frame.set_probe("hits", 0)
        self.hold(())

    def hit_frame_word(self, name: str) -> int:
        return ctypes.c_uint64.from_address(self.frame.addr + HIT_FRAME.off(name)).value


@pytest.fixture(scope="module")
def target(tmp_path_factory) -> Target:
    return Target(compile_bpf(SRC.read_text(), tmp_path_factory.mktemp("cpuclaim"), "cpuclaim"))


@pytest.fixture
def pinned():
    """This thread pinned to one CPU (the one it runs on): the CPU a hit samples is known."""
    before = os.sched_getaffinity(0)
    cpu = min(before)
    os.sched_setaffinity(0, {cpu})
    yield cpu
    os.sched_setaffinity(0, before)


def _other(target: Target, cpu: int) -> int:
    if target.ids < 2:
        pytest.skip("one possible CPU: there is no other id to take")
    return (cpu + 1) % target.ids


def test_every_process_header_points_at_the_arena_lines(target: Target) -> None:
    assert target.ids == target.coll.maps["pcpu"].ncpus
    assert target.arena.contains(target.owners, target.ids * CPU_OWNER.size)
    assert target.owners % 64 == 0


def test_own_cpu_first_and_released_after(target: Target, pinned: int) -> None:
    target.reset()
    target.run("pcount")
    want = [0] * target.ids
    want[pinned] = 1
    assert target.copies("pcpu") == want
    assert [target.owner(i).value for i in range(target.ids)] == [0] * target.ids
    assert target.hit_frame_word("cpu_owner") == 0        # the next program of the hit claims anew


@pytest.mark.parametrize("prog, name, value", [
    ("pcount", "pcpu", 1),          # the inline lookup's copy
    ("cpuid", "ids", None),         # bpf_get_smp_processor_id() + 1 in the copy the lookup gave
    ("each", "pcpu", 1),            # the for_each walker's copy (runtime/foreach.c)
    ("jump", "pcpu", 1),            # a program without per-CPU maps tail-calls one: that one claims
    ("bump_jump", "pcpu", 2),       # the tail-called program keeps the caller's id (one hit, +2)
])
def test_a_held_cpu_id_sends_the_hit_to_a_free_one(target: Target, pinned: int, prog: str, name: str,
                                                   value: int | None) -> None:
    """The thread runs on CPU ``pinned`` but another hit owns that id (its thread was migrated
    away, or preempted): this hit uses the free id for every per-CPU access, and lets it go."""
    free = _other(target, pinned)
    target.reset()
    target.hold(set(range(target.ids)) - {free})
    target.run(prog)
    want = [0] * target.ids
    want[free] = free + 1 if value is None else value
    assert target.copies(name) == want
    assert target.owner(free).value == 0 and target.owner(pinned).value == 1
    assert target.frame.probe[PROBE_BLOCK.word("missed")] == 0


def test_all_ids_held_the_hit_gives_up_and_counts_a_miss(target: Target, pinned: int) -> None:
    """Owners that never let go (stopped by a debugger or by detach): the hit waits a bounded
    time, skips its program and counts it missed (taking back the hit the trampoline adds)."""
    target.reset()
    target.hold(set(range(target.ids)))
    t0 = time.monotonic()
    for prog in ("pcount", "jump", "each"):
        target.run(prog)
    took = time.monotonic() - t0
    assert took < 3.0, f"three skipped hits took {took:.2f} s"
    assert target.copies("pcpu") == [0] * target.ids
    assert target.frame.probe[PROBE_BLOCK.word("missed")] == 3
    assert target.frame.probe[PROBE_BLOCK.word("hits")] == (-3) & M64
    assert [target.owner(i).value for i in range(target.ids)] == [1] * target.ids
    target.hold(())
    target.run("pcount")
    assert sum(target.copies("pcpu")) == 1


@pytest.mark.parametrize("how", ["rdtscp", "no lines"])
def test_sampled_cpu_without_rdpid_or_owner_lines(target: Target, pinned: int, how: str) -> None:
    """rdtscp when the header says rdpid does not work; without owner lines (a header that has
    none) the hit runs on the CPU it samples, unowned, as before."""
    hdr = target.frame.header
    saved = {n: hdr[RUNTIME_HEADER.word(n)] for n in ("flags", "cpu_ids")}
    try:
        if how == "rdtscp":
            hdr[RUNTIME_HEADER.word("flags")] &= ~RT_F_RDPID
        else:
            hdr[RUNTIME_HEADER.word("cpu_ids")] = 0
        target.reset()
        target.run("cpuid")
        target.run("pcount")
        want = [0] * target.ids
        want[pinned] = 1
        assert target.copies("pcpu") == want
        want[pinned] = pinned + 1
        assert target.copies("ids") == want
        assert target.hit_frame_word("cpu_owner") == 0
    finally:
        for n, v in saved.items():
            hdr[RUNTIME_HEADER.word(n)] = v
