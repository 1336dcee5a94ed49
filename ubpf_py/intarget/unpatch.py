"""Detach helpers: what must be put back on a thread's stack, and where a thread is in a trampoline.

These are pure functions over a memory reader (``read(addr, n) -> bytes``) and a
thread's registers; the tracer applies the result with every thread stopped:

1. restore every patched site's bytes (no new entries into trampolines after that);
2. for each thread, ``locate`` its rip: ``None`` means it is not in a trampoline,
   but a thread whose block ``is_busy`` is inside a program or the runtime (its
   runtime stack holds a return address into a trampoline): let it run too.
   In a site's relocated instructions at an instruction boundary, ``resume_at`` is
   the original instruction that does the same thing: set rip there.  Anywhere else
   in a trampoline the thread must run until rip leaves it (``exits`` lists the
   original-code addresses an entry trampoline can leave to; a return trampoline
   leaves to the original return address of the returning frame);
3. for each thread, ``return_fixes`` lists the stack slots that still hold the
   return trampoline's address and the original return address to write back;
4. unmap the code pages and the thread table.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from ubpf_py.abi.runtime import RUNTIME_HEADER, SHADOW_DEPTH, SHADOW_ENTRY, THREAD_BLOCK
from ubpf_py.intarget.sites import SitePlan, relocated_offsets
from ubpf_py.intarget.trampoline import displaced_offset, thread_slot_index

Reader = Callable[[int, int], bytes]


def _u64(read: Reader, addr: int) -> int:
    return struct.unpack("<Q", read(addr, 8))[0]


def find_thread_block(read: Reader, runtime_header: int, fs_base: int) -> int | None:
    """The THREAD_BLOCK of the thread whose FS base is ``fs_base``, found as the trampolines find it
    (without claiming a slot); ``None`` if the thread never hit an in-target probe."""
    if fs_base == 0:
        return None
    table = _u64(read, runtime_header + RUNTIME_HEADER.off("thread_table"))
    slots = _u64(read, runtime_header + RUNTIME_HEADER.off("thread_slots"))
    size = _u64(read, runtime_header + RUNTIME_HEADER.off("thread_slot_size"))
    i = thread_slot_index(fs_base, slots)
    for _ in range(slots):
        block = table + i * size
        key = _u64(read, block + THREAD_BLOCK.off("key"))
        if key == fs_base:
            return block
        if key == 0:
            return None
        i = (i + 1) & (slots - 1)
    return None


def is_busy(read: Reader, thread_block: int) -> bool:
    """Whether the thread is inside a trampoline's program call (THREAD_BLOCK.busy), or in a
    handler of a signal a program sent, which returns into the trampoline (sig_delivering)."""
    return (_u64(read, thread_block + THREAD_BLOCK.off("busy")) != 0
            or _u64(read, thread_block + THREAD_BLOCK.off("sig_delivering")) != 0)


@dataclass(frozen=True, slots=True)
class ReturnFix:
    """Write ``value`` (the original return address) at stack slot ``addr``."""

    addr: int
    value: int


def return_fixes(read: Reader, thread_block: int, return_trampoline: int) -> list[ReturnFix]:
    """Stack slots of this thread that still hold the return trampoline's address.

    Entries are taken newest first, and a slot is fixed once: a newer frame that reused
    the slot of a frame longjmp skipped owns it.  An entry whose own ``ret_addr`` is the
    return trampoline (a tail call chained two return probes on one slot) is skipped, so
    the older entry of that slot supplies the real address.  A slot is only written when
    it still holds the trampoline's address, so a dead entry whose slot has since been
    overwritten never clobbers live data.  No rsp filter is applied: a thread running a
    handler on a sigaltstack above its main stack still has live entries below its rsp.
    """
    depth = min(_u64(read, thread_block + THREAD_BLOCK.off("shadow_depth")), SHADOW_DEPTH)
    base = thread_block + THREAD_BLOCK.off("shadow")
    fixes: list[ReturnFix] = []
    done: set[int] = set()
    for i in reversed(range(depth)):
        e = base + i * SHADOW_ENTRY.size
        ret = _u64(read, e + SHADOW_ENTRY.off("ret_addr"))
        slot = _u64(read, e + SHADOW_ENTRY.off("rsp"))
        if ret == return_trampoline or slot in done:
            continue
        if _u64(read, slot) == return_trampoline:
            fixes.append(ReturnFix(slot, ret))
            done.add(slot)
    return fixes


@dataclass(frozen=True, slots=True)
class EntryTrampoline:
    """Where a site's entry trampoline lives and what it relocated."""

    addr: int
    size: int
    plan: SitePlan
    red_zone: bool = True   # the variant it was built with (``build_entry_trampoline``)


@dataclass(frozen=True, slots=True)
class Position:
    """A thread's rip inside a trampoline."""

    kind: str                   # "entry" or "return"
    site: int                   # the site (entry) or 0 (return)
    resume_at: int | None       # set rip here instead of running out (relocated code only)
    exits: tuple[int, ...]      # original-code addresses it can leave to (entry trampolines)


def locate(rip: int, entries: list[EntryTrampoline], return_trampoline: tuple[int, int]) -> Position | None:
    """Whether ``rip`` is inside a trampoline, and how the thread gets out of it."""
    ret_addr, ret_size = return_trampoline
    if ret_addr <= rip < ret_addr + ret_size:
        return Position("return", 0, None, ())
    for t in entries:
        if not t.addr <= rip < t.addr + t.size:
            continue
        off = rip - t.addr
        disp = displaced_offset(t.red_zone)
        if off >= disp:
            relocated = t.addr + disp
            starts = dict(relocated_offsets(t.plan, relocated))
            if off - disp in starts:
                return Position("entry", t.plan.site, starts[off - disp], t.plan.exits())
            jmp_back = t.size - 5
            if t.plan.falls_through and off == jmp_back:
                return Position("entry", t.plan.site, t.plan.resume, t.plan.exits())
        if off == 0:
            # not one instruction of the trampoline has run: the site is the same state
            return Position("entry", t.plan.site, t.plan.site, t.plan.exits())
        return Position("entry", t.plan.site, None, t.plan.exits())
    return None
