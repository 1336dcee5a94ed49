"""The shared arena: one memfd mapped at the same address in the tracer and the target.

Why one address: map descriptors, hash index tables and ring buffers hold raw
pointers to each other.  When the memfd is mapped ``MAP_SHARED`` at the *same*
virtual address in both processes, every such pointer means the same thing on
both sides, so the tracer's Python maps and the in-target runtime share storage
without translation, and the tracer reads maps and drains rings without stopping
the target.

The file is sparse (``ftruncate``): pages cost memory only once touched.  The
``RUNTIME_HEADER`` (``ubpf_py.abi.runtime``) sits at offset 0, then the CPU_OWNER lines;
allocation is a thread-safe bump pointer after them.  Nothing is ever freed individually (maps
live as long as the session; the arena goes away whole with ``close()``).

The lead's injector maps ``arena.fd`` (through ``/proc/<tracer>/fd/<fd>`` or an
injected ``memfd`` transfer) at ``arena.addr`` in the target; ``addr_hint`` lets
it pick an address that is free in the target too.
"""

from __future__ import annotations

import ctypes
import os
import threading

import numpy as np

from ubpf_py.abi.kernel import (
    MAP_FIXED_NOREPLACE,
    MAP_NORESERVE,
    MAP_SHARED,
    PAGE_SIZE,
    PROT_READ,
    PROT_WRITE,
)
from ubpf_py.abi.runtime import CACHE_LINE, CPU_OWNER, RUNTIME_HEADER, RUNTIME_MAGIC
from ubpf_py.errors import UbpfError
from ubpf_py.sysinfo import possible_cpus

PAGE = PAGE_SIZE
DEFAULT_SIZE = 1 << 30
_MAP_FAILED = ctypes.c_void_p(-1).value

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                       ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


class ArenaError(UbpfError):
    """The arena could not be created or is full."""


class ArenaBuffer:
    """A block of the arena with the ``HostBuffer`` interface (``addr``, ``size``,
    ``array``, ``view``), so maps use either without knowing which."""

    __slots__ = ("addr", "arena", "array", "size", "view")

    def __init__(self, arena: SharedArena, addr: int, size: int) -> None:
        self.arena = arena   # keeps the mapping alive while the buffer is used
        self.addr = addr
        self.size = size
        if size:
            self.array: np.ndarray = np.ctypeslib.as_array((ctypes.c_uint8 * size).from_address(addr))
            self.view: memoryview = memoryview(self.array).cast("B")
        else:
            self.array = np.zeros(0, dtype=np.uint8)
            self.view = memoryview(b"")

    def __len__(self) -> int:
        return self.size


class SharedArena:
    """``size`` bytes of a memfd mapped shared at ``addr`` (``addr_hint`` if given)."""

    #: maps allocated here are changed by the target too: they run the C runtime's
    #: operations (``maps.native_ops``)
    native_maps = True

    def __init__(self, size: int = DEFAULT_SIZE, addr_hint: int | None = None, name: str = "ubpf-arena",
                 fd: int | None = None) -> None:
        """``fd``: an existing memfd to adopt (the in-target injector opens the one the target
        created through /proc/PID/fd, which works across users); it is owned from then on."""
        if size <= 0 or size % PAGE:
            raise ArenaError(f"arena size {size} must be a positive multiple of {PAGE}")
        if addr_hint is not None and addr_hint % PAGE:
            raise ArenaError(f"arena address 0x{addr_hint:x} is not page aligned")
        self.size = size
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC) if fd is None else fd
        try:
            os.ftruncate(self.fd, size)
            flags = MAP_SHARED | MAP_NORESERVE | (MAP_FIXED_NOREPLACE if addr_hint else 0)
            addr = _libc.mmap(addr_hint or None, size, PROT_READ | PROT_WRITE, flags, self.fd, 0)
            if addr in (None, _MAP_FAILED):
                err = ctypes.get_errno()
                raise ArenaError(f"cannot map a {size}-byte arena"
                                 + (f" at 0x{addr_hint:x}" if addr_hint else "")
                                 + f": {os.strerror(err)}; choose another address")
            if addr_hint and addr != addr_hint:  # old kernels ignore MAP_FIXED_NOREPLACE
                _libc.munmap(addr, size)
                raise ArenaError(f"arena address 0x{addr_hint:x} is taken; choose another address")
        except BaseException:
            os.close(self.fd)
            raise
        self.addr: int = addr
        self._lock = threading.Lock()
        self._next = (RUNTIME_HEADER.size + 63) & ~63
        self._closed = False
        self.header = ArenaBuffer(self, addr, RUNTIME_HEADER.size)
        hw = self.header.view.cast("Q")
        hw[RUNTIME_HEADER.word("arena_base")] = addr
        hw[RUNTIME_HEADER.word("arena_size")] = size
        hw[RUNTIME_HEADER.word("pid")] = os.getpid()
        hw[RUNTIME_HEADER.word("magic")] = RUNTIME_MAGIC
        # the CPU ids hits of per-CPU programs own (runtime/cpuclaim.c): here, so every process
        # of the session (they share the maps) shares them; every process's header points here
        ids = possible_cpus()
        owners = self.alloc(ids * CPU_OWNER.size, CACHE_LINE)
        hw[RUNTIME_HEADER.word("cpu_owners")] = owners.addr
        hw[RUNTIME_HEADER.word("cpu_ids")] = ids

    def cpu_owners(self) -> tuple[int, int]:
        """(address, count) of the CPU_OWNER lines: RUNTIME_HEADER.cpu_owners / cpu_ids."""
        hw = self.header.view.cast("Q")
        return hw[RUNTIME_HEADER.word("cpu_owners")], hw[RUNTIME_HEADER.word("cpu_ids")]

    @property
    def used(self) -> int:
        """Bytes handed out so far (header included)."""
        return self._next

    def contains(self, addr: int, size: int = 1) -> bool:
        return self.addr <= addr and addr + size <= self.addr + self.size

    def alloc(self, size: int, align: int = 16) -> ArenaBuffer:
        """``size`` zeroed bytes aligned to ``align`` (a power of two), at a fixed address."""
        if align <= 0 or align & (align - 1):
            raise ValueError(f"alignment {align} is not a power of two")
        with self._lock:
            if self._closed:
                raise ArenaError("the arena is closed")
            off = (self._next + align - 1) & ~(align - 1)
            if off + size > self.size:
                raise ArenaError(f"arena full: {size} bytes wanted, {self.size - off} left of {self.size}; "
                                 f"use a larger arena")
            self._next = off + size
        return ArenaBuffer(self, self.addr + off, size)

    def close(self) -> None:
        """Unmap and close.  Buffers handed out must not be used afterwards."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        _libc.munmap(self.addr, self.size)
        os.close(self.fd)

    def __enter__(self) -> SharedArena:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
