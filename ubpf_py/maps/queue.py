"""QUEUE, STACK and BLOOM_FILTER: the keyless maps (push / pop / peek).

Queue and stack keep values in a numpy ring of ``max_entries + 1`` slots with a
head and a tail index, exactly like kernel/bpf/queue_stack_maps.c, so that
BPF_EXIST ("overwrite the oldest when full") evicts the same element.

The bloom filter follows kernel/bpf/bloom_filter.c: ``nr_hash_funcs`` from the
low 4 bits of map_extra (5 when 0), a bit array of ``max_entries * k * 7 / 5``
bits rounded up to a power of two, and ``jhash``/``jhash2`` seeded with
``seed + i``.  With BPF_F_ZERO_SEED the seed is 0 and answers (including false
positives) equal the kernel's; otherwise the seed is random, as in the kernel.
There are never false negatives.

On storage shared with a traced process (``maps.native_ops``) pushes, pops and
bloom bits are the C runtime's (``runtime/queue.c``), with head/tail in the
descriptor, so the target's threads and the tracer use one implementation.
"""

from __future__ import annotations

import ctypes
import random

import numpy as np

from ubpf_py.maps import consts as C
from ubpf_py.maps import descriptor as D
from ubpf_py.maps.base import Map, check_flags_common, map_create_error
from ubpf_py.maps.jhash import jhash, jhash2_bytes
from ubpf_py.maps.native_ops import runtime_for
from ubpf_py.obj.spec import MapSpec
from ubpf_py.vm.memory import Allocator

QUEUE_STACK_CREATE_FLAG_MASK = C.BPF_F_NUMA_NODE | C.ACCESS_MASK
BLOOM_CREATE_FLAG_MASK = C.BPF_F_NUMA_NODE | C.BPF_F_ZERO_SEED | C.ACCESS_MASK


class QueueMap(Map):
    """BPF_MAP_TYPE_QUEUE: FIFO."""

    lifo = False

    def __init__(self, spec: MapSpec, ncpus: int | None = None, alloc: Allocator | None = None) -> None:
        super().__init__(spec, ncpus, alloc)
        check_flags_common(spec, QUEUE_STACK_CREATE_FLAG_MASK)
        if spec.max_entries == 0 or spec.key_size != 0 or spec.value_size == 0:
            raise map_create_error(spec, f"queue/stack maps need key_size 0, value_size > 0 and "
                                   f"max_entries > 0 (got key {spec.key_size}, value {spec.value_size}, "
                                   f"max_entries {spec.max_entries})")
        self.size = self.max_entries + 1
        self._elems = self.alloc.alloc(self.size * self.value_size).array.reshape(self.size, self.value_size)
        self._ht = [0, 0]
        self._c = runtime_for(self.alloc)
        if self._c is not None:
            self._dw = self._handle.view.cast("Q")
            D.write_descriptor(self._handle.view, {
                D.D_VALUES: self._elems.ctypes.data, D.D_VAL_STRIDE: self.value_size, D.D_LIMIT: self.size,
                D.W["value_size"]: self.value_size, D.W["lifo"]: int(self.lifo), D.D_KIND: D.KIND_QUEUE})

    # head/tail: Python ints, or descriptor words when C pushes and pops too
    @property
    def head(self) -> int:
        return self._dw[D.W["head"]] if self._c is not None else self._ht[0]

    @head.setter
    def head(self, v: int) -> None:
        self._ht[0] = v

    @property
    def tail(self) -> int:
        return self._dw[D.W["tail"]] if self._c is not None else self._ht[1]

    @tail.setter
    def tail(self, v: int) -> None:
        self._ht[1] = v

    def _full(self) -> bool:
        head = self.head + 1
        if head >= self.size:
            head = 0
        return head == self.tail

    def __len__(self) -> int:
        return (self.head - self.tail) % self.size

    def push(self, value: bytes, flags: int = C.BPF_ANY) -> int:
        if flags & C.BPF_NOEXIST or flags > C.BPF_EXIST:
            return -C.EINVAL
        if len(value) != self.value_size:
            raise ValueError(f"map {self.name}: value is {len(value)} bytes, value_size is {self.value_size}")
        if self._c is not None:
            return self._c.queue_push(self.handle_addr, bytes(value), flags)
        with self.lock:
            if self._full():
                if flags != C.BPF_EXIST:
                    return -C.E2BIG
                self.tail = (self.tail + 1) % self.size
            self._elems[self.head] = np.frombuffer(bytes(value), dtype=np.uint8)
            self.head = (self.head + 1) % self.size
        return 0

    def _take(self, delete: bool) -> bytes | int:
        if self._c is not None:
            out = bytearray(self.value_size)
            buf = (ctypes.c_char * len(out)).from_buffer(out)
            rc = self._c.queue_take(self.handle_addr, buf, 1 if delete else 0)
            return rc if rc else bytes(out)
        with self.lock:
            if self.head == self.tail:
                return -C.ENOENT
            if self.lifo:
                index = (self.head - 1) % self.size
                if delete:
                    self.head = index
            else:
                index = self.tail
                if delete:
                    self.tail = (self.tail + 1) % self.size
            return self._elems[index].tobytes()

    def pop(self) -> bytes | int:
        return self._take(True)

    def peek(self) -> bytes | int:
        return self._take(False)

    # the syscall maps element commands onto push/peek/pop
    def update(self, key: bytes | None, value: bytes, flags: int = C.BPF_ANY, cpu: int | None = None) -> int:
        return self.push(value, flags)

    def lookup(self, key: bytes | None) -> bytes | None:
        v = self.peek()
        return None if isinstance(v, int) else v

    def delete(self, key: bytes | None, cpu: int | None = None) -> int:
        return -C.EINVAL

    def get_next_key(self, key: bytes | None) -> bytes | None:
        return None

    def keys(self) -> list[bytes]:
        return []

    def values(self) -> list[bytes]:
        """Current contents in pop order (for dumps)."""
        n = len(self)
        idx = [(self.tail + i) % self.size for i in range(n)]
        if self.lifo:
            idx.reverse()
        return [self._elems[i].tobytes() for i in idx]


