"""The hash maps' native index has three implementations, and they agree on the same memory.

* Python: ``maps.descriptor`` (``key_hash``, ``NativeIndex``) keeps the index of a map the
  tracer owns;
* the JIT: ``vm.jit.fastpath``'s IR pieces (``@bpf_fast_hash``, ``@bpf_fast_find``,
  ``@bpf_fast_slot_addr``), compiled here with llvmlite on their own;
* C: ``runtime/maps.c`` (the in-target runtime, linked into this process as the tracer
  does), which owns the index of maps shared with a target.

Python-built tables are read by the JIT and by C; C-built tables (inserts, deletes,
rebuilds, LRU evictions) are read by the JIT and by a probe written from the Python
definitions, and an index driven by ``NativeIndex`` through the same operations is
word-for-word the table C built.  Keys are chosen to collide, so probe chains, tombstones
in the middle of chains, full tables and rebuilds are all exercised.
"""

from __future__ import annotations

import ctypes
import random
from types import SimpleNamespace

import pytest

from ubpf_py.intarget.arena import SharedArena
from ubpf_py.intarget.runtime_obj import try_tracer_runtime, unavailable_reason
from ubpf_py.maps import consts as C
from ubpf_py.maps import create_map
from ubpf_py.maps import descriptor as D
from ubpf_py.obj.spec import MapSpec
from ubpf_py.vm.jit import fastpath
from ubpf_py.vm.jit import layout as L
from ubpf_py.vm.jit.backend import backend
from ubpf_py.vm.memory import HostBuffer

_u64, _s64, _vp = ctypes.c_uint64, ctypes.c_int64, ctypes.c_void_p

#: external entry points around the internal IR pieces under test
_WRAPPERS = """
define i64 @agree_hash(ptr %k, i64 %n) {
  %h = call i64 @bpf_fast_hash(ptr %k, i64 %n)
  ret i64 %h
}
define i64 @agree_find(ptr %d, ptr %k, i64 %n) {
  %s = call i64 @bpf_fast_find(ptr %d, ptr %k, i64 %n)
  ret i64 %s
}
define i64 @agree_slot_addr(ptr %d, ptr %rt, i64 %slot) {
  %a = call i64 @bpf_fast_slot_addr(ptr %d, ptr %rt, i64 %slot)
  ret i64 %a
}
"""


@pytest.fixture(scope="module")
def jit():
    ir = (fastpath.key_hash_ir() + fastpath.key_equal_ir() + fastpath.find_ir()
          + fastpath.slot_addr_ir() + _WRAPPERS)
    addrs = backend().compile(ir, ["agree_hash", "agree_find", "agree_slot_addr"], "O2")
    rt = (_u64 * L.NUM_SLOTS)()
    return SimpleNamespace(
        hash=ctypes.CFUNCTYPE(_u64, ctypes.c_char_p, _u64)(addrs["agree_hash"]),
        find_=ctypes.CFUNCTYPE(_s64, _vp, ctypes.c_char_p, _u64)(addrs["agree_find"]),
        slot_addr_=ctypes.CFUNCTYPE(_u64, _vp, _vp, _u64)(addrs["agree_slot_addr"]),
        rt=rt,
    )


@pytest.fixture(scope="module")
def crt():
    rt = try_tracer_runtime()
    if rt is None:
        pytest.skip(f"the C runtime cannot be built here: {unavailable_reason()}")
    return rt


@pytest.fixture(scope="module")
def arena():
    return SharedArena(32 << 20)   # stays mapped until the process ends (maps may outlive tests)


def jit_find(jit, m, key: bytes) -> int:
    return jit.find_(m.handle_addr, key, len(key))


def jit_value_addr(jit, m, slot: int, cpu: int) -> int:
    jit.rt[L.SLOT_CPU] = cpu
    return jit.slot_addr_(m.handle_addr, ctypes.addressof(jit.rt), slot)


def c_find(crt, m, key: bytes) -> int:
    return crt.hash_find(m.handle_addr, key) - 1


def words(m) -> memoryview:
    return m._handle.view.cast("Q")


def table(m) -> list[int]:
    w = words(m)
    n = w[D.D_LIMIT] + 1
    return list((_u64 * n).from_address(w[D.D_TABLE]))


