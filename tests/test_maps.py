"""Semantics of every userspace map type (kernel return codes, limits, iteration)."""

from __future__ import annotations

import struct
import threading

import pytest

from ubpf_py.errors import MapError, NotSupportedError
from ubpf_py.maps import consts as C
from ubpf_py.maps import create_map, map_by_handle, map_by_id
from ubpf_py.maps.jhash import jhash, jhash2
from ubpf_py.obj.spec import MapSpec
from ubpf_py.vm.memory import read_raw


def k32(i: int) -> bytes:
    return struct.pack("<I", i)


def v64(i: int) -> bytes:
    return struct.pack("<Q", i)


def spec(t: int, ks: int = 4, vs: int = 8, n: int = 4, flags: int = 0, **kw) -> MapSpec:
    return MapSpec(f"m{t}", t, ks, vs, n, flags, **kw)


# ---- hash ------------------------------------------------------------------------------------
def test_hash_flags_and_full():
    m = create_map(spec(C.HASH, n=2))
    assert m.update(k32(1), v64(10), C.BPF_EXIST) == -C.ENOENT
    assert m.update(k32(1), v64(10), C.BPF_NOEXIST) == 0
    assert m.update(k32(1), v64(11), C.BPF_NOEXIST) == -C.EEXIST
    assert m.update(k32(1), v64(12), C.BPF_EXIST) == 0
    assert m.update(k32(2), v64(20)) == 0
    assert m.update(k32(3), v64(30)) == -C.E2BIG       # full
    assert m.update(k32(2), v64(21)) == 0               # existing keys still update when full
    assert m.update(k32(2), v64(21), 3) == -C.EINVAL
    assert m.update(k32(2), v64(21), C.BPF_F_LOCK) == -C.EINVAL  # no spin lock in the value
    assert m.lookup(k32(1)) == v64(12)
    assert m.lookup(k32(9)) is None
    assert m.delete(k32(9)) == -C.ENOENT
    assert m.delete(k32(1)) == 0
    assert m.update(k32(3), v64(30)) == 0
    assert sorted(m.keys()) == [k32(2), k32(3)]
    assert dict(m.items()) == {k32(2): v64(21), k32(3): v64(30)}


def test_hash_value_address_stable_and_shared():
    m = create_map(spec(C.HASH, n=8))
    m.update(k32(5), v64(1))
    addr = m.lookup_addr(k32(5))
    assert addr and read_raw(addr, 8) == v64(1)
    m.update(k32(5), v64(2))
    assert m.lookup_addr(k32(5)) == addr and read_raw(addr, 8) == v64(2)
    assert m.lookup_addr(k32(6)) == 0
    # the address lies in a region the loader registers
    assert any(r.start <= addr < r.end and r.writable for r in m.regions())


def test_hash_get_next_key_kernel_iteration():
    m = create_map(spec(C.HASH, n=8))
    for i in (3, 1, 2):
        m.update(k32(i), v64(i))
    seen, key = [], None
    while (key := m.get_next_key(key)) is not None:
        seen.append(key)
    assert sorted(seen) == [k32(1), k32(2), k32(3)]
    assert m.get_next_key(k32(99)) == seen[0]            # unknown key -> first key
    assert create_map(spec(C.HASH)).get_next_key(None) is None


def test_hash_create_errors_carry_kernel_errno():
    for bad, err in [(spec(C.HASH, ks=0), C.EINVAL), (spec(C.HASH, n=0), C.EINVAL),
                     (spec(C.HASH, flags=C.BPF_F_NO_COMMON_LRU), C.EINVAL),
                     (spec(C.LRU_HASH, flags=C.BPF_F_NO_PREALLOC), C.ENOTSUPP),
                     (spec(C.HASH, flags=1 << 20), C.EINVAL)]:
        with pytest.raises(MapError) as ei:
            create_map(bad)
        assert ei.value.errno == err, bad
        assert bad.name in str(ei.value)


def test_hash_no_prealloc_grows_and_reports_regions():
    m = create_map(spec(C.HASH, n=10000, flags=C.BPF_F_NO_PREALLOC))
    added = []
    m.add_region_listener(added.append)
    before = len(m.regions())
    for i in range(5000):
        assert m.update(k32(i), v64(i)) == 0
    assert len(m.regions()) > before and added
    assert m.lookup(k32(4999)) == v64(4999)
    assert len(m) == 5000


