"""Host memory that BPF programs may touch, and checked access to it.

Design (shared by the interpreter, the JIT and the helpers): a BPF pointer is a
real host address.  Everything a program may legally point at -- its stack, the
context (pt_regs), map values, global data, ring buffer records -- lives in a
``HostBuffer`` and is registered in a ``MemoryMap`` as a ``Region``.  The
interpreter checks every access against the map; helpers use the same map to
read keys and write results; the JIT can run checked (same regions) or
unchecked.  Because addresses are real, maps and helpers behave identically
whichever engine runs the program.
"""

from __future__ import annotations

import bisect
import ctypes
import struct
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from ubpf_py.errors import VMFault


class HostBuffer:
    """A zero-initialised, 16-byte aligned block of host memory with a stable address.

    Backed by numpy so that maps can view it as typed arrays without copying.
    """

    __slots__ = ("addr", "array", "size", "view")

    def __init__(self, size: int, align: int = 16) -> None:
        raw = np.zeros(size + align, dtype=np.uint8)
        shift = (-raw.ctypes.data) % align
        self.array: np.ndarray = raw[shift:shift + size]
        self.size = size
        self.addr: int = self.array.ctypes.data
        self.view: memoryview = memoryview(self.array).cast("B") if size else memoryview(b"")

    def __len__(self) -> int:
        return self.size


class HeapAllocator:
    """Where map storage comes from by default: private numpy-backed ``HostBuffer`` s.

    Maps take an allocator (anything with ``alloc(size, align) -> buffer`` giving
    ``addr``/``size``/``array``/``view``); the in-target path passes a
    ``intarget.arena.SharedArena`` instead, so storage lands in memory the target
    maps too.  Every buffer keeps its address for its whole life."""

    def alloc(self, size: int, align: int = 16) -> HostBuffer:
        return HostBuffer(size, align)


class Allocator(Protocol):
    """What maps allocate storage from: ``alloc(size, align)`` returning a buffer with
    ``addr``, ``size``, ``array`` (uint8 numpy) and ``view`` (byte memoryview)."""

    def alloc(self, size: int, align: int = 16) -> Any: ...


HEAP: Allocator = HeapAllocator()


@dataclass(slots=True)
class Region:
    """A range ``[start, end)`` of host memory with its access rights.

    ``view`` is a byte memoryview of the range (always writable at the Python
    level; ``writable`` is what the *program* may do).
    """

    start: int
    end: int
    writable: bool
    name: str
    view: memoryview = field(repr=False)
    #: the HostBuffer (or other object) that owns the memory; kept alive here
    owner: object = field(default=None, repr=False)

    @classmethod
    def of(cls, buf: HostBuffer, name: str, writable: bool = True, offset: int = 0,
           size: int | None = None) -> Region:
        size = buf.size - offset if size is None else size
        return cls(buf.addr + offset, buf.addr + offset + size, writable, name,
                   buf.view[offset:offset + size], buf)


_U = {1: struct.Struct("<B"), 2: struct.Struct("<H"), 4: struct.Struct("<I"), 8: struct.Struct("<Q")}


class MemoryMap:
    """The set of regions a program may access, searchable by address.

    Regions never overlap.  Lookups are a bisect over region starts plus a
    one-entry cache (most programs hammer the stack or one map value).
    """

    __slots__ = ("_last", "_regions", "_starts", "version")

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._regions: list[Region] = []
        self._last: Region | None = None
        #: bumped on every add/remove, so engines that mirror the regions natively
        #: (the JIT's region table) know when to refresh their copy
        self.version = 0

    def add(self, region: Region) -> Region:
        i = bisect.bisect_left(self._starts, region.start)
        if (i < len(self._regions) and self._regions[i].start < region.end) or (
                i > 0 and self._regions[i - 1].end > region.start):
            raise ValueError(f"region {region.name} overlaps an existing region")
        self._starts.insert(i, region.start)
        self._regions.insert(i, region)
        self.version += 1
        return region

    def remove(self, region: Region) -> None:
        i = bisect.bisect_left(self._starts, region.start)
        if i < len(self._regions) and self._regions[i] is region:
            del self._starts[i]
            del self._regions[i]
            self.version += 1
        if self._last is region:
            self._last = None

    @property
    def regions(self) -> list[Region]:
        return list(self._regions)

    def find(self, addr: int, size: int) -> Region | None:
        """The region holding all of ``[addr, addr+size)``, or None."""
        r = self._last
        if r is not None and r.start <= addr and addr + size <= r.end:
            return r
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0:
            r = self._regions[i]
            if addr + size <= r.end:
                self._last = r
                return r
        return None

    def check(self, addr: int, size: int, write: bool, pc: int | None = None) -> Region:
        """The region for an access, or a VMFault naming the address and why."""
        r = self.find(addr, size)
        if r is None:
            raise VMFault(f"{'write' if write else 'read'} of {size} bytes at 0x{addr:x} "
                          f"is outside every memory region the program may use", pc)
        if write and not r.writable:
            raise VMFault(f"write of {size} bytes at 0x{addr:x} into read-only {r.name}", pc)
        return r

    # --- convenience accessors used by helpers (checked) -----------------
    def read(self, addr: int, size: int) -> bytes:
        r = self.check(addr, size, False)
        off = addr - r.start
        return bytes(r.view[off:off + size])

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        r = self.check(addr, len(data), True)
        off = addr - r.start
        r.view[off:off + len(data)] = data

    def load(self, addr: int, size: int) -> int:
        r = self.check(addr, size, False)
        return _U[size].unpack_from(r.view, addr - r.start)[0]

    def store(self, addr: int, size: int, value: int) -> None:
        r = self.check(addr, size, True)
        _U[size].pack_into(r.view, addr - r.start, value & ((1 << (size * 8)) - 1))


def read_raw(addr: int, size: int) -> bytes:
    """Unchecked read of host memory (only for addresses a Region already vouched for)."""
    return ctypes.string_at(addr, size)
