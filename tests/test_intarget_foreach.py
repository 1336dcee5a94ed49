"""bpf_for_each_map_elem in code compiled for the target (runtime/foreach.c) against the
tracer's JIT on the same object: the same calls give the same map contents (callback sums,
elements visited, the stop after a callback returning 1, deletes from inside the callback,
per-CPU values of this CPU, -EINVAL for flags) on every map type the kernel walks.

The target code runs in this process: the runtime and the program are linked here exactly as
they are into a target, and the entry gets a hit frame laid out as the trampolines lay it out.
The end-to-end runs (in-target vs ptrace vs the kernel) are in test_intarget_helpers_e2e.py."""

from __future__ import annotations

import ctypes
import random
from pathlib import Path

import pytest
from bpf_build import compile_bpf
from intarget_fixture import make_frame, needs_runtime

from ubpf_py.abi.kernel import PT_REGS
from ubpf_py.intarget import runtime_obj
from ubpf_py.intarget.arena import SharedArena
from ubpf_py.intarget.selfload import load_here
from ubpf_py.live.collection import Collection
from ubpf_py.live.intarget import program_reason
from ubpf_py.obj.elf import load_object
from ubpf_py.vm.jit.target import compile_for_target

pytestmark = needs_runtime
SRC = Path(__file__).resolve().parent / "targets" / "foreach" / "foreach.bpf.c"
ENTRY = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint64)


@pytest.fixture(scope="module")
def obj(tmp_path_factory) -> Path:
    return compile_bpf(SRC.read_text(), tmp_path_factory.mktemp("foreach"), "foreach")


class TracerSide:
    def __init__(self, path: Path, arena: SharedArena | None, cpu: int) -> None:
        self.coll = Collection.load(load_object(str(path)), engine="jit", arena=arena)
        self.coll.env.hit.cpu = cpu

    def call(self, prog: str, *args: int) -> None:
        regs = self.coll.ctx_buffer.view.cast("Q")
        for reg, v in zip(("rdi", "rsi"), args, strict=False):
            regs[PT_REGS.word(reg)] = v
        self.coll.program(prog).run(self.coll.ctx_buffer.addr)


class TargetSide:
    """The object's programs compiled for the target, linked with the runtime into this process."""

    def __init__(self, path: Path, arena: SharedArena) -> None:
        self.coll = Collection.load(load_object(str(path)), engine="jit", arena=arena)
        self.frame = make_frame(arena)
        codes = {}
        for name, lp in self.coll.programs.items():
            assert program_reason(lp, "strict", runtime_obj.helper_ids()) is None, name
            codes[name] = compile_for_target(lp.instructions, name, self.coll.env.maps_by_addr)
        img = load_here([("runtime", runtime_obj.object_bytes())]
                        + [(f"prog:{n}", c.obj) for n, c in codes.items()])
        self.entries = {n: img.fn(c.entry, ENTRY) for n, c in codes.items()}

    def call(self, prog: str, *args: int) -> None:
        for reg, v in zip(("rdi", "rsi"), args, strict=False):
            self.frame.set_reg(reg, v)
        self.entries[prog](self.frame.regs_addr, self.frame.addr)


def _dump(coll: Collection) -> dict[str, list]:
    return {name: sorted(m.items()) for name, m in coll.maps.items() if not name.startswith(".")}


def _script(seed: int) -> list[tuple]:
    rng = random.Random(seed)
    out: list[tuple] = []
    for _ in range(300):
        r = rng.random()
        if r < 0.6:
            out.append(("fill", rng.randrange(80), rng.randrange(1 << 40)))
        elif r < 0.9:
            out.append(("walk", rng.randrange(50)))
        else:
            out.append(("prune", rng.randrange(2)))
    return out


@pytest.mark.parametrize("seed", [1, 2])
def test_for_each_in_target_matches_tracer_jit(obj, pinned, seed):
    arena = SharedArena(64 << 20)
    sides = [TracerSide(obj, arena, pinned), TargetSide(obj, arena)]
    for step in _script(seed):
        for s in sides:
            s.call(*step)
    tracer, target = (_dump(s.coll) for s in sides)
    assert tracer == target
    totals = target["out"][0][1]
    words = [int.from_bytes(totals[i:i + 8], "little") for i in range(0, len(totals), 8)]
    visited, pruned, bad_flags = words[6:12], words[24], words[25]
    assert all(v > 0 for v in visited) and pruned > 0 and bad_flags > 0
    assert words[0:6] == visited          # every visit was a callback (none skipped or doubled)


def test_for_each_array_stops_at_the_callback_returning_1(obj, pinned):
    """Arrays are walked in index order by both sides: stop at k visits k + 1 elements."""
    arena = SharedArena(16 << 20)
    t = TargetSide(obj, arena)
    t.call("walk", 5)
    totals = t.coll.maps["out"].lookup(bytes(4))
    words = [int.from_bytes(totals[i:i + 8], "little") for i in range(0, len(totals), 8)]
    assert words[6] == 6 and words[7] == 6          # array, percpu array: keys 0..5
    assert words[8:12] == [0, 0, 0, 0]              # empty hash maps: nothing visited
    assert words[12] == sum(range(6))
