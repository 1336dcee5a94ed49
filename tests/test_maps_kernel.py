"""Our maps against the kernel's: the same operations give the same return codes and
contents (for LRU maps: the invariants the kernel guarantees).

Every test creates a kernel map through ``ubpf_py.kernel.maps.KernelMap`` and one of
ours from the same attributes, runs one operation sequence on both and compares each
result.  Skipped (with the reason) when kernel BPF is not available.
"""

from __future__ import annotations

import ctypes
import os
import random
import struct

import pytest

from ubpf_py.errors import KernelBackendError, MapError
from ubpf_py.maps import consts as C
from ubpf_py.maps import create_map
from ubpf_py.obj.spec import MapSpec

pytestmark = pytest.mark.kernel


@pytest.fixture(scope="module", autouse=True)
def _kernel():
    from ubpf_py.kernel.syscall import kernel_bpf_skip_reason
    reason = kernel_bpf_skip_reason()
    if reason:
        pytest.skip(reason)


def KernelMap():
    from ubpf_py.kernel.maps import KernelMap as K
    return K


def k32(i: int) -> bytes:
    return struct.pack("<I", i)


def v64(i: int) -> bytes:
    return struct.pack("<Q", i)


def pair(t: int, ks: int, vs: int, n: int, flags: int = 0, map_extra: int = 0, inner=None):
    kmap = KernelMap().create(t, ks, vs, n, flags, name="cmp", map_extra=map_extra,
                              inner_map_fd=inner[0].fd if inner else 0)
    ours = create_map(MapSpec("cmp", t, ks, vs, n, flags, map_extra=map_extra,
                              inner=inner[1].spec if inner else None))
    return kmap, ours


def run_ops(kmap, ours, ops):
    """Apply each op to both maps; assert equal results op by op."""
    for i, op in enumerate(ops):
        name, *args = op
        got_k = getattr(kmap, name)(*args)
        got_o = getattr(ours, name)(*args)
        assert got_o == got_k, f"op {i} {name}{tuple(args)}: kernel {got_k!r}, ours {got_o!r}"


def keys_of(m) -> list[bytes]:
    """Every key by get_next_key iteration (the same walk on both sides)."""
    out: list[bytes] = []
    key = m.get_next_key(None)
    while key is not None and len(out) <= m.max_entries:
        out.append(key)
        key = m.get_next_key(key)
    return out


def contents(m) -> dict[bytes, bytes]:
    return {k: m.lookup(k) for k in keys_of(m)}


