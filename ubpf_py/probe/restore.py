"""Putting the target back: stop every thread, restore bytes, return addresses,
semaphores and registers, unmap scratch pages, release the threads.

``Restorer`` is owned by ``tracer.Tracer``; it shares the tracer's thread and
process tables and is handed the two event handlers it needs for whatever arrives
while threads are being stopped (a new thread or child, an exit).  Order matters: registers of threads caught on an int3 or inside a scratch page
are fixed while the breakpoints are still known as armed, then the bytes are
restored, then pages are unmapped from a thread that is no longer inside them.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable

from ubpf_py.errors import ProbeError
from ubpf_py.probe import ptrace as P
from ubpf_py.probe.procs import Proc, Thread
from ubpf_py.probe.scratch import Injector

SIGTRAP = signal.SIGTRAP


class Restorer:
    """Stops every thread of the traced tree and puts the target back (detach).

    ``threads``, ``procs`` and ``early`` are the tracer's own tables (shared, not copied: the
    tracer keeps them current); ``regs`` is the session's register buffer.  ``on_event(th, sig,
    ev)`` handles a ptrace event stop (clone/fork/vfork/exec: the newcomer must be registered or
    cleaned before the target is released) and ``on_exit(th, status)`` a thread that ended --
    both are the tracer's, passed as callables so this class needs no tracer reference."""

    def __init__(self, regs: P.RegsBuf, threads: dict[int, Thread], procs: dict[int, Proc],
                 early: dict[int, int], on_event: Callable[[Thread, int, int], None],
                 on_exit: Callable[[Thread, int], None]) -> None:
        self.regs = regs
        self.v = regs.vals
        self.threads = threads
        self.procs = procs
        self._early = early
        self.on_event = on_event
        self.thread_gone = on_exit

    def stop_all(self) -> None:
        """Bring every traced thread to a ptrace stop, handling what arrives meanwhile.

        Never blocks on one thread: a zombie leader (its process is exiting, or it called
        pthread_exit) cannot stop and reports its exit only after every other thread has been
        reaped -- by us.  Such a leader is marked ``dead`` and skipped; once the others are
        stopped or reaped its exit status is collected if the kernel releases it."""
        for _ in range(1000):
            running = [t for t in self.threads.values() if not t.stopped and not t.dead]
            if not running:
                break
            for t in running:
                P.interrupt(t.tid)
            for t in running:
                while not t.stopped and not t.dead and t.tid in self.threads:
                    st = self._early.pop(t.tid, None)
                    if st is None:
                        st = P.wait_tid(t.tid)
                        if st is None:
                            if P.thread_dead(t.tid) and os.path.exists(f"/proc/{t.tid}"):
                                t.dead = True       # a zombie leader: its report is held back
                            else:
                                self.thread_gone(t, 0)
                            break
                    self._stop_during_detach(t, st)
        self._reap_dead_leaders()

    def _reap_dead_leaders(self) -> None:
        """Exit statuses of zombie leaders whose other threads are all gone by now."""
        for t in [t for t in self.threads.values() if t.dead and t.tid == t.proc.tgid]:
            if any(o is not t and not o.dead for o in t.proc.threads.values()):
                continue
            st = self._early.pop(t.tid, None)
            if st is None:
                st = P.wait_tid(t.tid)
            if st is not None and (st & 0x7F) != 0x7F:
                self.thread_gone(t, st)

    def _stop_during_detach(self, th: Thread, status: int) -> None:
        if (status & 0x7F) != 0x7F:
            self.thread_gone(th, status)
            return
        th.stopped = True
        sig = (status >> 8) & 0xFF
        ev = status >> 16
        if ev == 0:
            if sig == SIGTRAP:
                self.regs.get(th.tid)
                proc = th.proc
                owner = proc.vfork_parent or proc
                rip = self.v[P.RIP] - 1
                bp = owner.bps.get(rip)
                if bp is not None and bp.armed:
                    self.v[P.RIP] = rip         # the instruction has not run: rewind onto it
                    self.regs.set(th.tid)
                    return
                if owner.scratch.tramp and rip == owner.scratch.tramp and th.shadow.entries:
                    e = th.shadow.entries.pop()
                    while e.chained and th.shadow.entries:
                        e = th.shadow.entries.pop()
                    self.v[P.RIP] = e.orig_ret
                    self.regs.set(th.tid)
                    return
            th.pending_sig = sig
            return
        if ev in (P.PTRACE_EVENT_CLONE, P.PTRACE_EVENT_FORK, P.PTRACE_EVENT_VFORK, P.PTRACE_EVENT_EXEC):
            self.on_event(th, sig, ev)   # registers/cleans the newcomer and resumes th
            return
        if ev == P.PTRACE_EVENT_STOP:
            return

    def detach(self, intarget=None, ret_log=None) -> None:
        """Restore every patched byte and return address, unmap scratch pages, release all threads.
        ``intarget``: the in-target engine (its jumps and mappings go too); ``ret_log``: the
        guardian's record of replaced return addresses (cleared as they are put back)."""
        if not self.threads:
            self.close_all()
            return
        self.stop_all()
        later: list[tuple[int, int, int]] = []
        for proc in list(self.procs.values()):
            if proc.vfork_parent is not None:
                continue
            self._restore_proc(proc, intarget, ret_log)
        for proc in list(self.procs.values()):
            if proc.vfork_parent is not None:
                continue
            try:
                if (proc.scratch.pages or proc.scratch.guard is not None) and proc.threads:
                    proc.scratch.unmap_all(proc.any_stopped_tid())
            except (ProbeError, P.PtraceError, OSError):
                pass    # left mapped: harmless (nothing refers to it any more)
            for tid, sig in proc.inj.deferred_signals:
                t = self.threads.get(tid)
                if t is not None and not t.pending_sig:
                    t.pending_sig = sig
                elif t is not None and t.pending_sig != sig:
                    later.append((proc.tgid, tid, sig))
        for t in list(self.threads.values()):
            P.detach(t.tid, t.pending_sig)
        for tgid, tid, sig in later:      # a second signal held for one thread: sent again now
            P.tgkill(tgid, tid, sig)
        self.threads.clear()
        self.close_all()

    def _restore_proc(self, proc: Proc, intarget, ret_log) -> None:
        borrowers = [t for cp in self.procs.values() if cp.vfork_parent is proc for t in cp.threads.values()]
        threads = list(proc.threads.values()) + borrowers
        if intarget is not None:    # jumps, trampolines, replaced return addresses, mappings
            intarget.restore(proc, threads)
        for t in threads:                 # first: while the breakpoints are still known as armed
            self._fix_rip(proc, t)
        clean_memory(proc.mem, proc.bps.values(), [], proc.scratch.tramp)
        release_semaphores(proc.mem, proc.semas)
        proc.semas.clear()
        for bp in proc.bps.values():
            bp.armed = False
        for t in threads:
            clean_memory(proc.mem, (), t.shadow.entries, proc.scratch.tramp)
            t.shadow.entries.clear()
        if ret_log is not None:
            ret_log.clear_pid(proc.tgid)

    def _fix_rip(self, proc: Proc, t: Thread) -> None:
        """A thread left inside a scratch page is moved to the equivalent original address."""
        try:
            self.regs.get(t.tid)
        except P.PtraceError:
            return
        rip = self.v[P.RIP]
        bp = proc.bps.get(rip - 1)
        if t.at_bp and bp is not None and bp.armed:
            # stopped on our int3 with the hit unfinished: the instruction has not run
            self.v[P.RIP] = rip - 1
            self.regs.set(t.tid)
            return
        page = proc.scratch.page_of(rip)
        if page is None:
            return
        new = None
        tramp = proc.scratch.tramp
        if tramp and rip in (tramp, tramp + 1) and t.shadow.entries:
            e = t.shadow.entries.pop()
            while e.chained and t.shadow.entries:
                e = t.shadow.entries.pop()
            new = e.orig_ret
        for slot, plan in page.users.items():
            if rip == slot:
                new = plan.addr
            elif slot < rip <= slot + plan.length:
                new = plan.addr + (rip - slot)
        if new is not None:
            self.v[P.RIP] = new
            self.regs.set(t.tid)

    def close_all(self) -> None:
        """Close every process's memory descriptor and forget the processes."""
        for proc in list(self.procs.values()):
            if proc.vfork_parent is None:
                proc.mem.close()
        self.procs.clear()