def test_unsupported_type():
    with pytest.raises(NotSupportedError):
        create_map(spec(14))  # devmap


# ---- per-CPU ------------------------------------------------------------------------------------
def test_percpu_hash_program_and_user_views():
    m = create_map(spec(C.PERCPU_HASH, vs=4), ncpus=3)
    assert m.update(k32(1), struct.pack("<I", 7), C.BPF_ANY, cpu=1) == 0
    assert m.lookup_percpu(k32(1)) == [bytes(4), struct.pack("<I", 7), bytes(4)]
    assert len(m.lookup(k32(1))) == 3 * 8                  # user buffer: round_up(4, 8) per CPU
    a0, a2 = m.lookup_addr(k32(1), 0), m.lookup_addr(k32(1), 2)
    assert a2 - a0 == 16
    # user space writes all CPUs at once (one value is replicated)
    assert m.update(k32(1), struct.pack("<I", 9)) == 0
    assert m.lookup_percpu(k32(1)) == [struct.pack("<I", 9)] * 3
    # a program update touches only its CPU
    m.update(k32(1), struct.pack("<I", 1), cpu=0)
    assert m.lookup_percpu(k32(1)) == [struct.pack("<I", 1), struct.pack("<I", 9), struct.pack("<I", 9)]


def test_percpu_array():
    m = create_map(spec(C.PERCPU_ARRAY, vs=8, n=2), ncpus=2)
    assert m.update(k32(1), v64(5), cpu=1) == 0
    assert m.lookup_percpu(k32(1)) == [v64(0), v64(5)]
    assert read_raw(m.lookup_addr(k32(1), 1), 8) == v64(5)
    assert m.update(k32(2), v64(1), cpu=0) == -C.E2BIG


# ---- array ----------------------------------------------------------------------------------------
def test_array_semantics():
    m = create_map(spec(C.ARRAY, vs=12, n=3))
    assert m.lookup(k32(2)) == bytes(12)
    assert m.update(k32(2), b"x" * 12, C.BPF_NOEXIST) == -C.EEXIST
    assert m.update(k32(2), b"x" * 12, C.BPF_EXIST) == 0
    assert m.update(k32(3), b"x" * 12) == -C.E2BIG
    assert m.lookup(k32(3)) is None
    assert m.delete(k32(0)) == -C.EINVAL
    assert m.get_next_key(None) == k32(0)
    assert m.get_next_key(k32(1)) == k32(2)
    assert m.get_next_key(k32(2)) is None
    assert m.get_next_key(k32(7)) == k32(0)
    assert m.lookup_addr(k32(1)) - m.lookup_addr(k32(0)) == 16  # round_up(12, 8)
    with pytest.raises(MapError):
        create_map(spec(C.ARRAY, ks=8))


def test_global_data_array_readonly_and_frozen():
    s = MapSpec(".rodata", C.ARRAY, 4, 16, 1, C.BPF_F_RDONLY_PROG, data=b"hello", readonly=True,
                internal=True, section=".rodata")
    m = create_map(s)
    assert m.lookup(k32(0)) == b"hello" + bytes(11)
    assert all(not r.writable for r in m.regions())
    assert m.freeze() == 0
    assert m.update(k32(0), bytes(16)) == -C.EPERM


# ---- LRU ------------------------------------------------------------------------------------------
def test_lru_invariants():
    m = create_map(spec(C.LRU_HASH, n=8))
    for i in range(100):
        assert m.update(k32(i), v64(i)) == 0              # never fails for lack of room
        assert len(m) <= 8
        assert m.lookup(k32(i)) == v64(i)                  # the newest is kept
    # a recently used element survives eviction
    m.lookup_addr(k32(93))
    for i in range(100, 107):
        m.update(k32(i), v64(i))
    assert m.lookup(k32(93)) == v64(93)
    assert m.evictions >= 92


def test_lru_percpu():
    m = create_map(spec(C.LRU_PERCPU_HASH, n=4), ncpus=2)
    for i in range(10):
        assert m.update(k32(i), v64(i), cpu=i % 2) == 0
    assert len(m) == 4
    assert m.lookup_percpu(k32(9)) == [v64(0), v64(9)]