# ---- creation rules ------------------------------------------------------------------------------
CREATE_CASES = [
    # (type, key, value, max_entries, flags, map_extra)
    (C.HASH, 4, 8, 4, 0, 0), (C.HASH, 0, 8, 4, 0, 0), (C.HASH, 4, 0, 4, 0, 0), (C.HASH, 4, 8, 0, 0, 0),
    (C.HASH, 4, 8, 4, C.BPF_F_NO_PREALLOC, 0), (C.HASH, 4, 8, 4, C.BPF_F_NO_COMMON_LRU, 0),
    (C.HASH, 4, 8, 4, C.BPF_F_MMAPABLE, 0), (C.HASH, 4, 8, 4, C.BPF_F_RDONLY | C.BPF_F_WRONLY, 0),
    (C.HASH, 600, 8, 4, 0, 0),
    (C.ARRAY, 4, 8, 4, 0, 0), (C.ARRAY, 8, 8, 4, 0, 0), (C.ARRAY, 4, 0, 4, 0, 0),
    (C.ARRAY, 4, 8, 4, C.BPF_F_MMAPABLE, 0), (C.ARRAY, 4, 8, 4, C.BPF_F_NO_PREALLOC, 0),
    (C.ARRAY, 4, 8, 4, C.BPF_F_PRESERVE_ELEMS, 0), (C.ARRAY, 4, 8, 4, C.BPF_F_RDONLY_PROG, 0),
    (C.PERCPU_ARRAY, 4, 8, 4, C.BPF_F_MMAPABLE, 0), (C.PERCPU_ARRAY, 4, 40000, 4, 0, 0),
    (C.PERCPU_HASH, 4, 8, 4, C.BPF_F_NUMA_NODE, 0),
    (C.LRU_HASH, 4, 8, 4, 0, 0), (C.LRU_HASH, 4, 8, 4, C.BPF_F_NO_PREALLOC, 0),
    (C.LRU_HASH, 4, 8, 4, C.BPF_F_NO_COMMON_LRU, 0), (C.LRU_PERCPU_HASH, 4, 8, 4, 0, 0),
    (C.RINGBUF, 0, 0, 4096, 0, 0), (C.RINGBUF, 0, 0, 8192, 0, 0), (C.RINGBUF, 0, 0, 12288, 0, 0),
    (C.RINGBUF, 0, 0, 1024, 0, 0), (C.RINGBUF, 4, 0, 4096, 0, 0), (C.RINGBUF, 0, 8, 4096, 0, 0),
    (C.RINGBUF, 0, 0, 4096, C.BPF_F_NO_PREALLOC, 0),
    (C.PERF_EVENT_ARRAY, 4, 4, 2, 0, 0), (C.PERF_EVENT_ARRAY, 4, 8, 2, 0, 0),
    (C.PERF_EVENT_ARRAY, 4, 4, 2, C.BPF_F_PRESERVE_ELEMS, 0),
    (C.STACK_TRACE, 4, 8 * 127, 16, 0, 0), (C.STACK_TRACE, 4, 12, 16, 0, 0),
    (C.STACK_TRACE, 4, 8 * 128, 16, 0, 0), (C.STACK_TRACE, 8, 64, 16, 0, 0), (C.STACK_TRACE, 4, 4, 16, 0, 0),
    (C.PROG_ARRAY, 4, 4, 4, 0, 0), (C.PROG_ARRAY, 4, 8, 4, 0, 0), (C.PROG_ARRAY, 4, 4, 0, 0, 0),
    (C.QUEUE, 0, 8, 4, 0, 0), (C.QUEUE, 4, 8, 4, 0, 0), (C.QUEUE, 0, 0, 4, 0, 0), (C.STACK, 0, 8, 0, 0, 0),
    (C.QUEUE, 0, 8, 4, C.BPF_F_NO_PREALLOC, 0),
    (C.BLOOM_FILTER, 0, 8, 100, 0, 0), (C.BLOOM_FILTER, 4, 8, 100, 0, 0), (C.BLOOM_FILTER, 0, 8, 100, 0, 16),
    (C.BLOOM_FILTER, 0, 8, 100, C.BPF_F_ZERO_SEED, 3), (C.BLOOM_FILTER, 0, 0, 100, 0, 0),
    (C.LPM_TRIE, 8, 8, 16, C.BPF_F_NO_PREALLOC, 0), (C.LPM_TRIE, 8, 8, 16, 0, 0),
    (C.LPM_TRIE, 4, 8, 16, C.BPF_F_NO_PREALLOC, 0), (C.LPM_TRIE, 261, 8, 16, C.BPF_F_NO_PREALLOC, 0),
    (C.LPM_TRIE, 260, 8, 16, C.BPF_F_NO_PREALLOC, 0), (C.LPM_TRIE, 8, 0, 16, C.BPF_F_NO_PREALLOC, 0),
]


@pytest.mark.parametrize("case", CREATE_CASES, ids=str)
def test_create_rules_match_kernel(case):
    t, ks, vs, n, flags, extra = case
    try:
        KernelMap().create(t, ks, vs, n, flags, name="cmp", map_extra=extra).close()
        kernel_err = 0
    except KernelBackendError as exc:
        kernel_err = exc.errno
    try:
        create_map(MapSpec("cmp", t, ks, vs, n, flags, map_extra=extra))
        ours_err = 0
    except MapError as exc:
        ours_err = exc.errno
    assert ours_err == kernel_err, f"{case}: kernel errno {kernel_err}, ours {ours_err}"


