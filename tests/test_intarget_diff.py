"""Differential tests: the C helpers on maps in a shared arena against the Python helpers
on the same map types with private storage (same ops, same return codes, same contents
afterwards), and a multi-threaded stress of C producers with Python consuming."""

from __future__ import annotations

import ctypes
import os
import random
import struct
import threading

import pytest
from intarget_fixture import Job, driver, make_frame, needs_runtime

from ubpf_py.helpers import build_helper_table
from ubpf_py.intarget import runtime_obj
from ubpf_py.intarget.arena import SharedArena
from ubpf_py.maps import consts as C
from ubpf_py.maps import create_map
from ubpf_py.obj.spec import MapSpec
from ubpf_py.vm.env import ExecEnv, HitContext
from ubpf_py.vm.memory import HostBuffer, MemoryMap, Region

pytestmark = needs_runtime
M64 = (1 << 64) - 1


@pytest.fixture(scope="module")
def arena():
    return SharedArena(256 << 20)


@pytest.fixture(scope="module")
def rt():
    return runtime_obj.tracer_runtime()


class PySide:
    """The Python helpers bound to an env holding ``maps`` and a scratch buffer."""

    def __init__(self, maps, cpu: int) -> None:
        self.mem = MemoryMap()
        self.scratch = HostBuffer(1 << 16)
        self.mem.add(Region.of(self.scratch, "scratch"))
        env = ExecEnv(memory=self.mem, hit=HitContext(cpu=cpu))
        for m in maps:
            env.maps_by_addr[m.handle_addr] = m
            for r in m.regions():
                self.mem.add(r)
        self.h = build_helper_table(env)

    def call(self, hid: int, *args: int) -> int:
        return self.h[hid](*(list(args) + [0] * (5 - len(args)))) & M64


class CSide:
    def __init__(self, rt, frame, arena) -> None:
        self.rt, self.f = rt, frame
        self.scratch = arena.alloc(1 << 16, 64)
        self.fns: dict[int, object] = {}

    def call(self, hid: int, *args: int) -> int:
        fn = self.fns.get(hid) or self.fns.setdefault(hid, self.rt.helper(hid))
        return fn(*(list(args) + [0] * (5 - len(args))), self.f.addr)


def _put(side, off: int, data: bytes) -> int:
    side.scratch.view[off:off + len(data)] = data
    return side.scratch.addr + off


HASHES = [C.HASH, C.PERCPU_HASH, C.LRU_HASH, C.LRU_PERCPU_HASH]