def release_semaphores(mem: P.ProcMem, semas: dict[int, int]) -> None:
    """Undo our USDT semaphore increments."""
    for a, n in semas.items():
        cur = mem.read(a, 2)
        if cur is not None:
            mem.write(a, max(int.from_bytes(cur, "little") - n, 0).to_bytes(2, "little"))


def clean_memory(mem: P.ProcMem, bps, shadow_entries, tramp: int) -> None:
    """Put original bytes back at ``bps`` and original return addresses in stack slots of
    ``shadow_entries`` that still hold the trampoline."""
    for bp in bps:
        if bp.armed:
            mem.write(bp.addr, bp.orig[:1])
    if tramp:
        t = tramp.to_bytes(8, "little")
        for e in shadow_entries:
            if mem.read(e.slot, 8) == t:
                mem.write(e.slot, e.orig_ret.to_bytes(8, "little"))


def restore_child_disposition(parent: Proc, mem: P.ProcMem, child: int) -> None:
    """An unfollowed fork child (stopped, ``mem`` open on it) inherited the trap guard's SIGTRAP
    handler: give it its original disposition back.  Its copy of the guard area stays mapped, like
    the scratch pages; a failure leaves the handler, which then only ever takes the default action."""
    guard = parent.scratch.guard
    if guard is None:
        return
    inj = Injector(mem)
    inj.stub = parent.inj.stub
    with contextlib.suppress(ProbeError, P.PtraceError, OSError):
        guard.copy_for(mem).restore_disposition(inj, child)