# ---- hash family ------------------------------------------------------------------------------------
def test_hash_sequence():
    kmap, ours = pair(C.HASH, 4, 8, 3)
    ops = [("update", k32(1), v64(1), C.BPF_EXIST), ("update", k32(1), v64(1), C.BPF_NOEXIST),
           ("update", k32(1), v64(2), C.BPF_NOEXIST), ("update", k32(1), v64(3), C.BPF_EXIST),
           ("update", k32(2), v64(4), 0), ("update", k32(3), v64(5), 0), ("update", k32(4), v64(6), 0),
           ("update", k32(3), v64(7), 0), ("update", k32(3), v64(7), 3), ("update", k32(3), v64(7), 8),
           ("update", k32(3), v64(7), C.BPF_F_LOCK), ("lookup", k32(1)), ("lookup", k32(9)),
           ("delete", k32(9)), ("delete", k32(2)), ("update", k32(4), v64(8), C.BPF_NOEXIST),
           ("lookup", k32(4)), ("lookup_and_delete", k32(4)), ("lookup_and_delete", k32(4)),
           ("lookup", k32(3))]
    run_ops(kmap, ours, ops)
    assert contents(ours) == contents(kmap)
    # iteration visits the same set; an unknown key restarts from the first key
    assert sorted(keys_of(ours)) == sorted(keys_of(kmap))
    assert ours.get_next_key(k32(77)) == keys_of(ours)[0]
    assert kmap.get_next_key(k32(77)) == keys_of(kmap)[0]


def test_hash_random_ops_match_kernel():
    rng = random.Random(1234)
    kmap, ours = pair(C.HASH, 8, 16, 32)
    ops = []
    for _ in range(600):
        key = v64(rng.randrange(48))
        r = rng.random()
        if r < 0.55:
            ops.append(("update", key, rng.randbytes(16), rng.choice([0, 0, 1, 2])))
        elif r < 0.8:
            ops.append(("delete", key))
        else:
            ops.append(("lookup", key))
    run_ops(kmap, ours, ops)
    assert contents(ours) == contents(kmap)


@pytest.mark.parametrize("t", [C.PERCPU_HASH, C.PERCPU_ARRAY])
def test_percpu_user_buffers_match_kernel(t):
    kmap, ours = pair(t, 4, 12, 4)
    ncpu = ours.ncpus
    blob = b"".join(struct.pack("<Q", 100 + c) + struct.pack("<I", c) + bytes(4) for c in range(ncpu))
    ops = [("update", k32(1), blob, 0), ("lookup", k32(1)), ("lookup_percpu", k32(1)),
           ("update", k32(2), b"abcdefghijkl", 0), ("lookup", k32(2)), ("lookup", k32(3)),
           ("update", k32(1), blob, C.BPF_NOEXIST), ("delete", k32(1)), ("lookup", k32(1)),
           ("update", k32(9), blob, 0)]
    run_ops(kmap, ours, ops)
    assert contents(ours) == contents(kmap)


def test_array_sequence():
    kmap, ours = pair(C.ARRAY, 4, 12, 3)
    ops = [("lookup", k32(0)), ("update", k32(1), b"x" * 12, 0), ("update", k32(1), b"y" * 12, C.BPF_NOEXIST),
           ("update", k32(1), b"z" * 12, C.BPF_EXIST), ("update", k32(3), b"z" * 12, 0),
           ("update", k32(0), b"z" * 12, 5), ("lookup", k32(1)), ("lookup", k32(3)), ("delete", k32(1)),
           ("get_next_key", None), ("get_next_key", k32(0)), ("get_next_key", k32(2)),
           ("get_next_key", k32(3)), ("get_next_key", k32(100))]
    run_ops(kmap, ours, ops)
    assert list(ours.items()) == kmap.items()


def test_frozen_map_refuses_user_writes():
    kmap, ours = pair(C.ARRAY, 4, 8, 1, C.BPF_F_RDONLY_PROG)
    run_ops(kmap, ours, [("update", k32(0), v64(5), 0), ("freeze",), ("update", k32(0), v64(6), 0),
                         ("lookup", k32(0)), ("freeze",)])


