"""Mappings in the target, made by system calls injected into one of its stopped threads.

Nothing here needs the target's libc or its cooperation: ``probe.scratch.Injector`` runs a
``syscall`` instruction in a stopped thread.  What is made:

* the **arena**: a memfd created *by the target* (``memfd_create`` injected), reopened by the
  tracer through ``/proc/PID/fd/N`` (allowed to whoever may ptrace the target, also across
  users), mapped ``MAP_SHARED`` at one address in both processes, then the target's
  descriptor is closed (the mapping keeps the file alive);
* **private** anonymous mappings at a fixed address (thread table, runtime header, code
  image): ``MAP_FIXED_NOREPLACE``, so an address already in use is an error, never a
  silently replaced mapping of the target.
"""

from __future__ import annotations

import os
import random

from ubpf_py.abi.kernel import (
    MADV_POPULATE_WRITE,
    MAP_ANONYMOUS,
    MAP_FIXED_NOREPLACE,
    MAP_NORESERVE,
    MAP_PRIVATE,
    MAP_SHARED,
    MFD_CLOEXEC,
    PAGE_SIZE,
    SYS_CLOSE,
    SYS_MADVISE,
    SYS_MEMFD_CREATE,
    SYS_MMAP,
    SYS_MUNMAP,
)
from ubpf_py.errors import ProbeError
from ubpf_py.probe import ptrace as P
from ubpf_py.probe.procmaps import near_hints, read_maps
from ubpf_py.probe.scratch import Injector

PAGE = PAGE_SIZE
_M64 = (1 << 64) - 1
#: where fixed runtime mappings are placed: far from PIE images (0x55..), mmap bases (0x7f..),
#: Go heaps (0xc0_0000_0000) and non-PIE images (0x400000)
_LOW, _HIGH = 0x2000_0000_0000, 0x6000_0000_0000


def page_round(n: int) -> int:
    return (n + PAGE - 1) // PAGE * PAGE


def free_range(pids: list[int], size: int, seed: int | None = None) -> int:
    """An address where ``size`` bytes are free in every process of ``pids`` (and in the tracer),
    picked at random in a band processes leave empty; the mappings themselves use
    MAP_FIXED_NOREPLACE, so a race is an error, not a clobbered mapping."""
    rng = random.Random(seed)
    used = []
    for pid in [*pids, os.getpid()]:
        used += [(m.start, m.end) for m in read_maps(pid)]
    size = page_round(size)
    for _ in range(64):
        a = rng.randrange(_LOW, _HIGH - size) & ~0xFFFFF
        if all(a + size <= s or a >= e for s, e in used):
            return a
    raise ProbeError("no free address range for the in-target runtime (target address space full?)")


class TargetMapper:
    """Mappings in one address space, through a stopped thread ``tid`` of it."""

    def __init__(self, inj: Injector, pid: int) -> None:
        self.inj = inj
        self.pid = pid

    def _call(self, tid: int, what: str, nr: int, *args: int) -> int:
        r = self.inj.syscall(tid, nr, *args)
        if r < 0:
            raise ProbeError(f"{what} in pid {self.pid} failed: {os.strerror(-r)}")
        return r

    def map_fixed(self, tid: int, addr: int, size: int, prot: int, *, fd: int = -1, shared: bool = False) -> None:
        flags = (MAP_SHARED if shared else MAP_PRIVATE | MAP_ANONYMOUS) | MAP_FIXED_NOREPLACE | MAP_NORESERVE
        r = self._call(tid, f"mmap of 0x{size:x} bytes at 0x{addr:x}", SYS_MMAP, addr, page_round(size), prot,
                       flags, fd & _M64, 0)
        if r != addr:   # an old kernel ignoring MAP_FIXED_NOREPLACE: undo, never keep a wrong address
            self.inj.syscall(tid, SYS_MUNMAP, r, page_round(size))
            raise ProbeError(f"pid {self.pid}: mmap at 0x{addr:x} landed at 0x{r:x} (kernel too old?)")

    def map_near(self, tid: int, near: int, size: int, prot: int) -> int:
        """Private anonymous memory within +-2 GiB of ``near`` (trampolines)."""
        size = page_round(size)
        for h in near_hints(read_maps(self.pid), near, size, PAGE):
            r = self.inj.syscall(tid, SYS_MMAP, h, size, prot, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE,
                                 _M64, 0)
            if r == h:
                return r
            if r > 0:
                self.inj.syscall(tid, SYS_MUNMAP, r, size)
        raise ProbeError(f"no free memory within +-2 GiB of 0x{near:x} in pid {self.pid} for a trampoline")

    def populate(self, tid: int, addr: int, size: int) -> bool:
        """Fault ``size`` bytes at ``addr`` in, writable, now (madvise MADV_POPULATE_WRITE): memory
        programs write on hits (ring buffers, map values) then takes no page fault on a hit -- a
        first touch costs microseconds, as much as a hundred ring records.  False when the kernel
        cannot (before 5.14): the pages then fault in on first use, as they did."""
        return self.inj.syscall(tid, SYS_MADVISE, addr, page_round(size), MADV_POPULATE_WRITE) == 0

    def unmap(self, tid: int, addr: int, size: int) -> None:
        self.inj.syscall(tid, SYS_MUNMAP, addr, page_round(size))

    def memfd_for_tracer(self, tid: int, size: int, name_addr: int) -> tuple[int, int]:
        """Create a memfd in the target; returns (the target's fd number, the tracer's fd of the
        same file, sized to ``size``).  ``name_addr``: a NUL-terminated name in target memory."""
        tfd = self._call(tid, "memfd_create", SYS_MEMFD_CREATE, name_addr, MFD_CLOEXEC)
        try:
            fd = os.open(f"/proc/{self.pid}/fd/{tfd}", os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            self.inj.syscall(tid, SYS_CLOSE, tfd)
            raise ProbeError(f"cannot open the target's memfd /proc/{self.pid}/fd/{tfd}: {e.strerror}") from None
        os.ftruncate(fd, size)
        return tfd, fd

    def close_fd(self, tid: int, fd: int) -> None:
        self.inj.syscall(tid, SYS_CLOSE, fd)


def write_code(mem: P.ProcMem, addr: int, data: bytes) -> None:
    """Write into the target (also read-only/exec pages: /proc/PID/mem forces the write)."""
    if not mem.write(addr, data):
        raise ProbeError(f"cannot write {len(data)} bytes at 0x{addr:x} in pid {mem.pid}")