def py_find(m, key: bytes) -> int:
    """A probe written from the Python definitions (``key_hash``, ``TOMBSTONE``, the
    descriptor words) over whatever table the descriptor names."""
    w = words(m)
    mask, tab = w[D.D_LIMIT], (_u64 * (w[D.D_LIMIT] + 1)).from_address(w[D.D_TABLE])
    i = D.key_hash(key) & mask
    while tab[i]:
        e = tab[i]
        if e != D.TOMBSTONE and ctypes.string_at(w[D.D_KEYS] + (e - 1) * w[D.D_KEY_STRIDE], len(key)) == key:
            return e - 1
        i = (i + 1) & mask
    return -1


def colliding_keys(key_size: int, mask: int, n: int, seed: int) -> list[bytes]:
    """``n`` distinct keys, most of them in a few probe chains (same ``hash & mask``)."""
    rng = random.Random(seed)
    by_bucket: dict[int, list[bytes]] = {}
    while True:
        k = rng.getrandbits(8 * key_size).to_bytes(key_size, "little")
        by_bucket.setdefault(D.key_hash(k) & mask, []).append(k)
        chains = sorted(by_bucket.values(), key=len, reverse=True)
        if len(chains) >= 4 and len(chains[3]) >= 5 and sum(map(len, chains)) >= n:
            break
    keys = [k for c in chains[:4] for k in c[:5]]       # four chains of five
    keys += [c[0] for c in chains[4:]]                   # the rest spread out
    keys = list(dict.fromkeys(keys))
    random.Random(seed).shuffle(keys)
    return keys[:n]


@pytest.mark.parametrize("size", [1, 3, 4, 7, 8, 12, 16, 29, 40, 255])
def test_jit_hash_is_the_python_hash(jit, size):
    rng = random.Random(size)
    for _ in range(50):
        k = bytes(rng.getrandbits(8) for _ in range(size))
        assert jit.hash(k, size) == D.key_hash(k), k.hex()


def _check_all(jit, crt, m, universe: list[bytes], cpu: int) -> None:
    for k in universe:
        slot = m._index.get(k, -1)
        assert jit_find(jit, m, k) == slot, k.hex()
        assert c_find(crt, m, k) == slot, k.hex()
        if slot >= 0:
            addr = m.lookup_addr(k, cpu)
            assert jit_value_addr(jit, m, slot, cpu) == addr
            assert crt.map_lookup(m.handle_addr, k, cpu) == addr


@pytest.mark.parametrize("mtype,key_size", [(C.HASH, 4), (C.HASH, 12), (C.PERCPU_HASH, 8)])
def test_python_built_index_read_by_jit_and_c(jit, crt, mtype, key_size):
    max_entries = 40
    m = create_map(MapSpec("py", mtype, key_size, 8, max_entries), ncpus=2)
    assert m._native is not None and m._c is None
    universe = colliding_keys(key_size, m._native.mask, 60, seed=key_size)
    cpu = 1 if m.percpu else 0
    val = bytes(8 * (2 if m.percpu else 1))
    for k in universe[:30]:
        assert m.update(k, val) == 0
    _check_all(jit, crt, m, universe, cpu)
    for k in universe[2:30:3]:            # tombstones, several in the middle of chains
        assert m.delete(k) == 0
    assert m._native.tombs > 0
    _check_all(jit, crt, m, universe, cpu)
    for k in universe[2:14:3]:            # re-inserts reuse tombstones
        assert m.update(k, val) == 0
    _check_all(jit, crt, m, universe, cpu)
    for k in universe[30:]:               # up to a full map
        rc = m.update(k, val)
        if len(m._index) == max_entries and k not in m._index:
            assert rc == -C.E2BIG
        else:
            assert rc == 0
    assert len(m._index) == max_entries
    _check_all(jit, crt, m, universe, cpu)
    before = words(m)[D.D_TABLE]
    for k in list(m._index)[:-3]:         # enough deletes for a rebuild into the spare table
        assert m.delete(k) == 0
    assert words(m)[D.D_TABLE] != before and m._native.tombs <= m._native.cap // D.REBUILD_DIV
    _check_all(jit, crt, m, universe, cpu)


def test_lru_reference_bit_set_the_same_way(jit, crt):
    m = create_map(MapSpec("lru", C.LRU_HASH, 4, 8, 16))
    assert m._native is not None
    keys = [i.to_bytes(4, "little") for i in range(16)]
    for k in keys:
        assert m.update(k, bytes(8)) == 0
    k = keys[5]
    slot = m._index[k]
    for touch in (lambda: jit_value_addr(jit, m, jit_find(jit, m, k), 0),
                  lambda: crt.map_lookup(m.handle_addr, k, 0),
                  lambda: m.lookup_addr(k)):
        m._ref[:] = 0
        touch()
        assert m._ref.nonzero()[0].tolist() == [slot]