@pytest.mark.parametrize("mtype", [*HASHES, C.ARRAY, C.PERCPU_ARRAY])
@pytest.mark.parametrize("shape", ["k4v12", "k12v8", "k4v16lock", "k300v8noprealloc"])
def test_map_ops_match_python(arena, rt, pinned, mtype, shape):
    ks, vs = {"k4v12": (4, 12), "k12v8": (12, 8), "k4v16lock": (4, 16), "k300v8noprealloc": (300, 8)}[shape]
    flags = C.BPF_F_NO_PREALLOC if shape.endswith("noprealloc") else 0
    if mtype in (C.ARRAY, C.PERCPU_ARRAY, C.LRU_HASH, C.LRU_PERCPU_HASH) and flags:
        pytest.skip("arrays and LRU maps are always preallocated")
    if mtype in (C.ARRAY, C.PERCPU_ARRAY):
        ks = 4
    spec = MapSpec("m", mtype, ks, vs, 24, flags)
    py_map = create_map(spec, ncpus=4)
    c_map = create_map(MapSpec("m", mtype, ks, vs, 24, flags), ncpus=4, alloc=arena)
    assert mtype in (C.ARRAY, C.PERCPU_ARRAY) or c_map._c is not None
    if shape.endswith("lock"):
        py_map.spin_lock_off = c_map.spin_lock_off = 4
    cpu = pinned % 4
    if cpu != pinned:
        pytest.skip("pinned CPU beyond the map's ncpus")
    py, c = PySide([py_map], cpu), CSide(rt, make_frame(arena), arena)
    rng = random.Random(mtype * 100 + ks)
    flags_pool = [0, 0, 0, C.BPF_NOEXIST, C.BPF_EXIST, C.BPF_F_LOCK, 8, C.BPF_F_LOCK | C.BPF_EXIST]
    for step in range(1500):
        k = rng.randrange(40).to_bytes(4, "little") + bytes(ks - 4)
        op = rng.random()
        py.k, c.k = _put(py, 0, k), _put(c, 0, k)
        if op < 0.45:
            v = bytes(rng.randrange(256) for _ in range(vs))
            fl = rng.choice(flags_pool)
            rp = py.call(2, py_map.handle_addr, py.k, _put(py, 64, v), fl)
            rc = c.call(2, c_map.handle_addr, c.k, _put(c, 64, v), fl)
            assert rp == rc, f"step {step}: update flags {fl} key {k.hex()}: python {rp:#x} C {rc:#x}"
        elif op < 0.75:
            ap = py.call(1, py_map.handle_addr, py.k)
            ac = c.call(1, c_map.handle_addr, c.k)
            assert bool(ap) == bool(ac), f"step {step}: lookup {k.hex()}"
            if ap:
                assert ctypes.string_at(ap, vs) == ctypes.string_at(ac, vs)
        elif op < 0.92:
            rp = py.call(3, py_map.handle_addr, py.k)
            rc = c.call(3, c_map.handle_addr, c.k)
            assert rp == rc, f"step {step}: delete {k.hex()}"
        else:   # user space (the tracer) changes the shared map too: Python -> C insert
            full = bytes(rng.randrange(256) for _ in range(vs))
            fl = rng.choice([0, C.BPF_NOEXIST, C.BPF_EXIST])
            assert py_map.update(k, full, fl) == c_map.update(k, full, fl), f"step {step}: user update"
    assert list(py_map.items()) == list(c_map.items())
    assert py_map.keys() == c_map.keys() and len(py_map) == len(c_map)
    if py_map.keys():
        k0 = py_map.keys()[0]
        assert py_map.get_next_key(k0) == c_map.get_next_key(k0)
        assert py_map.lookup(k0) == c_map.lookup(k0)
    if mtype in (C.LRU_HASH, C.LRU_PERCPU_HASH):
        assert py_map.evictions == c_map.evictions > 0


def test_ringbuf_ops_match_python(arena, rt, pinned):
    py_rb = create_map(MapSpec("rb", C.RINGBUF, 0, 0, 4096))
    c_rb = create_map(MapSpec("rb", C.RINGBUF, 0, 0, 4096), alloc=arena)
    assert c_rb._c is not None
    py, c = PySide([py_rb], pinned), CSide(rt, make_frame(arena), arena)
    rng = random.Random(7)
    held: list[tuple[int, int]] = []
    for step in range(3000):
        op = rng.random()
        if op < 0.35:
            n = rng.choice([0, 1, 7, 8, 100, 300, 1000, 5000])
            data = bytes(rng.randrange(256) for _ in range(n))
            fl = rng.choice([0, 0, C.BPF_RB_NO_WAKEUP, 8])
            rp = py.call(130, py_rb.handle_addr, _put(py, 0, data), n, fl)
            rc = c.call(130, c_rb.handle_addr, _put(c, 0, data), n, fl)
            assert rp == rc, f"step {step}: output {n} bytes flags {fl}"
        elif op < 0.6:
            n = rng.choice([1, 16, 200, 2000, 5000])
            fl = rng.choice([0, 0, 0, 1])
            ap = py.call(131, py_rb.handle_addr, n, fl)
            ac = c.call(131, c_rb.handle_addr, n, fl)
            assert bool(ap) == bool(ac), f"step {step}: reserve {n}"
            if ap:
                assert ap - py_rb.data_addr == ac - c_rb.data_addr
                fill = bytes([step & 0xFF]) * n
                ctypes.memmove(ap, fill, n)
                ctypes.memmove(ac, fill, n)
                held.append((ap, ac))
        elif op < 0.8 and held:
            ap, ac = held.pop(rng.randrange(len(held)))
            hid = rng.choice([132, 133])
            assert py.call(hid, ap) == c.call(hid, ac) == 0
        elif op < 0.9:
            fl = rng.choice([0, 1, 2, 3, 9])
            assert py.call(134, py_rb.handle_addr, fl) == c.call(134, c_rb.handle_addr, fl)
        else:
            assert py_rb.consume() == c_rb.consume(), f"step {step}: records"
    for ap, ac in held:
        py.call(132, ap)
        c.call(132, ac)
    assert py_rb.consume() == c_rb.consume()
    assert py_rb.dropped == c_rb.dropped > 0


