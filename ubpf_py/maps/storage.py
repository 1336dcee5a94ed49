"""Slot storage for keyed maps: fixed-stride slots in chunked HostBuffer slabs.

Why chunks: a value's address must stay fixed while its entry exists (programs
keep pointers returned by bpf_map_lookup_elem), so storage can never be moved
or grown in place.  Preallocated maps allocate every chunk up front, like the
kernel; BPF_F_NO_PREALLOC maps add chunks as they fill, and tell listeners
(the helper table adds them to ``env.memory``) about each new region.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ubpf_py.vm.memory import HEAP, Allocator, HostBuffer, Region

CHUNK_SHIFT = 12          # 4096 slots per chunk
CHUNK = 1 << CHUNK_SHIFT


class SlotStore:
    """``capacity`` slots of ``stride`` bytes, addressed by slot number.

    Slots are handed out by ``alloc`` (recently freed slots first, then never-used
    ones) and returned with ``free``.  ``used`` marks live slots for iteration.
    """

    __slots__ = ("_free", "_fresh", "allocator", "bases", "buffers", "capacity", "chunk_shift", "listeners", "name",
                 "readonly", "stride", "used", "views")

    def __init__(self, name: str, capacity: int, stride: int, prealloc: bool = True,
                 readonly: bool = False, alloc: Allocator = HEAP) -> None:
        self.name = name
        self.capacity = capacity
        self.stride = max(stride, 1)
        self.readonly = readonly
        self.allocator = alloc
        # preallocated (and small) stores are one buffer, so a slot's address is one
        # multiplication away; only BPF_F_NO_PREALLOC stores grow chunk by chunk
        if prealloc or capacity <= CHUNK:
            self.chunk_shift = max(capacity - 1, 1).bit_length()
        else:
            self.chunk_shift = CHUNK_SHIFT
        self.buffers: list[HostBuffer] = []
        self.bases: list[int] = []
        self.views: list[memoryview] = []
        #: 1 per live slot (a bytearray: cheap to flip from Python, searchable with find); it
        #: grows with the chunks, so a BPF_F_NO_PREALLOC map costs nothing per unused entry
        self.used = bytearray()
        self._free: list[int] = []
        self._fresh = 0
        self.listeners: list[Callable[[Region], None]] = []
        if prealloc:
            while len(self.buffers) * (1 << self.chunk_shift) < capacity:
                self._add_chunk()

    def _chunk_slots(self, i: int) -> int:
        per = 1 << self.chunk_shift
        return min(per, self.capacity - i * per)

    def _add_chunk(self) -> Region:
        i = len(self.buffers)
        buf = self.allocator.alloc(self._chunk_slots(i) * self.stride)
        self.used.extend(bytes(self._chunk_slots(i)))
        self.buffers.append(buf)
        self.bases.append(buf.addr)
        self.views.append(buf.view)
        region = self._region(i)
        for fn in self.listeners:
            fn(region)
        return region

    def _region(self, i: int) -> Region:
        buf = self.buffers[i]
        return Region(buf.addr, buf.addr + buf.size, not self.readonly, f"{self.name}[{i}]",
                      buf.view, buf)

    def regions(self) -> list[Region]:
        return [self._region(i) for i in range(len(self.buffers))]

    def alloc(self) -> int:
        """A free slot number, or -1 when every slot is in use."""
        if self._free:
            slot = self._free.pop()
        elif self._fresh < self.capacity:
            slot = self._fresh
            self._fresh += 1
            while (slot >> self.chunk_shift) >= len(self.buffers):
                self._add_chunk()
        else:
            return -1
        self.used[slot] = 1
        return slot

    def free(self, slot: int) -> None:
        self.used[slot] = 0
        self._free.append(slot)

    @property
    def single(self) -> bool:
        """True when every slot lives in the first buffer (base + slot * stride)."""
        return (1 << self.chunk_shift) >= self.capacity

    def addr(self, slot: int) -> int:
        return self.bases[slot >> self.chunk_shift] + (slot & ((1 << self.chunk_shift) - 1)) * self.stride

    def loc(self, slot: int) -> tuple[memoryview, int]:
        """(chunk view, byte offset) of a slot."""
        return self.views[slot >> self.chunk_shift], (slot & ((1 << self.chunk_shift) - 1)) * self.stride

    def read(self, slot: int, size: int, offset: int = 0) -> bytes:
        view, off = self.loc(slot)
        return bytes(view[off + offset:off + offset + size])

    def write(self, slot: int, data: bytes, offset: int = 0) -> None:
        view, off = self.loc(slot)
        view[off + offset:off + offset + len(data)] = data

    def zero(self, slot: int) -> None:
        view, off = self.loc(slot)
        view[off:off + self.stride] = bytes(self.stride)

    def next_used(self, after: int) -> int:
        """First live slot with number > ``after`` (-1 for the first live slot), or -1."""
        start = after + 1
        if start >= self._fresh:
            return -1
        return self.used.find(1, start, self._fresh)

    def live_slots(self) -> np.ndarray:
        return np.flatnonzero(np.frombuffer(self.used, dtype=np.uint8, count=self._fresh))
