"""Maps allocated from a SharedArena: every byte of storage inside the arena, same behaviour."""

from __future__ import annotations

import pytest

from ubpf_py.intarget.arena import SharedArena
from ubpf_py.maps import consts as C
from ubpf_py.maps import create_map
from ubpf_py.maps import descriptor as D
from ubpf_py.obj.spec import MapSpec


@pytest.fixture(scope="module")
def arena():
    a = SharedArena(64 << 20)
    yield a
    # the arena stays mapped until the process ends: maps created here may outlive the test


def _inside(arena, m):
    assert arena.contains(m.handle_addr, D.HANDLE_SIZE)
    for r in m.regions():
        assert arena.contains(r.start, r.end - r.start), r.name


@pytest.mark.parametrize("mtype", [C.HASH, C.PERCPU_HASH, C.LRU_HASH, C.LRU_PERCPU_HASH])
def test_hash_family_in_arena(arena, mtype):
    m = create_map(MapSpec("h", mtype, 8, 16, 64), ncpus=2, alloc=arena)
    _inside(arena, m)
    w = m._handle.view.cast("Q")
    assert arena.contains(w[D.D_TABLE]) and arena.contains(w[D.D_KEYS]) and arena.contains(w[D.D_VALUES])
    if m.lru:
        assert arena.contains(w[D.D_REF])
    for i in range(200):   # enough deletes to force index rebuilds (rebuilt tables too)
        k = i.to_bytes(8, "little")
        assert m.update(k, bytes(16), 0, cpu=0) == 0
        if not m.lru and i < 199:
            assert m.delete(k) == 0
        assert arena.contains(w[D.D_TABLE])
    if not m.lru:   # 199 deletes: the index was rebuilt into the spare table (and back)
        assert w[D.W["seq"]] >= 4 and arena.contains(w[D.W["spare_table"]])
    addr = m.lookup_addr((199).to_bytes(8, "little"), 1)
    assert arena.contains(addr, 16)


def test_arrays_globals_ring_perf_queue_stack_in_arena(arena):
    specs = [MapSpec("a", C.ARRAY, 4, 8, 10), MapSpec("pa", C.PERCPU_ARRAY, 4, 8, 10),
             MapSpec(".data", C.ARRAY, 4, 8, 1, data=b"\x01\x02", section=".data", internal=True),
             MapSpec("rb", C.RINGBUF, 0, 0, 4096), MapSpec("q", C.QUEUE, 0, 8, 4),
             MapSpec("st", C.STACK_TRACE, 4, 64, 16)]
    for s in specs:
        m = create_map(s, ncpus=2, alloc=arena)
        _inside(arena, m)
    data = create_map(specs[2], alloc=arena)
    assert data.lookup(b"\0\0\0\0")[:2] == b"\x01\x02"
    rb = create_map(MapSpec("rb2", C.RINGBUF, 0, 0, 4096), alloc=arena)
    assert rb.output(b"abc") == 0 and rb.consume() == [b"abc"]
    perf = create_map(MapSpec("pe", C.PERF_EVENT_ARRAY, 4, 4, 2), ncpus=2, alloc=arena)
    assert perf.output(1, b"xyz") == 0
    assert arena.contains(perf._rings[1].buf.ctypes.data, perf._rings[1].size)
    assert perf.consume() == [(1, b"xyz\0")]