# ---- ring buffer ------------------------------------------------------------------------------------
def test_ringbuf_sizes_rejected():
    for n in (0, 4096 + 1, 3 * 4096, 100):
        with pytest.raises(MapError):
            create_map(MapSpec("rb", C.RINGBUF, 0, 0, n))
    with pytest.raises(MapError):
        create_map(MapSpec("rb", C.RINGBUF, 4, 0, 4096))


def test_ringbuf_reserve_commit_discard_and_full():
    rb = create_map(MapSpec("rb", C.RINGBUF, 0, 0, 4096))
    a = rb.reserve(10)
    b = rb.reserve(3)
    assert a and b and b - a == 24                         # 8-byte header + round_up(10, 8)
    hdr = struct.unpack("<II", read_raw(a - 8, 8))
    assert hdr[0] == 10 | C.BPF_RINGBUF_BUSY_BIT
    assert rb.consume() == []                              # first record still busy
    rb.commit(b, discard=True)
    assert rb.consume() == []
    region = rb.regions()[0]
    region.view[a - region.start:a - region.start + 10] = b"0123456789"
    rb.commit(a)
    assert rb.consume() == [b"0123456789"]                 # discarded one is skipped
    assert rb.query(C.BPF_RB_AVAIL_DATA) == 0
    assert rb.query(C.BPF_RB_RING_SIZE) == 4096
    # fill: at most size - 1 bytes outstanding
    n = 0
    while rb.output(b"x" * 100) == 0:
        n += 1
    assert n == (4096 - 1) // 112 and rb.dropped == 1
    assert rb.output(b"x", flags=4) == -C.EINVAL
    assert len(rb.consume()) == n
    assert rb.reserve(4096 - 8) == 0 and rb.reserve(4096 - 16) != 0  # at most size - 1 bytes in flight


def test_ringbuf_wraps_contiguously():
    rb = create_map(MapSpec("rb", C.RINGBUF, 0, 0, 4096))
    for _ in range(30):
        assert rb.output(b"a" * 100) == 0
    rb.consume()
    payload = bytes(range(256)) * 2
    for i in range(20):
        assert rb.output(payload[i:i + 300]) == 0, i
        assert rb.consume() == [payload[i:i + 300]]


# ---- perf event array ----------------------------------------------------------------------------------
def test_perf_output_padding_and_errors():
    m = create_map(MapSpec("ev", C.PERF_EVENT_ARRAY, 4, 4, 0), ncpus=2)
    assert m.max_entries == 2
    assert m.output(1, b"abcde") == 0
    assert m.output(0, b"abcd", flags=0) == 0
    assert m.output(0, b"x", flags=1) == -C.EOPNOTSUPP
    assert m.output(0, b"x", flags=5) == -C.E2BIG
    assert m.output(0, b"x", flags=1 << 33) == -C.EINVAL
    got = m.consume()
    assert got == [(0, b"abcd"), (1, b"abcde" + bytes(7))]   # 4 + size padded to 8
    assert all((4 + len(d)) % 8 == 0 for _, d in got)


def test_perf_lost_samples():
    m = create_map(MapSpec("ev", C.PERF_EVENT_ARRAY, 4, 4, 1), ncpus=1)
    m.set_buffer_pages(1)
    ok = sum(1 for _ in range(100) if m.output(0, bytes(116)) == 0)
    assert ok == C.PAGE_SIZE // 128 and m.lost == 100 - ok
    assert len(m.consume()) == ok
    assert m.output(0, bytes(116)) == 0


# ---- stack trace ------------------------------------------------------------------------------------
def test_stack_trace_ids_and_collisions():
    m = create_map(MapSpec("st", C.STACK_TRACE, 4, 8 * 4, 2))
    s1 = [0x401000, 0x401100, 0x401200]
    sid = m.get_stackid(s1, C.BPF_F_USER_STACK)
    assert sid >= 0
    words = []
    for ip in s1:
        words += [ip & 0xFFFFFFFF, ip >> 32]
    assert sid == jhash2(words, 0) & 1                     # kernel's bucket choice
    assert m.get_stackid(s1, 0) == sid                      # same stack, same id
    assert m.lookup(k32(sid)) == struct.pack("<3Q", *s1) + bytes(8)
    # find a different stack with the same bucket: -EEXIST unless REUSE
    other = next([0x500000 + i] for i in range(1000)
                 if jhash2([0x500000 + i, 0], 0) & 1 == sid)
    m.delete(k32(sid ^ 1))
    assert m.get_stackid(other, 0) == -C.EEXIST
    assert m.get_stackid(other, C.BPF_F_REUSE_STACKID) == sid
    assert m.frames(sid) == other
    assert m.get_stackid([], 0) == -C.EFAULT
    assert m.get_stackid([1, 2], 2) == -C.EFAULT
    assert m.update(k32(0), bytes(32)) == -C.EINVAL
    assert m.delete(k32(sid)) == 0 and m.delete(k32(sid)) == -C.ENOENT
    with pytest.raises(MapError):
        create_map(MapSpec("st", C.STACK_TRACE, 4, 12, 2))