@pytest.mark.parametrize("key_size", [4, 12])
def test_c_built_index_is_the_python_index(jit, crt, arena, key_size):
    """Every C insert/delete (rebuilds included) leaves exactly the table NativeIndex makes
    from the same operations; the JIT and the Python probe find what C finds."""
    max_entries = 24
    m = create_map(MapSpec("c", C.HASH, key_size, 8, max_entries), alloc=arena)
    assert m._c is not None
    w = words(m)
    mirror = D.NativeIndex(max_entries, HostBuffer(D.HANDLE_SIZE).view)
    assert mirror.cap == w[D.D_LIMIT] + 1 == D.table_entries(max_entries)
    universe = colliding_keys(key_size, mirror.mask, 40, seed=100 + key_size)
    live: dict[bytes, int] = {}
    rng = random.Random(key_size)
    rebuilds = 0
    for step in range(400):
        k = rng.choice(universe)
        if k in live and rng.random() < 0.6:
            slot = live.pop(k)
            assert m.delete(k) == 0
            mirror.remove(k, slot, dict(sorted(live.items(), key=lambda kv: kv[1])))
        elif k not in live:
            rc = m.update(k, bytes(8))
            if len(live) == max_entries:
                assert rc == -C.E2BIG
                continue
            assert rc == 0
            live[k] = c_find(crt, m, k)
            mirror.insert(k, live[k])
        else:
            continue
        rebuilds = w[D.W["seq"]] // 2
        assert table(m) == list(mirror._tab), f"step {step}"
        assert w[D.W["tombs"]] == mirror.tombs
        for u in universe:
            want = live.get(u, -1)
            assert c_find(crt, m, u) == want and jit_find(jit, m, u) == want and py_find(m, u) == want
    assert rebuilds >= 2, "the sequence should have rebuilt the index"


def test_c_lru_eviction_seen_by_jit_and_python(jit, crt, arena):
    """C evicts from a full LRU map; a JIT lookup's reference bit gives its element the
    second chance C's eviction promises, and all three see the same elements."""
    m = create_map(MapSpec("clru", C.LRU_HASH, 4, 8, 16), alloc=arena)
    assert m._c is not None
    keys = [i.to_bytes(4, "little") for i in range(40)]
    for k in keys[:16]:
        assert m.update(k, bytes(8)) == 0
    slot0 = jit_find(jit, m, keys[0])
    jit_value_addr(jit, m, slot0, 0)      # the JIT's lookup marks keys[0] referenced
    assert m.update(keys[16], bytes(8)) == 0
    assert jit_find(jit, m, keys[0]) == slot0, "a referenced element must survive eviction"
    assert jit_find(jit, m, keys[1]) == -1, "the oldest unreferenced element is evicted"
    for k in keys[17:]:
        assert m.update(k, bytes(8)) == 0
    found = {k for k in keys if c_find(crt, m, k) >= 0}
    assert len(found) == 16 and words(m)[D.W["evictions"]] == 40 - 16
    for k in keys:
        want = c_find(crt, m, k)
        assert jit_find(jit, m, k) == want and py_find(m, k) == want


def test_a_tombstone_is_never_a_slot(jit, crt):
    """A hand-built index whose tombstone, read as ``slot + 1``, would name a stored copy of
    the key just before key storage: every side skips it and finds the real slot after it."""
    ks, stride = 4, 8
    key = (0x1234567).to_bytes(ks, "little")
    keys = HostBuffer(4 * stride)
    keys.view[0:ks] = key                  # where "slot TOMBSTONE - 1" (= -2) would point
    keys.view[2 * stride:2 * stride + ks] = key   # slot 0: the real element
    n = D.table_entries(2)
    tab = HostBuffer(n * 8)
    t = tab.view.cast("Q")
    mask = n - 1
    h = D.key_hash(key) & mask
    t[h], t[(h + 1) & mask] = D.TOMBSTONE, 1
    handle = HostBuffer(D.HANDLE_SIZE)
    D.write_descriptor(handle.view, {D.D_KEY_SIZE: ks, D.D_LIMIT: mask, D.D_TABLE: tab.addr,
                                     D.D_KEYS: keys.addr + 2 * stride, D.D_KEY_STRIDE: stride,
                                     D.W["max_entries"]: 2, D.D_KIND: D.KIND_HASH})
    m = SimpleNamespace(handle_addr=handle.addr, _handle=handle)
    assert jit_find(jit, m, key) == 0
    assert c_find(crt, m, key) == 0
    assert py_find(m, key) == 0