def test_perf_output_matches_python(arena, rt, pinned):
    py_pe = create_map(MapSpec("pe", C.PERF_EVENT_ARRAY, 4, 4, 8), ncpus=os.cpu_count())
    c_pe = create_map(MapSpec("pe", C.PERF_EVENT_ARRAY, 4, 4, 8), ncpus=os.cpu_count(), alloc=arena)
    for m in (py_pe, c_pe):
        m.set_buffer_pages(1)
    py, c = PySide([py_pe], pinned), CSide(rt, make_frame(arena), arena)
    rng = random.Random(3)
    for step in range(400):
        n = rng.choice([0, 1, 4, 5, 60, 300, 1000])
        data = bytes(rng.randrange(256) for _ in range(n))
        fl = rng.choice([C.BPF_F_CURRENT_CPU, pinned, pinned + 1, 9, 1 << 40])
        rp = py.call(25, 0, py_pe.handle_addr, fl, _put(py, 0, data), n)
        rc = c.call(25, 0, c_pe.handle_addr, fl, _put(c, 0, data), n)
        assert rp == rc, f"step {step}: perf output {n} bytes flags {fl:#x}"
        if step % 100 == 99:
            assert py_pe.consume() == c_pe.consume()
    assert py_pe.consume() == c_pe.consume()
    assert py_pe.lost == c_pe.lost > 0


@pytest.fixture(scope="module")
def drv(tmp_path_factory):
    lib = driver(tmp_path_factory)
    if lib is None:
        pytest.skip("no C compiler for the pthread driver")
    return lib


def test_many_threads_hash_and_ring_with_python_draining(arena, rt, drv):
    nthreads, iters, nkeys = 6, 20000, 64
    m = create_map(MapSpec("h", C.HASH, 8, 16, nthreads * nkeys + 64), alloc=arena)
    rb = create_map(MapSpec("rb", C.RINGBUF, 0, 0, 1 << 16), alloc=arena)
    f = make_frame(arena)
    addr = {h: ctypes.cast(rt.helper(h), ctypes.c_void_p).value for h in (1, 2, 3, 130, 131, 132)}
    jobs = (Job * nthreads)()
    for i, j in enumerate(jobs):
        j.upd, j.dele, j.lookup = addr[2], addr[3], addr[1]
        j.reserve, j.submit, j.output = addr[131], addr[132], addr[130]
        j.map, j.ring, j.hf = m.handle_addr, rb.handle_addr, f.addr
        j.id, j.iters, j.keys = i + 1, iters, nkeys
    got: list[bytes] = []
    stop = threading.Event()
    py_errors: list[str] = []

    def drain():
        while not stop.is_set():
            got.extend(rb.records())
        got.extend(rb.records())

    def python_writer():   # the tracer's Python changes the same map meanwhile (through C)
        for i in range(3000):
            k = struct.pack("<Q", 0xFF << 32 | (i % 50))
            if m.update(k, bytes(16)) != 0:
                py_errors.append(f"update {i}")
            if i % 3 == 0 and m.delete(k) != 0:
                py_errors.append(f"delete {i}")

    d = threading.Thread(target=drain)
    w = threading.Thread(target=python_writer)
    d.start()
    w.start()
    assert drv.run(jobs, nthreads) == 0   # ctypes drops the GIL: drain and writer run concurrently
    w.join()
    stop.set()
    d.join()
    assert py_errors == []
    assert sum(j.errors for j in jobs) == 0
    sent = sum(j.sent for j in jobs)
    assert sent + sum(j.dropped for j in jobs) == nthreads * iters
    assert len(got) == sent and rb.dropped == sum(j.dropped for j in jobs)
    recs = [struct.unpack("<3Q", r) for r in got]
    assert all(a ^ b == x for a, b, x in recs), "torn record"
    assert len(set(recs)) == sent, "a record was delivered twice"
    for i, j in enumerate(jobs):   # per producer, records arrive in the order produced
        mine = [b for a, b, _ in recs if a == i + 1]
        assert mine == sorted(mine) and len(mine) == j.sent
    expect = set()
    for tid in range(1, nthreads + 1):
        for k in range(nkeys):
            last = max(i for i in range(iters) if i % nkeys == k)
            if last % 2 == 0:
                expect.add(struct.pack("<Q", tid << 32 | k))
    for i in range(3000):
        k = struct.pack("<Q", 0xFF << 32 | (i % 50))
        last = max(x for x in range(3000) if x % 50 == i % 50)
        if last % 3 != 0:
            expect.add(k)
    assert set(m.keys()) == expect and len(m) == len(expect)