def test_jhash_reference_values():
    # an empty input returns the initial value; the kernel comparison of stack ids in
    # test_maps_kernel.py checks the full function
    assert jhash2([], 0) == 0xDEADBEEF
    assert jhash(b"", 0) == 0xDEADBEEF
    assert jhash2([1], 0) != jhash2([2], 0)


# ---- prog array / map in map --------------------------------------------------------------------------
def test_prog_array():
    m = create_map(MapSpec("jmp", C.PROG_ARRAY, 4, 4, 4))
    prog = object()
    m.set_program(2, prog, prog_id=77)
    assert m.program_at(2) is prog and m.program_at(1) is None
    assert m.lookup(k32(2)) == k32(77)
    assert m.update(k32(1), k32(77)) == 0 and m.program_at(1) is prog
    assert m.update(k32(1), k32(78)) == -C.EBADF
    assert m.update(k32(1), k32(77), C.BPF_NOEXIST) == -C.EINVAL
    assert m.update(k32(9), k32(77)) == -C.E2BIG
    assert m.delete(k32(1)) == 0 and m.delete(k32(1)) == -C.ENOENT


def test_array_and_hash_of_maps():
    inner = MapSpec("inner", C.ARRAY, 4, 8, 2)
    outer = create_map(MapSpec("outer", C.ARRAY_OF_MAPS, 4, 4, 2, inner=inner))
    im = create_map(MapSpec("inner1", C.ARRAY, 4, 8, 2))
    bad = create_map(MapSpec("inner2", C.ARRAY, 4, 8, 3))
    assert outer.update(k32(0), k32(im.map_id)) == 0
    assert outer.update(k32(1), k32(bad.map_id)) == -C.EINVAL
    assert outer.update(k32(1), k32(999999)) == -C.EBADF
    assert outer.lookup(k32(0)) == k32(im.map_id)
    assert outer.lookup_addr(k32(0)) == im.handle_addr and map_by_handle(im.handle_addr) is im
    assert map_by_id(im.map_id) is im
    hom = create_map(MapSpec("hom", C.HASH_OF_MAPS, 8, 4, 1, inner=inner))
    assert hom.update(v64(1), im) == 0
    assert hom.update(v64(2), im) == -C.E2BIG
    assert hom.lookup_addr(v64(1)) == im.handle_addr
    with pytest.raises(MapError):
        create_map(MapSpec("outer", C.ARRAY_OF_MAPS, 4, 4, 2))


# ---- queue / stack / bloom ---------------------------------------------------------------------------
def test_queue_and_stack():
    q = create_map(MapSpec("q", C.QUEUE, 0, 4, 2))
    s = create_map(MapSpec("s", C.STACK, 0, 4, 2))
    for m in (q, s):
        assert m.pop() == -C.ENOENT and m.peek() == -C.ENOENT
        assert m.push(k32(1)) == 0 and m.push(k32(2)) == 0
        assert m.push(k32(3)) == -C.E2BIG
        assert m.push(k32(3), C.BPF_NOEXIST) == -C.EINVAL
        assert m.push(k32(3), C.BPF_EXIST) == 0            # overwrites the oldest
    assert q.pop() == k32(2) and q.pop() == k32(3) and q.pop() == -C.ENOENT
    assert s.peek() == k32(3) and s.pop() == k32(3) and s.pop() == k32(2) and s.pop() == -C.ENOENT
    with pytest.raises(MapError):
        create_map(MapSpec("q", C.QUEUE, 4, 4, 2))