@pytest.mark.parametrize("t", [C.LRU_HASH, C.LRU_PERCPU_HASH])
def test_lru_invariants_match_kernel(t):
    n = 64
    kmap, ours = pair(t, 4, 8, n)
    for i in range(4 * n):
        rk = kmap.update(k32(i), v64(i), 0)
        ro = ours.update(k32(i), v64(i), 0)
        assert rk == ro == 0                      # an LRU insertion never fails for lack of room
        assert kmap.lookup(k32(i)) is not None and ours.lookup(k32(i)) is not None  # newest kept
    kk, ok = keys_of(kmap), keys_of(ours)
    assert 0 < len(kk) <= n and 0 < len(ok) <= n
    # every surviving key holds the value last written for it, in both
    for m in (kmap, ours):
        for k in keys_of(m):
            raw = m.lookup(k)
            assert raw[:8] == v64(struct.unpack("<I", k)[0])
    # flags keep their meaning
    run_ops(kmap, ours, [("update", k32(4 * n - 1), v64(1), C.BPF_NOEXIST),
                         ("update", k32(10 ** 6), v64(1), C.BPF_EXIST)])


# ---- keyless maps -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("t", [C.QUEUE, C.STACK])
def test_queue_stack_match_kernel(t):
    kmap, ours = pair(t, 0, 4, 3)
    ops = [("pop",), ("peek",)]
    for i in range(4):
        ops.append(("push", k32(i), 0))
    ops += [("push", k32(9), C.BPF_NOEXIST), ("push", k32(9), 3), ("push", k32(7), C.BPF_EXIST),
            ("peek",), ("pop",), ("pop",), ("push", k32(8), C.BPF_EXIST), ("pop",), ("pop",), ("pop",)]
    run_ops(kmap, ours, ops)


def _kernel_bloom_peek(kmap, value: bytes) -> int:
    from ubpf_py.kernel.syscall import BPF_MAP_LOOKUP_ELEM, MapElemAttr, bpf_rc
    buf = ctypes.create_string_buffer(value, len(value))
    rc = bpf_rc(BPF_MAP_LOOKUP_ELEM, MapElemAttr(map_fd=kmap.fd, key=0, value=ctypes.addressof(buf)))
    return min(rc, 0)


@pytest.mark.parametrize("value_size", [8, 5])   # jhash2 (aligned) and jhash (unaligned) paths
def test_bloom_filter_false_positives_identical(value_size):
    kmap, ours = pair(C.BLOOM_FILTER, 0, value_size, 40, C.BPF_F_ZERO_SEED, map_extra=2)
    vals = [os.urandom(value_size) for _ in range(40)]
    for v in vals:
        assert kmap.push(v, 0) == ours.push(v, 0) == 0
    probes = vals + [struct.pack("<Q", i)[:value_size] for i in range(3000)]
    k_answers = [_kernel_bloom_peek(kmap, p) for p in probes]
    o_answers = [ours.peek(p) for p in probes]
    assert o_answers == k_answers
    assert k_answers.count(0) > 40                  # some false positives, so the hash is really compared


def lpm_key(plen: int, *octets: int) -> bytes:
    return struct.pack("<I", plen) + bytes(octets)


def test_lpm_trie_match_kernel():
    kmap, ours = pair(C.LPM_TRIE, 8, 8, 5, C.BPF_F_NO_PREALLOC)
    keys = [lpm_key(16, 192, 168, 0, 0), lpm_key(24, 192, 168, 1, 0), lpm_key(24, 192, 168, 128, 0),
            lpm_key(8, 10, 0, 0, 0), lpm_key(32, 10, 1, 2, 3)]
    ops = [("update", k, v64(i), 0) for i, k in enumerate(keys)]
    ops += [("update", lpm_key(8, 11, 0, 0, 0), v64(9), 0),          # full
            ("update", lpm_key(8, 10, 7, 7, 7), v64(9), C.BPF_NOEXIST),
            ("update", lpm_key(8, 10, 7, 7, 7), v64(10), C.BPF_EXIST),
            ("update", lpm_key(9, 10, 0, 0, 0), v64(9), C.BPF_EXIST),
            ("update", lpm_key(33, 10, 0, 0, 0), v64(9), 0), ("update", keys[0], v64(9), 3),
            ("lookup", lpm_key(32, 192, 168, 1, 77)), ("lookup", lpm_key(32, 192, 168, 2, 77)),
            ("lookup", lpm_key(20, 192, 168, 1, 77)), ("lookup", lpm_key(32, 10, 1, 2, 3)),
            ("lookup", lpm_key(31, 10, 1, 2, 3)), ("lookup", lpm_key(32, 11, 0, 0, 0)),
            ("get_next_key", None), ("get_next_key", keys[1]), ("get_next_key", keys[0]),
            ("get_next_key", lpm_key(7, 1, 1, 1, 1)), ("delete", lpm_key(16, 192, 168, 0, 0)),
            ("delete", lpm_key(16, 192, 168, 0, 0)), ("lookup", lpm_key(32, 192, 168, 2, 77)),
            ("update", lpm_key(0, 0, 0, 0, 0), v64(0), 0), ("lookup", lpm_key(32, 1, 2, 3, 4))]
    run_ops(kmap, ours, ops)
    assert keys_of(ours) == keys_of(kmap)                 # same post-order iteration
    assert contents(ours) == contents(kmap)