class StackMap(QueueMap):
    """BPF_MAP_TYPE_STACK: LIFO."""

    lifo = True


class BloomFilterMap(Map):
    """BPF_MAP_TYPE_BLOOM_FILTER: push adds a value, peek asks "maybe present?"."""

    def __init__(self, spec: MapSpec, ncpus: int | None = None, alloc: Allocator | None = None) -> None:
        super().__init__(spec, ncpus, alloc)
        check_flags_common(spec, BLOOM_CREATE_FLAG_MASK)
        if (spec.key_size != 0 or spec.value_size == 0 or spec.max_entries == 0
                or spec.map_extra & ~0xF):
            raise map_create_error(spec, "bloom filters need key_size 0, value_size > 0, max_entries > 0 "
                                   "and map_extra (number of hash functions) in 0..15")
        self.nr_hash_funcs = (spec.map_extra & 0xF) or 5
        nr_bits = spec.max_entries * self.nr_hash_funcs
        nr_bits = (nr_bits // 5) * 7
        if nr_bits > 1 << 31:
            nr_bits = 1 << 31
        elif nr_bits <= 64:
            nr_bits = 64
        else:
            nr_bits = 1 << (nr_bits - 1).bit_length()
        self.nr_bits = nr_bits
        self._bits = self.alloc.alloc(nr_bits // 8).array
        self._aligned = self.value_size % 4 == 0
        self.seed = 0 if spec.flags & C.BPF_F_ZERO_SEED else random.getrandbits(32)
        self._c = runtime_for(self.alloc)
        if self._c is not None:
            D.write_descriptor(self._handle.view, {
                D.D_VALUES: self._bits.ctypes.data, D.D_LIMIT: nr_bits - 1, D.W["value_size"]: self.value_size,
                D.W["seed"]: self.seed, D.W["nr_hash"]: self.nr_hash_funcs, D.D_KIND: D.KIND_BLOOM})

    def _hash(self, value: bytes, i: int) -> int:
        seed = (self.seed + i) & 0xFFFFFFFF
        h = jhash2_bytes(value, seed) if self._aligned else jhash(value, seed)
        return h & (self.nr_bits - 1)

    def push(self, value: bytes, flags: int = C.BPF_ANY) -> int:
        if flags != C.BPF_ANY:
            return -C.EINVAL
        value = bytes(value)
        if self._c is not None:
            return self._c.bloom_push(self.handle_addr, value, flags)
        with self.lock:
            for i in range(self.nr_hash_funcs):
                b = self._hash(value, i)
                self._bits[b >> 3] |= 1 << (b & 7)
        return 0

    def peek(self, value: bytes | None = None) -> bytes | int:  # type: ignore[override]
        """0 when ``value`` may be present, -ENOENT when it certainly is not."""
        if value is None:
            return -C.EINVAL
        value = bytes(value)
        if self._c is not None:
            return self._c.bloom_peek(self.handle_addr, value)
        for i in range(self.nr_hash_funcs):
            b = self._hash(value, i)
            if not self._bits[b >> 3] & (1 << (b & 7)):
                return -C.ENOENT
        return 0

    def contains(self, value: bytes) -> bool:
        return self.peek(value) == 0

    def pop(self) -> bytes | int:
        return -C.EOPNOTSUPP

    def update(self, key: bytes | None, value: bytes, flags: int = C.BPF_ANY, cpu: int | None = None) -> int:
        return self.push(value, flags)

    def lookup(self, key: bytes | None) -> bytes | None:
        return None

    def delete(self, key: bytes | None, cpu: int | None = None) -> int:
        return -C.EOPNOTSUPP

    def get_next_key(self, key: bytes | None) -> bytes | None:
        return None

    def keys(self) -> list[bytes]:
        return []
