"""LPM tries on a shared arena (runtime/maps.c LPM_TRIE, abi.maps KIND_LPM) give the same
results as the Python LpmTrieMap (maps/lpm.py) operation by operation -- lookups (longest
prefix match, including prefix lengths past the data), updates with every flag, deletes,
-ENOSPC when full, the kernel's post-order iteration -- and as the kernel's trie (root).
The runtime's helpers on the same descriptor (what target code calls) agree too, and
lookups from many threads stay right while the tracer inserts and deletes."""

from __future__ import annotations

import ctypes
import random
import struct
import threading

import pytest
from intarget_fixture import driver, make_frame, needs_runtime

from ubpf_py.intarget import runtime_obj
from ubpf_py.intarget.arena import SharedArena
from ubpf_py.maps import consts as C
from ubpf_py.maps import create_map
from ubpf_py.obj.spec import MapSpec

pytestmark = needs_runtime


@pytest.fixture(scope="module")
def arena():
    return SharedArena(64 << 20)


def key(plen: int, data: bytes) -> bytes:
    return struct.pack("<I", plen) + data


def _random_ops(rng: random.Random, ks: int, vs: int, n: int) -> list[tuple]:
    bits = 8 * (ks - 4)
    pool = [bytes(rng.randrange(256) for _ in range(ks - 4)) for _ in range(6)]

    def some_key() -> bytes:
        base = bytearray(rng.choice(pool))
        if rng.random() < 0.3:
            base[-1] ^= rng.randrange(256)        # host bits past the prefix differ
        return key(rng.choice([0, 1, 7, 8, 9, bits // 2, bits - 1, bits, bits + 1, rng.randrange(bits + 1)]),
                   bytes(base))

    ops: list[tuple] = []
    for _ in range(n):
        r = rng.random()
        if r < 0.4:
            ops.append(("update", some_key(), bytes(rng.randrange(256) for _ in range(vs)),
                        rng.choice([0, 0, C.BPF_NOEXIST, C.BPF_EXIST, 3])))
        elif r < 0.75:
            ops.append(("lookup", some_key()))
        elif r < 0.9:
            ops.append(("delete", some_key()))
        else:
            ops.append(("get_next_key", rng.choice([None, some_key()])))
    return ops


def _apply(m, op):
    name, *args = op
    return getattr(m, name)(*args)


@pytest.mark.parametrize("ks, vs, n", [(8, 8, 5), (8, 12, 40), (20, 4, 16), (5, 8, 9)])
def test_shared_trie_matches_python(arena, ks, vs, n):
    spec = MapSpec("t", C.LPM_TRIE, ks, vs, n, C.BPF_F_NO_PREALLOC)
    py, sh = create_map(spec), create_map(spec, alloc=arena)
    assert sh._c is not None
    rng = random.Random(ks * 1000 + vs * 10 + n)
    for i, op in enumerate(_random_ops(rng, ks, vs, 1500)):
        assert _apply(py, op) == _apply(sh, op), f"op {i} {op}"
    assert list(py.items()) == list(sh.items()) and len(py) == len(sh) > 0


def test_runtime_helpers_on_the_trie_match_python(arena):
    """bpf_map_lookup_elem / update / delete as target code calls them (the runtime's helpers,
    with a hit frame) against the Python helpers' map."""
    rt = runtime_obj.tracer_runtime()
    spec = MapSpec("t", C.LPM_TRIE, 8, 8, 12, C.BPF_F_NO_PREALLOC)
    py, sh = create_map(spec), create_map(spec, alloc=arena)
    f = make_frame(arena)
    buf = arena.alloc(64, 64)
    lookup, update, delete = rt.helper(1), rt.helper(2), rt.helper(3)
    rng = random.Random(7)
    for i, op in enumerate(_random_ops(rng, 8, 8, 1200)):
        if op[0] == "get_next_key":
            continue
        buf.view[0:8] = op[1]
        if op[0] == "lookup":
            addr = lookup(sh.handle_addr, buf.addr, 0, 0, 0, f.addr)
            got = ctypes.string_at(addr, 8) if addr else None
        elif op[0] == "update":
            buf.view[8:16] = op[2]
            got = ctypes.c_int64(update(sh.handle_addr, buf.addr, buf.addr + 8, op[3], 0, f.addr)).value
        else:
            got = ctypes.c_int64(delete(sh.handle_addr, buf.addr, 0, 0, 0, f.addr)).value
        assert got == _apply(py, op), f"op {i} {op}"
    assert list(py.items()) == list(sh.items())


def test_shared_trie_matches_kernel(arena):
    from ubpf_py.kernel.syscall import kernel_bpf_skip_reason

    why = kernel_bpf_skip_reason()
    if why:
        pytest.skip(why)
    from ubpf_py.kernel.maps import KernelMap

    kmap = KernelMap.create(C.LPM_TRIE, 8, 8, 10, C.BPF_F_NO_PREALLOC, name="lpm")
    try:
        sh = create_map(MapSpec("t", C.LPM_TRIE, 8, 8, 10, C.BPF_F_NO_PREALLOC), alloc=arena)
        rng = random.Random(11)
        for i, op in enumerate(_random_ops(rng, 8, 8, 800)):
            assert _apply(kmap, op) == _apply(sh, op), f"op {i} {op}"
        k = kmap.get_next_key(None)
        walked = []
        while k is not None:
            walked.append(k)
            k = kmap.get_next_key(k)
        assert walked == sh.keys()
    finally:
        kmap.close()


def test_lookups_race_tracer_inserts_and_deletes(arena, tmp_path_factory):
    """Threads looking up while the tracer churns other prefixes: every lookup of an address
    under the fixed /8 finds it or a longer prefix that contains it, never garbage."""
    lib = driver(tmp_path_factory)
    if lib is None:
        pytest.skip("no C compiler")
    rt = runtime_obj.tracer_runtime()
    sh = create_map(MapSpec("t", C.LPM_TRIE, 8, 8, 64, C.BPF_F_NO_PREALLOC), alloc=arena)
    assert sh.update(key(8, bytes([10, 0, 0, 0])), struct.pack("<Q", 8)) == 0
    f = make_frame(arena)
    probe = arena.alloc(16, 64)
    probe.view[0:8] = key(32, bytes([10, 1, 2, 3]))
    stop = threading.Event()
    bad = []

    def reader() -> None:
        lookup = ctypes.cast(rt.helper(1), ctypes.c_void_p).value
        while not stop.is_set():
            lib.bench(lookup, sh.handle_addr, probe.addr, 0, 0, 0, f.addr, 2000)
            addr = rt.map_lookup(sh.handle_addr, probe.addr, 0)
            v = struct.unpack("<Q", ctypes.string_at(addr, 8))[0] if addr else None
            if v not in (8, 16, 24):
                bad.append(v)

    t = threading.Thread(target=reader)
    t.start()
    try:
        rng = random.Random(3)
        for i in range(3000):
            plen = rng.choice([16, 24])
            k = key(plen, bytes([10, 1, 2, 0]) if rng.random() < 0.5 else bytes([11, rng.randrange(256), 0, 0]))
            if i % 2:
                sh.update(k, struct.pack("<Q", plen))
            else:
                sh.delete(k)
    finally:
        stop.set()
        t.join()
    assert not bad
    assert sh.lookup(key(32, bytes([10, 9, 9, 9]))) == struct.pack("<Q", 8)