# ---- stack trace / prog array / map-in-map (user-space side) ---------------------------------------------
def test_stack_trace_user_ops_match_kernel():
    kmap, ours = pair(C.STACK_TRACE, 4, 64, 8)
    run_ops(kmap, ours, [("lookup", k32(0)), ("delete", k32(3)), ("delete", k32(100)),
                         ("update", k32(0), bytes(64), 0), ("get_next_key", None)])


def test_prog_array_user_ops_match_kernel():
    kmap, ours = pair(C.PROG_ARRAY, 4, 4, 4)
    bogus = k32(999999)    # neither a valid program fd (kernel) nor a known program id (ours)
    run_ops(kmap, ours, [("lookup", k32(0)), ("delete", k32(0)), ("delete", k32(9)),
                         ("update", k32(0), bogus, 0), ("update", k32(9), bogus, 0),
                         ("update", k32(0), bogus, C.BPF_NOEXIST),
                         ("get_next_key", None), ("get_next_key", k32(3))])


@pytest.mark.parametrize("outer_type", [C.ARRAY_OF_MAPS, C.HASH_OF_MAPS])
def test_map_in_map_match_kernel(outer_type):
    K = KernelMap()
    inner_k = K.create(C.ARRAY, 4, 8, 2, name="inner")
    inner_o = create_map(MapSpec("inner", C.ARRAY, 4, 8, 2))
    wrong_k = K.create(C.ARRAY, 4, 8, 3, name="wrong")
    wrong_o = create_map(MapSpec("wrong", C.ARRAY, 4, 8, 3))
    kmap, ours = pair(outer_type, 4, 4, 2, inner=(inner_k, inner_o))
    steps = [("update", k32(0), "inner", 0), ("update", k32(1), "wrong", 0),
             ("update", k32(5), "inner", 0), ("update", k32(0), "inner", C.BPF_NOEXIST),
             ("update", k32(1), "inner", C.BPF_EXIST), ("update", k32(0), "inner", 7),
             ("delete", k32(1), "", 0), ("delete", k32(0), "", 0), ("delete", k32(0), "", 0)]
    for i, (name, key, which, flags) in enumerate(steps):
        if name == "update":
            vk = k32((inner_k if which == "inner" else wrong_k).fd)
            vo = k32((inner_o if which == "inner" else wrong_o).map_id)
            rk, ro = kmap.update(key, vk, flags), ours.update(key, vo, flags)
        else:
            rk, ro = kmap.delete(key), ours.delete(key)
        assert rk == ro, f"step {i} {name} {key.hex()} {which} {flags}: kernel {rk}, ours {ro}"
    assert (kmap.lookup(k32(0)) is None) == (ours.lookup(k32(0)) is None)


# ---- ring buffer data path -------------------------------------------------------------------------------
def _lddw(dst: int, value: int, src: int = 0, imm_hi: int | None = None):
    from ubpf_py.isa import opcodes as op
    from ubpf_py.isa.instruction import Instruction

    def s32(v: int) -> int:
        v &= 0xFFFFFFFF
        return v - (1 << 32) if v & 0x80000000 else v

    hi = (value >> 32) if imm_hi is None else imm_hi
    return [Instruction(op.LDDW, dst, src, 0, s32(value), s32(hi)), Instruction(0, 0, 0, 0, s32(hi))]