def test_stack_ids_match_python(arena, rt):
    spec = MapSpec("st", C.STACK_TRACE, 4, 5 * 8, 8)
    py_m, c_m = create_map(spec), create_map(MapSpec("st", C.STACK_TRACE, 4, 5 * 8, 8), alloc=arena)
    assert c_m._c is not None
    rng = random.Random(11)
    pool = [[rng.randrange(1 << 47) for _ in range(rng.randrange(0, 9))] for _ in range(30)]
    for step in range(600):
        fl = rng.choice([0, 1, 2, C.BPF_F_FAST_STACK_CMP, C.BPF_F_REUSE_STACKID, C.BPF_F_REUSE_STACKID | 1])
        trace = rng.choice(pool)[:5 + (fl & 0xFF)]   # the helper cuts to max_depth + skip
        if rng.random() < 0.1:
            sid = rng.randrange(8)
            k = struct.pack("<I", sid)
            assert py_m.delete(k) == c_m.delete(k), f"step {step}: delete {sid}"
            continue
        assert py_m.get_stackid(trace, fl) == c_m.get_stackid(trace, fl), f"step {step}"
    assert list(py_m.items()) == list(c_m.items()) and len(py_m) == len(c_m)


def test_get_stackid_helper_walks_the_user_stack(arena, rt):
    m = create_map(MapSpec("st", C.STACK_TRACE, 4, 4 * 8, 16), alloc=arena)
    f = make_frame(arena)
    stack = arena.alloc(4096, 16)
    w = stack.view.cast("Q")
    w[64], w[65] = stack.addr + 96 * 8, 0x401111
    w[96], w[97] = 0, 0x402222
    f.set_reg("rip", 0x400000)
    f.set_reg("rbp", stack.addr + 64 * 8)
    get = rt.helper(27)
    sid = get(0, m.handle_addr, C.BPF_F_USER_STACK, 0, 0, f.addr)
    assert sid < 16 and m.frames(sid) == [0x400000, 0x401111, 0x402222]
    assert get(0, m.handle_addr, C.BPF_F_USER_STACK, 0, 0, f.addr) == sid
    assert get(0, m.handle_addr, C.BPF_F_USER_STACK | 1, 0, 0, f.addr) != sid
    assert get(0, m.handle_addr, 0, 0, 0, f.addr) == (-14) & M64         # no kernel stack: -EFAULT
    assert get(0, m.handle_addr, 1 << 20, 0, 0, f.addr) == (-22) & M64   # unknown flag


