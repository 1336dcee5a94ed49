"""Scratch pages inside the target: out-of-line slots and the return trampoline.

A page is obtained by making a stopped thread of the target execute an
``mmap`` system call we inject: its registers are saved, ``syscall; int3`` is
placed at its rip (or in an existing scratch page), the syscall number and
arguments go into the registers, the thread runs to the int3, and the result is
read from rax before registers and bytes are put back.  Pages are placed within
+-2 GiB of the code they serve (MAP_FIXED_NOREPLACE with hints below the
binary) so rip-relative operands and the jump back stay 32-bit.

Layout of every page: offset 0 ``mov eax, nr; syscall; int3`` (later injections), offset 16
``int3`` (the return-probe trampoline; only the first page's is used), offset 40 the word
``trapguard.SCRATCH_MAGIC`` (the trap guard's handler recognises our pages by it), slots
of ``SLOT_SIZE`` bytes from offset 64.

The area also owns the address space's trap guard (``trapguard.TrapGuard``), when a guardian
asks for one: it lives and goes with the scratch pages.
"""

from __future__ import annotations

import os
import signal
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from ubpf_py.abi.kernel import (
    MAP_ANONYMOUS,
    MAP_FIXED_NOREPLACE,
    MAP_PRIVATE,
    PAGE_SIZE,
    PROT_EXEC,
    PROT_READ,
    SYS_MMAP,
    SYS_MUNMAP,
)
from ubpf_py.errors import ProbeError, TargetError
from ubpf_py.probe import ptrace as P
from ubpf_py.probe.ool import SLOT_SIZE
from ubpf_py.probe.procmaps import near_hints, read_maps
from ubpf_py.probe.trapguard import SCRATCH_FIRST_SLOT, SCRATCH_MAGIC, SCRATCH_MAGIC_OFF, TrapGuard

PAGE = PAGE_SIZE
SCRATCH_SIZE = PAGE
TRAMP_OFF = 16
FIRST_SLOT = SCRATCH_FIRST_SLOT
REACH = (1 << 31) - 2 * PAGE


@dataclass(slots=True)
class ScratchPage:
    addr: int
    size: int
    next_off: int = FIRST_SLOT
    #: slot address -> Plan using it (for mapping a thread's rip back on detach)
    users: dict = field(default_factory=dict)

    @property
    def tramp(self) -> int:
        return self.addr + TRAMP_OFF

    def contains(self, a: int) -> bool:
        return self.addr <= a < self.addr + self.size


class Injector:
    """Runs system calls inside a stopped thread of the target."""

    def __init__(self, mem: P.ProcMem) -> None:
        self.mem = mem
        self.stub = 0   # address of 'syscall; int3' in a scratch page, once one exists
        self.deferred_signals: list[tuple[int, int]] = []

    def syscall(self, tid: int, nr: int, *args: int) -> int:
        """Execute syscall ``nr`` in thread ``tid`` (which must be in a ptrace stop); returns rax."""
        saved = P.RegsBuf()
        saved.get(tid)
        regs = P.RegsBuf()
        regs.copy_from(saved)
        v = regs.vals
        where = self.stub or v[P.RIP]
        # 'mov eax, nr; syscall; int3': the number travels in the code, because a thread stopped
        # inside a system call (the exec event) gets rax overwritten with that call's result
        code = b"\xb8" + struct.pack("<I", nr) + b"\x0f\x05\xcc"
        orig = self.mem.read(where, len(code))
        if orig is None or not self.mem.write(where, code):
            raise ProbeError(f"cannot write the syscall stub into pid {self.mem.pid} at 0x{where:x}")
        if self.stub:
            orig = None
        try:
            a = list(args) + [0] * (6 - len(args))
            v[P.RDI], v[P.RSI], v[P.RDX], v[P.R10], v[P.R8], v[P.R9] = (
                a[0] & P_M64, a[1] & P_M64, a[2] & P_M64, a[3] & P_M64, a[4] & P_M64, a[5] & P_M64)
            v[P.ORIG_RAX] = P_M64      # -1: no syscall restart on resume
            v[P.RIP] = where
            regs.set(tid)
            P.cont(tid)
            while True:
                status = P.wait_tid(tid)       # never blocks on a thread that cannot report
                if status is None or os.WIFEXITED(status) or os.WIFSIGNALED(status):
                    raise ProbeError(f"thread {tid} exited while running an injected system call")
                sig = P.stop_sig(status)
                if sig == signal.SIGTRAP and P.stop_event(status) == 0:
                    regs.get(tid)
                    if v[P.RIP] == where + len(code):
                        break
                if P.stop_event(status) == 0 and sig != signal.SIGTRAP:
                    # a signal arrived first: hold it back, deliver after we are done
                    self.deferred_signals.append((tid, sig))
                P.cont(tid)
            result = v[P.RAX]
        finally:
            if orig is not None:
                self.mem.write(where, orig)
            saved.set(tid)
        return result - (1 << 64) if result >> 63 else result