def test_bloom_filter_no_false_negatives():
    b = create_map(MapSpec("b", C.BLOOM_FILTER, 0, 8, 100, C.BPF_F_ZERO_SEED, map_extra=3))
    assert b.nr_hash_funcs == 3
    for i in range(100):
        assert b.push(v64(i)) == 0
    assert all(b.peek(v64(i)) == 0 for i in range(100))
    misses = sum(1 for i in range(1000, 2000) if b.peek(v64(i)) == -C.ENOENT)
    assert misses > 800
    assert b.push(v64(1), C.BPF_EXIST) == -C.EINVAL
    assert b.pop() == -C.EOPNOTSUPP
    with pytest.raises(MapError):
        create_map(MapSpec("b", C.BLOOM_FILTER, 0, 8, 100, map_extra=16))


# ---- LPM trie -------------------------------------------------------------------------------------------
def lpm_key(plen: int, *octets: int) -> bytes:
    return struct.pack("<I", plen) + bytes(octets)


def test_lpm_longest_prefix_match():
    with pytest.raises(MapError):
        create_map(MapSpec("t", C.LPM_TRIE, 8, 8, 10))     # BPF_F_NO_PREALLOC is required
    t = create_map(MapSpec("t", C.LPM_TRIE, 8, 8, 3, C.BPF_F_NO_PREALLOC))
    assert t.update(lpm_key(16, 192, 168, 0, 0), v64(16)) == 0
    assert t.update(lpm_key(24, 192, 168, 1, 0), v64(24)) == 0
    assert t.update(lpm_key(8, 10, 0, 0, 0), v64(8)) == 0
    assert t.update(lpm_key(8, 11, 0, 0, 0), v64(9)) == -C.ENOSPC
    assert t.update(lpm_key(8, 10, 9, 9, 9), v64(1), C.BPF_NOEXIST) == -C.EEXIST
    assert t.update(lpm_key(33, 10, 0, 0, 0), v64(1)) == -C.EINVAL
    assert t.lookup(lpm_key(32, 192, 168, 1, 7)) == v64(24)
    assert t.lookup(lpm_key(32, 192, 168, 2, 7)) == v64(16)
    assert t.lookup(lpm_key(20, 192, 168, 1, 7)) == v64(16)   # the key's prefixlen bounds the match
    assert t.lookup(lpm_key(32, 172, 16, 0, 1)) is None
    assert t.lookup_addr(lpm_key(32, 10, 1, 2, 3)) != 0
    # post-order: more specific first, then the containing prefix
    assert t.keys() == [lpm_key(8, 10, 0, 0, 0), lpm_key(24, 192, 168, 1, 0), lpm_key(16, 192, 168, 0, 0)]
    assert t.delete(lpm_key(16, 192, 168, 0, 0)) == 0
    assert t.delete(lpm_key(16, 192, 168, 0, 0)) == -C.ENOENT
    assert t.lookup(lpm_key(32, 192, 168, 2, 7)) is None


# ---- threads ----------------------------------------------------------------------------------------------
def test_concurrent_updates_keep_count_consistent():
    m = create_map(spec(C.HASH, n=1000))

    def worker(base: int) -> None:
        for i in range(200):
            m.update(k32(base + i), v64(i))
            if i % 3 == 0:
                m.delete(k32(base + i))

    threads = [threading.Thread(target=worker, args=(t * 1000,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(m) == len(m.keys()) == 4 * (200 - 67)


def test_bpf_f_lock_keeps_the_lock_word():
    m = create_map(spec(C.HASH, vs=16, n=2))
    m.spin_lock_off = 0                     # value: struct { struct bpf_spin_lock l; u32 pad; u64 v; }
    assert m.update(k32(1), b"\x01\0\0\0" + bytes(4) + v64(1)) == 0
    assert m.update(k32(1), b"\x00\0\0\0" + bytes(4) + v64(2), C.BPF_F_LOCK) == 0
    assert m.lookup(k32(1)) == b"\x01\0\0\0" + bytes(4) + v64(2)
    a = create_map(spec(C.ARRAY, vs=16, n=1))
    assert a.update(k32(0), bytes(16), C.BPF_F_LOCK) == -C.EINVAL


def test_items_and_percpu_dump_shapes():
    m = create_map(spec(C.PERCPU_HASH, vs=4, n=4), ncpus=2)
    m.update(k32(1), struct.pack("<I", 3), cpu=1)
    (k, v), = list(m.items())
    assert k == k32(1) and v == bytes(8) + struct.pack("<I", 3) + bytes(4)