@pytest.mark.parametrize("mtype", [C.LRU_HASH, C.HASH])
def test_many_threads_churn_one_small_map(arena, rt, drv, mtype):
    """Inserts, deletes and LRU evictions from 6 C threads and the tracer's Python on the
    same keys: no failed LRU update, and afterwards the index, the live bytes, the
    free stack and the LRU list all agree."""
    from ubpf_py.maps import descriptor as D

    nthreads, iters, nkeys, cap = 6, 20000, 96, 64
    m = create_map(MapSpec("c", mtype, 8, 16, cap if mtype == C.LRU_HASH else nkeys), alloc=arena)
    f = make_frame(arena)
    addr = {h: ctypes.cast(rt.helper(h), ctypes.c_void_p).value for h in (1, 2, 3)}
    jobs = (Job * nthreads)()
    for i, j in enumerate(jobs):
        j.upd, j.dele, j.lookup = addr[2], addr[3], addr[1]
        j.map, j.hf, j.id, j.iters, j.keys = m.handle_addr, f.addr, i + 1, iters, nkeys
    stop = threading.Event()
    py_bad: list[int] = []

    def python_side():
        i = 0
        while not stop.is_set():
            k = struct.pack("<Q", i % nkeys)
            rc = m.update(k, struct.pack("<QQ", i % nkeys, i))
            if rc != 0:
                py_bad.append(rc)
            i += 1

    t = threading.Thread(target=python_side)
    t.start()
    assert drv.churn(jobs, nthreads) == 0
    stop.set()
    t.join()
    assert sum(j.errors for j in jobs) == 0, [ctypes.c_int64(j.ring).value for j in jobs if j.errors]
    assert py_bad == []
    keys = m.keys()
    w = m._handle.view.cast("Q")
    assert len(keys) == len(set(keys)) == len(m) <= (cap if mtype == C.LRU_HASH else nkeys)
    for k in keys:
        v = m.lookup(k)
        assert v is not None and v[:8] == k
    fresh, nfree = w[D.W["fresh"]], w[D.W["nfree"]]
    assert fresh - nfree == len(m)
    free = set(m._cfree.array.view("<u4")[:nfree].tolist())
    assert len(free) == nfree and not free & set(int(s) for s in m._c_slots())
    if mtype == C.LRU_HASH:
        nxt = m._clru[1].array.view("<u4")
        walk, s = [], w[D.W["lru_head"]]
        while s != D.LRU_NIL and len(walk) <= cap:
            walk.append(int(s))
            s = nxt[s]
        assert sorted(walk) == sorted(int(s) for s in m._c_slots())
        assert m.evictions > 0


def test_cpu_beyond_the_maps_copies_stays_inside_the_slot(arena, rt):
    m = create_map(MapSpec("p", C.PERCPU_ARRAY, 4, 8, 2), ncpus=2, alloc=arena)
    key = struct.pack("<I", 1)
    copies = [m.lookup_addr(key, c) for c in range(2)]     # each CPU's copy of element 1
    assert copies[1] - copies[0] >= 64                      # on another cache line
    for cpu in (0, 1, 2, 3, 4095):
        a = rt.map_lookup(m.handle_addr, key, cpu)
        assert a == copies[cpu % 2]
        assert rt.map_update(m.handle_addr, key, struct.pack("<Q", cpu + 1), 0, cpu) == 0
    assert m.lookup(struct.pack("<I", 0)) == bytes(16)      # the neighbour element untouched