class _KernelRing:
    """A kernel ring buffer read the way libbpf does: consumer page (rw) + producer page and
    the twice-mapped data area (ro)."""

    def __init__(self, fd: int, size: int) -> None:
        import mmap
        page = mmap.PAGESIZE
        self.size = size
        self.cons = mmap.mmap(fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self.prod = mmap.mmap(fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        self.page = page

    def positions(self) -> tuple[int, int]:
        return struct.unpack_from("<Q", self.cons, 0)[0], struct.unpack_from("<Q", self.prod, 0)[0]

    def consume(self) -> list[bytes]:
        cons, prod = self.positions()
        out = []
        while cons < prod:
            off = self.page + (cons & (self.size - 1))
            hlen = struct.unpack_from("<I", self.prod, off)[0]
            if hlen & C.BPF_RINGBUF_BUSY_BIT:
                break
            n = hlen & ~(C.BPF_RINGBUF_BUSY_BIT | C.BPF_RINGBUF_DISCARD_BIT)
            if not hlen & C.BPF_RINGBUF_DISCARD_BIT:
                out.append(bytes(self.prod[off + 8:off + 8 + n]))
            cons += (n + 15) & ~7
        struct.pack_into("<Q", self.cons, 0, cons)
        return out


def test_ringbuf_output_matches_kernel():
    from ubpf_py.isa import opcodes as op
    from ubpf_py.isa.instruction import Instruction
    from ubpf_py.kernel.prog import BPF_F_SLEEPABLE, SYSCALL, prog_load, prog_test_run

    size = 4096
    sizes = [1, 5, 8, 13, 64, 200, 1000, 3, 700]
    K = KernelMap()
    krb = K.create(C.RINGBUF, 0, 0, size, name="rb")
    ours = create_map(MapSpec("rb", C.RINGBUF, 0, 0, size))
    payload = bytes(range(256)) * 8
    data = K.create(C.ARRAY, 4, len(payload), 1, name="data")
    rets = K.create(C.ARRAY, 4, 8 * len(sizes), 1, name="rets")
    data.update(k32(0), payload, 0)
    insns = []
    for i, n in enumerate(sizes):
        insns += _lddw(1, krb.fd, op.BPF_PSEUDO_MAP_FD)
        insns += _lddw(2, data.fd, op.BPF_PSEUDO_MAP_VALUE, imm_hi=i)
        insns += [Instruction(op.BPF_ALU64 | op.BPF_MOV | op.BPF_K, 3, 0, 0, n),
                  Instruction(op.BPF_ALU64 | op.BPF_MOV | op.BPF_K, 4, 0, 0, 0),
                  Instruction(op.BPF_JMP | op.BPF_CALL, 0, 0, 0, 130)]
        insns += _lddw(1, rets.fd, op.BPF_PSEUDO_MAP_VALUE, imm_hi=8 * i)
        insns.append(Instruction(op.BPF_STX | op.BPF_MEM | op.BPF_DW, 1, 0, 0, 0))
    insns += [Instruction(op.BPF_ALU64 | op.BPF_MOV | op.BPF_K, 0, 0, 0, 0), Instruction(op.BPF_JMP | op.BPF_EXIT)]
    fd = prog_load(insns, SYSCALL, prog_flags=BPF_F_SLEEPABLE, prog_name="rb_cmp")
    ring = _KernelRing(krb.fd, size)
    try:
        for run in range(6):
            prog_test_run(fd, repeat=0)
            k_rets = list(struct.unpack(f"<{len(sizes)}q", rets.lookup(k32(0))))
            o_rets = [ours.output(payload[i:i + n]) for i, n in enumerate(sizes)]
            assert o_rets == k_rets, f"run {run}"
            assert (ours.consumer_pos, ours.producer_pos) == ring.positions(), f"run {run}"
            if run % 2:   # consume every other run, so records wrap around the end of the ring
                assert ours.consume() == ring.consume(), f"run {run}"
        assert ours.dropped > 0          # the ring did fill up, and the kernel agreed each time
    finally:
        os.close(fd)