P_M64 = (1 << 64) - 1


class ScratchArea:
    """All scratch pages of one address space and slot allocation in them."""

    def __init__(self, mem: P.ProcMem, injector: Injector) -> None:
        self.mem = mem
        self.inj = injector
        self.pages: list[ScratchPage] = []
        self.guard: TrapGuard | None = None
        #: a guard was tried in this address space (installed, or refused: do not ask again)
        self.guard_tried = False

    @property
    def tramp(self) -> int:
        return self.pages[0].tramp if self.pages else 0

    def page_of(self, addr: int) -> ScratchPage | None:
        for p in self.pages:
            if p.contains(addr):
                return p
        return None

    def _map_page(self, tid: int, near: int, pid: int) -> ScratchPage:
        hints: list[int] = []
        if near:
            try:
                hints = near_hints(read_maps(pid), near, SCRATCH_SIZE, PAGE)
            except TargetError:
                hints = []
        hints.append(0)
        for h in hints:
            flags = MAP_PRIVATE | MAP_ANONYMOUS | (MAP_FIXED_NOREPLACE if h else 0)
            r = self.inj.syscall(tid, SYS_MMAP, h, SCRATCH_SIZE, PROT_READ | PROT_EXEC, flags, P_M64, 0)
            if r < 0:
                continue
            if near and abs(r - near) > REACH:
                self.inj.syscall(tid, SYS_MUNMAP, r, SCRATCH_SIZE)
                continue
            page = ScratchPage(r, SCRATCH_SIZE)
            head = bytearray(b"\xcc" * FIRST_SLOT)
            struct.pack_into("<Q", head, SCRATCH_MAGIC_OFF, SCRATCH_MAGIC)
            if not self.mem.write(r, bytes(head)):
                raise ProbeError(f"cannot write scratch page 0x{r:x} of pid {pid}")
            self.pages.append(page)
            if self.guard is not None and len(self.pages) == 1:
                self.guard.set_tramp(page.tramp)
            if not self.inj.stub:
                self.inj.stub = r
            return page
        raise ProbeError(f"cannot map a scratch page within reach of 0x{near:x} in pid {pid}")

    def guard_trap(self, addr: int, pid: int, stopped_tid: Callable[[], int]) -> None:
        """An int3 is about to be written at ``addr``: record it in the trap guard (installed on the
        first call, in thread ``stopped_tid()``; best effort: a target that refuses it keeps running
        unguarded, as before)."""
        if self.guard is None and not self.guard_tried:
            self.guard_tried = True
            try:
                self.guard = TrapGuard.install(self.inj, self.mem, stopped_tid(), pid, self.tramp)
            except ProbeError:
                self.guard = None
        if self.guard is not None:
            self.guard.note(addr)

    def ensure(self, tid: int, pid: int) -> None:
        """Make sure at least one page (the trampoline) exists."""
        if not self.pages:
            self._map_page(tid, 0, pid)

    def alloc_slot(self, tid: int, pid: int, near: int) -> int:
        """A free slot address within reach of ``near`` (maps a new page when needed)."""
        for p in self.pages:
            if p.next_off + SLOT_SIZE <= p.size and abs(p.addr - near) < REACH:
                a = p.addr + p.next_off
                p.next_off += SLOT_SIZE
                return a
        p = self._map_page(tid, near, pid)
        a = p.addr + p.next_off
        p.next_off += SLOT_SIZE
        return a

    def unmap_all(self, tid: int) -> None:
        """Remove every page and the trap guard from the target (all threads stopped, none inside)."""
        if self.guard is not None:
            guard, self.guard = self.guard, None
            guard.remove(self.inj, tid)
        for p in reversed(self.pages):
            if p.addr == self.inj.stub:
                continue
            self.inj.syscall(tid, SYS_MUNMAP, p.addr, p.size)
        if self.inj.stub:
            stub_page = self.inj.stub
            self.inj.stub = 0     # the last munmap runs from the thread's own rip
            self.inj.syscall(tid, SYS_MUNMAP, stub_page, SCRATCH_SIZE)
        self.pages.clear()

    def forget(self) -> None:
        """The address space is gone (exec): drop the bookkeeping."""
        self.pages.clear()
        self.guard = None
        self.guard_tried = False
        self.inj.stub = 0