def test_kernel_reads_strncmp_write_user_match_python(arena, rt):
    """probe_read_kernel(_str) read only program memory (the arena here, the regions
    there), with -ERANGE for user addresses like the kernel; strncmp; write_user."""
    py, c = PySide([], 0), CSide(rt, make_frame(arena), arena)
    outside = ctypes.create_string_buffer(b"target memory\0", 32)   # user memory to both
    rng = random.Random(9)
    for step in range(300):
        s = bytes(rng.choice(b"abc\0") for _ in range(rng.randrange(1, 12)))
        size = rng.choice([0, 1, 4, 8, 16])
        for hid in (113, 115):
            _put(py, 0, s.ljust(32, b"\0"))
            _put(c, 0, s.ljust(32, b"\0"))
            for which in ("prog", "user", "kernel"):
                src = {"prog": None, "user": ctypes.addressof(outside), "kernel": 0xFFFF_8880_0000_0000}[which]
                ps = py.scratch.addr if src is None else src
                cs = c.scratch.addr if src is None else src
                _put(py, 64, b"\xaa" * 16)
                _put(c, 64, b"\xaa" * 16)
                rp = py.call(hid, py.scratch.addr + 64, size, ps)
                rc = c.call(hid, c.scratch.addr + 64, size, cs)
                assert rp == rc, f"step {step}: helper {hid} {which} size {size}"
                assert bytes(py.scratch.view[64:80]) == bytes(c.scratch.view[64:80])
        t = bytes(rng.choice(b"abc") for _ in range(rng.randrange(0, 6))) + b"\0"
        _put(py, 128, t)
        _put(c, 128, t)
        n = rng.randrange(0, 8)
        assert py.call(182, py.scratch.addr, n, py.scratch.addr + 128) == \
            c.call(182, c.scratch.addr, n, c.scratch.addr + 128), f"step {step}: strncmp {s!r} {t!r} {n}"
    data = _put(c, 256, b"XYZ")
    assert c.call(36, ctypes.addressof(outside), data, 3) == 0 and outside.raw[:4] == b"XYZg"
    assert c.call(36, c.scratch.addr, data, 3) == (-14) & M64       # program memory is not user memory
    assert c.call(36, 16, data, 3) == (-14) & M64


@pytest.mark.parametrize("mtype", [C.QUEUE, C.STACK, C.BLOOM_FILTER])
@pytest.mark.parametrize("vs", [4, 6, 16])
def test_queue_stack_bloom_match_python(arena, rt, mtype, vs):
    flags = C.BPF_F_ZERO_SEED if mtype == C.BLOOM_FILTER else 0
    py_m = create_map(MapSpec("q", mtype, 0, vs, 5, flags))
    c_m = create_map(MapSpec("q", mtype, 0, vs, 5, flags), alloc=arena)
    assert c_m._c is not None
    py, c = PySide([py_m], 0), CSide(rt, make_frame(arena), arena)
    rng = random.Random(mtype * 10 + vs)
    for step in range(600):
        v = bytes(rng.randrange(4) for _ in range(vs))   # few values: bloom hits and misses
        op = rng.random()
        if op < 0.4:
            fl = rng.choice([0, 0, C.BPF_EXIST, C.BPF_NOEXIST, 8])
            assert py.call(87, py_m.handle_addr, _put(py, 0, v), fl) == \
                c.call(87, c_m.handle_addr, _put(c, 0, v), fl), f"step {step}: push"
        elif op < 0.8:
            hid = rng.choice([88, 89])
            _put(py, 0, v)
            _put(c, 0, v)
            _put(py, 64, b"\xaa" * vs)
            _put(c, 64, b"\xaa" * vs)
            dst = 0 if (hid == 89 and mtype == C.BLOOM_FILTER) else 64
            assert py.call(hid, py_m.handle_addr, py.scratch.addr + dst) == \
                c.call(hid, c_m.handle_addr, c.scratch.addr + dst), f"step {step}: helper {hid}"
            assert bytes(py.scratch.view[64:64 + vs]) == bytes(c.scratch.view[64:64 + vs])
        else:   # the tracer pushes and pops the shared map too
            if rng.random() < 0.5:
                assert py_m.push(v, C.BPF_EXIST if mtype != C.BLOOM_FILTER else 0) == \
                    c_m.push(v, C.BPF_EXIST if mtype != C.BLOOM_FILTER else 0)
            else:
                assert py_m.pop() == c_m.pop()
    if mtype != C.BLOOM_FILTER:
        assert py_m.values() == c_m.values() and len(py_m) == len(c_m)
    else:
        assert bytes(py_m._bits) == bytes(c_m._bits)
