"""A collection loaded with its maps in a shared arena behaves exactly like one with
private maps when its programs run in the tracer (JIT and interpreter): the same map
objects serve the ptrace path and the in-target runtime."""

from __future__ import annotations

import random
import struct

import pytest
from intarget_fixture import needs_runtime

from ubpf_py.abi.kernel import PT_REGS
from ubpf_py.intarget.arena import SharedArena
from ubpf_py.live.collection import Collection
from ubpf_py.obj.elf import load_object

pytestmark = needs_runtime


@pytest.fixture(scope="module")
def arena():
    return SharedArena(64 << 20)


def _run(coll, prog: str, calls: list[tuple[int, ...]]) -> None:
    lp = coll.program(prog)
    view = coll.ctx_buffer.view
    for args in calls:
        regs = [0] * 21
        for reg, v in zip(("rdi", "rsi", "rdx"), args, strict=False):
            regs[PT_REGS.word(reg)] = v & (2 ** 64 - 1)
        view[0:PT_REGS.size] = struct.pack("<21Q", *regs)
        lp.run(coll.ctx_buffer.addr)


def _dump(coll) -> dict[str, list]:
    out = {}
    for name, m in coll.maps.items():
        if m.spec.type == 27:  # ringbuf
            out[name] = m.consume()
        else:
            out[name] = sorted(m.items())
    return out


@pytest.mark.parametrize("engine", ["jit", "interp"])
def test_counters_and_ringbuf_same_with_arena(arena, corpus_build, engine):
    rng = random.Random(5)
    ticks = [(rng.randrange(16), rng.randrange(64)) for _ in range(400)]
    subs = [(rng.randrange(4), rng.randrange(1 << 40), 0) for _ in range(200)]
    results = []
    for a in (None, arena):
        c1 = Collection.load(load_object(str(corpus_build / "counters.bpf.o")), engine=engine, arena=a)
        _run(c1, "tick_entry", ticks)
        c2 = Collection.load(load_object(str(corpus_build / "ringbuf.bpf.o")), engine=engine, arena=a)
        _run(c2, "submit_entry", subs)
        results.append((_dump(c1), _dump(c2)))
        if a is not None:
            for coll in (c1, c2):
                for m in coll.maps.values():
                    assert arena.contains(m.handle_addr)
            assert c1.maps["per_thread"]._c is not None      # hash inserts went through C
    assert results[0] == results[1]
    assert len(results[0][1]["rb"]) > 20
