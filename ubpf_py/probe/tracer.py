"""The ptrace event loop: processes, threads, hits, fork/exec/dlopen, detach.

One ``Tracer`` traces one target process (plus, with ``follow_forks``, its
fork children).  Every stop of every traced thread arrives through
``waitpid(-1, __WALL)`` and is dispatched here:

* SIGTRAP at one of our int3 bytes -> a hit: run the handlers, hijack the
  return address for return probes, finish the displaced instruction (emulate
  or resume in its out-of-line slot), resume.  One stop per hit.
* SIGTRAP at the trampoline -> a function returned: run its return probes,
  resume at the real return address.
* clone -> a new thread (traced automatically); fork/vfork -> the child is
  cleaned of our int3 bytes and return addresses and released (or followed);
  exec -> the new image gets our probes again if their files are mapped.
* the dynamic linker's ``_dl_debug_state`` -> libraries came or went: pending
  probes are armed, stale breakpoints forgotten.
* any other signal goes back to the thread unchanged (also SIGTRAPs the target
  raises itself: they are not at our addresses).

``detach()`` stops every thread and puts the target back exactly as it was.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from collections.abc import Callable

from ubpf_py.errors import ProbeError
from ubpf_py.probe import ool as O
from ubpf_py.probe import ptrace as P
from ubpf_py.probe.arming import Armer
from ubpf_py.probe.breakpoints import Breakpoint, Probe
from ubpf_py.probe.hits import HitFiller
from ubpf_py.probe.native import RC_FINISH, RC_HANDLER_FAILED, RC_INTERRUPTED, RC_NATIVE_FAULT, RC_STOP
from ubpf_py.probe.native_calls import NativeCalls
from ubpf_py.probe.procmaps import read_maps
from ubpf_py.probe.procs import Proc, Thread, new_proc
from ubpf_py.probe.restore import Restorer, clean_memory, release_semaphores, restore_child_disposition
from ubpf_py.probe.untraced import UntracedThreads
from ubpf_py.probe.uretprobe import MAX_DEPTH, RetEntry, ShadowStack
from ubpf_py.vm.env import HitContext

SIGTRAP = signal.SIGTRAP
GROUP_STOP_SIGS = {signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU}


class Tracer:
    """Traces one process tree; see the module docstring.

    Composed of objects with one job each: ``armer`` (writes the breakpoint tables: int3s, plans,
    in-target jumps, semaphores), ``restorer`` (stops every thread, puts the target back),
    ``native_calls`` (native programs run from Python), ``nl`` (the C stop loop and its mirror of
    the breakpoint table; None without it), ``filler`` (the per-hit facts).  The tracer keeps the
    process/thread/probe tables, runs the Python stop loop and handles every stop the C loop
    hands back (the hit path: the "hits" section below)."""

    def __init__(self, regs: P.RegsBuf, follow_forks: bool = False, exact_cpu: bool = True,
                 native: bool | None = None) -> None:
        self.regs = regs
        self.v = regs.vals
        self.filler = HitFiller(regs, exact_cpu=exact_cpu)
        self.follow_forks = follow_forks
        self.procs: dict[int, Proc] = {}
        self.threads: dict[int, Thread] = {}
        self.probes: dict[int, Probe] = {}
        self.main: Proc | None = None
        self._early: dict[int, int] = {}      # stops of tids we do not know yet (new threads)
        self._stop_requested = False
        self.total_hits = 0
        self.tracer_ns = 0
        self.handler_ns = 0
        self.ret_log = None                   # guardian.ReturnLog when a guardian runs
        self.on_patch = None                  # guardian hook: (tgid, addr, orig bytes, patch bytes)
        self._regs_valid = False
        self._cb_error: BaseException | None = None
        self._native_dirty = True
        self.native_calls = NativeCalls(regs.addr, self.probes)
        self.armer = Armer(self.probes, on_change=self._mark_dirty, on_dl_state=self._on_dl_state)
        self.restorer = Restorer(regs, self.threads, self.procs, self._early,
                                 on_event=self.on_event, on_exit=self.thread_gone)
        #: threads created by a process whose probes all run in the target are not traced
        self.untraced = UntracedThreads(self.threads, self.add_thread, self.restorer.stop_all, self._mark_dirty)
        #: called between runs of the C loop (before each run and every poll interval): the
        #: user's periodic work while hits of native programs never enter Python
        self.poll_hooks: list[Callable[[], None]] = []
        #: the in-target half (``intarget.process.InTargetEngine``) once the session enables it
        self.intarget = None
        #: a signal (SIGURG: the in-target dlopen notification) wakes the C loop (the session set
        #: up the wake-up pipe for this run)
        self.wakeup_ready = False
        self.nl = None
        if native is not False:
            from ubpf_py.probe import native as N
            lib = N.load()
            if lib is not None:
                self.nl = N.NativeLoop(lib, regs.addr, self._native_cb)
            elif native:
                raise ProbeError("the native stop loop is not available (no C compiler or Python headers?): "
                                 "build the package or run with native=False")

    # ------------------------------------------------------------------ setup
    def add_thread(self, proc: Proc, tid: int, stopped: bool) -> Thread:
        t = Thread(tid, proc, stopped=stopped)
        self._native_dirty = True
        proc.threads[tid] = t
        self.threads[tid] = t
        return t

    def adopt_main(self, proc: Proc) -> None:
        self.main = proc
        self.procs[proc.tgid] = proc

    def _mark_dirty(self) -> None:
        """A breakpoint or thread table changed: the C loop's mirror is rebuilt before it runs."""
        self._native_dirty = True

    # ------------------------------------------------------------------ arming
    def arm_probe(self, proc: Proc, probe: Probe, maps=None) -> int:
        """Arm ``probe`` at every current mapping of its file in ``proc``; returns how many."""
        return self.armer.arm_probe(proc, probe, maps, self.intarget)

    def arm_all(self, proc: Proc) -> None:
        """Arm every probe whose file is mapped in ``proc`` (after attach/exec/dlopen)."""
        self.armer.arm_all(proc, self.intarget, self._dl_in_target())

    def _dl_in_target(self) -> bool:
        """May the dynamic linker's watch be an in-target jump (``runtime/dlnotify.c``) instead of an
        int3?  Its notification wakes the C loop through the session's signal wake-up pipe."""
        eng = self.intarget
        return (eng is not None and bool(eng.dl_notify) and self.nl is not None and self.wakeup_ready
                and self.untraced.enabled and not self.follow_forks)

    def _on_dl_state(self, th: Thread) -> None:
        """The dynamic linker's breakpoint: libraries came or went (dlopen/dlclose)."""
        if th.proc.vfork_parent is not None:
            return
        self._rearm_libraries(th.proc, th, stop_all=bool(
            self.intarget is not None and any(p.target_entry for p in self.probes.values())))

    def poll_dl_notify(self) -> None:
        """The in-target form of the breakpoint above: a thread in ``ubpf_dl_notify`` waits for us."""
        eng = self.intarget
        req = eng.dl_pending() if eng is not None else 0
        if not req:
            return
        try:
            for proc in list(self.procs.values()):
                if proc.exit_status is None and proc.vfork_parent is None and proc.threads:
                    self._rearm_libraries(proc, None, stop_all=True)
        finally:
            eng.dl_answer(req)

    def _rearm_libraries(self, proc: Proc, th: Thread | None, stop_all: bool) -> None:
        """Libraries of ``proc`` came or went: forget what was unmapped, arm what is new.  ``th``: the
        thread held at the int3 (None: the in-target notification).  A jump (5 bytes) may only be
        written with every thread stopped, so with ``stop_all`` the others are stopped now (the
        untraced ones seized for the moment) and let go afterwards."""
        maps = read_maps(proc.tgid)

        def unmapped(addr: int) -> bool:
            return not any(m.start <= addr < m.end and m.executable for m in maps)

        # forget breakpoints and in-target sites whose code was unmapped (dlclose)
        if self.intarget is not None:
            self.intarget.forget_sites(proc.tgid, unmapped)
        self.armer.forget_unmapped(proc, unmapped, self.ret_log)
        running = [t for t in self.threads.values() if t is not th and not t.stopped] if stop_all else []
        seized: list[Thread] = []
        try:
            if running:
                self.restorer.stop_all()
            if stop_all:
                seized = self.untraced.seize_untraced(proc)
            for probe in self.probes.values():
                self.arm_probe(proc, probe, maps)
            self.settle_clone_tracing()
        finally:
            self.untraced.release(seized)
            # those kept (the process went back to tracing every thread) run on like the others
            for t in running + [t for t in seized if not t.temp]:
                if t.stopped and t.tid in self.threads:
                    sig, t.pending_sig = t.pending_sig, 0
                    self.resume(t, sig)

    def detach(self) -> None:
        """Stop every thread and put the target back exactly as it was (``Restorer.detach``);
        threads we do not trace are seized first, so each one is put back too."""
        eng = self.intarget
        req = eng.dl_pending() if eng is not None else 0
        if req:     # a thread waiting in ubpf_dl_notify returns at once (it is stepped out of our code)
            eng.dl_answer(req)
        for proc in list(self.procs.values()):
            if proc.no_clone and proc.exit_status is None:
                self.restorer.stop_all()
                self.untraced.seize_untraced(proc)
        self.restorer.detach(self.intarget, self.ret_log)

    def settle_clone_tracing(self) -> None:
        """Trace the threads each process creates from now on only if it needs it (an int3 armed,
        forks followed; ``UntracedThreads``).  Stops the threads of a process that changes."""
        for proc in list(self.procs.values()):
            if proc.exit_status is not None:
                continue
            if self._dl_in_target() and any(bp.internal is not None for bp in proc.bps.values()) \
                    and all((t.stopped or t.dead) and not t.at_bp for t in proc.threads.values()):
                self.armer.arm_dl_watch(proc, None, self.intarget, self.ret_log)   # int3 -> jump
            want = self.untraced.eligible(proc, self.intarget, self.follow_forks)
            if want == proc.no_clone or not (self.untraced.enabled or proc.no_clone):
                continue
            if any(not t.stopped and not t.dead for t in proc.threads.values()):
                self.restorer.stop_all()
            self.untraced.settle(proc, want)

    # ------------------------------------------------------------------ loop
    def totals(self) -> tuple[int, int, int]:
        """(hits, tracer ns, handler ns) of both loops."""
        hits, tns, hns = self.total_hits, self.tracer_ns, self.handler_ns
        if self.nl is not None:
            nh, nt, nhn = self.nl.stats()
            hits += nh
            tns += nt
            hns += nhn        # the C loop times its handler calls as a whole (not per probe)
        return hits, tns, hns

    def request_stop(self) -> None:
        """Ask the loop to end (signal handlers call this; it never raises, so no wait status
        already taken from the kernel is ever dropped).  A PTRACE_INTERRUPT of the main thread
        makes a blocking waitpid return at once."""
        self._stop_requested = True
        if self.nl is not None:
            self.nl.request_stop()
        main = self.main
        if main is not None and main.exit_status is None:
            # every running thread: one of them may be a zombie leader (pthread_exit) that
            # never stops, and the others may sit in system calls that never hit a probe
            for t in list(main.threads.values()):
                if not t.stopped and not t.dead:
                    P.interrupt(t.tid)

    def loop(self, deadline: float | None = None) -> None:
        """Handle stops until the main process exits, a stop is requested or the deadline passes."""
        waitpid = os.waitpid
        dispatch = self.dispatch
        for proc in self.procs.values():          # signals held back during injected calls
            for tid, sig in proc.inj.deferred_signals:
                t = self.threads.get(tid)
                if t is not None and t.stopped and not t.pending_sig:
                    t.pending_sig = sig
                else:
                    P.tgkill(proc.tgid, tid, sig)
            proc.inj.deferred_signals.clear()
        self.settle_clone_tracing()
        for t in list(self.threads.values()):     # threads held at attach/exec/injection stops
            if t.stopped:
                sig, t.pending_sig = t.pending_sig, 0
                self.resume(t, sig)
        if self.nl is not None:
            self.loop_native(deadline)
            return
        while self.main is not None and self.main.exit_status is None and not self._stop_requested:
            if deadline is not None and time.monotonic() >= deadline:
                break
            try:
                tid, status = waitpid(-1, P.WALL)        # 1. the next stop (hits: see "hits" below)
            except ChildProcessError:
                break
            dispatch(tid, status)

    def loop_native(self, deadline: float | None) -> None:
        """The same loop with the per-hit path in C (native/hotloop.c); Python sees the rest."""
        nl = self.nl
        dispatch = self.dispatch
        while self.main is not None and self.main.exit_status is None and not self._stop_requested:
            if deadline is not None and time.monotonic() >= deadline:
                break
            self.poll_dl_notify()
            if self._native_dirty:
                self._sync_native()
            for hook in self.poll_hooks:
                hook()
            r = nl.run()
            if r == RC_INTERRUPTED and nl.wakeup_fd >= 0:
                with contextlib.suppress(OSError):
                    os.read(nl.wakeup_fd, 4096)      # signal bytes: the handlers have run by now
            if r == RC_STOP:
                self._regs_valid = nl.regs_valid
                try:
                    dispatch(nl.tid, nl.status)
                finally:
                    self._regs_valid = False
            elif r in (RC_HANDLER_FAILED, RC_FINISH, RC_NATIVE_FAULT):
                th = self.threads.get(nl.tid)
                if th is None:
                    continue
                th.stopped = True
                th.at_bp = True
                if r == RC_NATIVE_FAULT:      # a native program failed: its probe raises the recorded error
                    self.native_calls.raise_failure()
                    break
                if r == RC_HANDLER_FAILED:
                    err, self._cb_error = self._cb_error, None
                    if err is None:
                        break
                    raise err
                bp = th.proc.bps.get(self.v[P.RIP])
                if bp is not None:
                    try:
                        self.finish(th, bp.plan)
                    except P.PtraceError as e:
                        if e.errno != errno.ESRCH:
                            raise
                        th.stopped = th.at_bp = False   # killed meanwhile: its exit follows
            elif r < 0:
                if -r == errno.ECHILD:
                    break
                raise ProbeError(f"waitpid failed in the native loop: {os.strerror(-r)}")

    def _sync_native(self) -> None:
        """Mirror the breakpoint and thread tables into the C loop (after any change)."""
        f, main = self.filler, self.main
        self.nl.sync(main, exact_facts=f.exact_cpu and bool(f.needs & {"cpu", "ids"}),
                     uid_gid=f.uid_gid(main.tgid) if main is not None else (0, 0))
        self._native_dirty = False

    def dispatch(self, tid: int, status: int) -> None:
        th = self.threads.get(tid)
        if th is None:
            self._early[tid] = status
            return
        try:
            self._dispatch(th, status)
        except P.PtraceError as e:
            if e.errno != errno.ESRCH:
                raise
            # the thread was killed while we held it (exit_group, exec in another thread,
            # SIGKILL): it is not stopped any more and its exit is reported by waitpid
            th.stopped = th.at_bp = False

    def _dispatch(self, th: Thread, status: int) -> None:
        if (status & 0x7F) == 0x7F:          # stopped
            th.stopped = True
            sig = (status >> 8) & 0xFF
            ev = status >> 16
            if ev == 0:
                if sig == SIGTRAP and self.on_trap(th):   # a hit, or a function returned
                    return
                self.resume(th, sig)
            else:
                self.on_event(th, sig, ev)
        else:
            self.thread_gone(th, status)

    def resume(self, th: Thread, sig: int = 0) -> None:
        th.stopped = False
        P.cont_quiet(th.tid, sig)   # False: it vanished (SIGKILL, exec); its exit is reported

    # ------------------------------------------------------------------ hits
    # From "thread stopped at int3" to "program runs".  Two stop loops, one way to run programs:
    #
    #   C loop (native/hotloop.c run_loop)            Python loop (loop() above)
    #   1. waitpid: a SIGTRAP stop                    1. waitpid -> dispatch -> on_trap
    #   2. GETREGS into the pt_regs buffer            2. GETREGS (unless the C loop did)
    #   3. breakpoint at ip - 1 (its table, BP_FAST)  3. breakpoint at ip - 1 (proc.bps)
    #   4. ip = probe address                         4. ip = probe address (on_hit)
    #   5. a native-only program: called in C         5. run_entry_probes
    #      with its facts block; else _native_cb ->
    #      run_entry_probes
    #   then: run_entry_probes -> 6. HitFiller.fill -> 7. _call_probe: native program, handler
    #   8. return probes: hijack_return (Python only: the C loop hands such breakpoints back)
    #   9. finish the displaced instruction, SETREGS, CONT (apply_plan in C, finish() here)
    # Anything the C loop does not handle comes back to dispatch() with its wait status.

    def on_trap(self, th: Thread) -> bool:
        """A SIGTRAP stop: a hit of ours (handled, True) or the target's own trap (False)."""
        t0 = time.perf_counter_ns()
        if not self._regs_valid:                       # 2. registers
            try:
                self.regs.get(th.tid)
            except P.PtraceError:
                th.stopped = False      # killed meanwhile: its exit is reported by waitpid
                return True
        proc = th.proc
        owner = proc if proc.vfork_parent is None else proc.vfork_parent
        rip = self.v[P.RIP] - 1                        # 3. the int3 has run: ip - 1 is the breakpoint
        bp = owner.bps.get(rip)
        if not self._regs_valid and owner.scratch.guard is not None and (
                (bp is not None and bp.armed) or (rip == owner.scratch.tramp and rip)):
            P.set_rip(th.tid, rip)     # as the C loop's BP_REWIND: killed from here, it traps again
        if bp is not None and bp.armed:
            th.at_bp = True
            self.on_hit(th, bp, t0)
            return True
        if rip == owner.scratch.tramp and rip:        # a probed function returned (on_return)
            self.on_return(th, t0)
            return True
        return False

    def on_hit(self, th: Thread, bp: Breakpoint, t0: int) -> None:
        """Steps 4-9 of a hit at ``bp`` on the Python side (regs hold the thread's state)."""
        proc = th.proc
        bp.hits += 1
        if bp.internal is not None:                    # the dynamic linker's hook (dlopen/dlclose)
            bp.internal(th)
        if proc.run_handlers and bp.probes:
            self.v[P.RIP] = bp.addr                    # 4. programs see ip = probe address
            self.handler_ns += self.run_entry_probes(th, bp)     # 5.-7.
        if bp.ret_probes and (proc.run_handlers or proc.vfork_parent is None):
            self.hijack_return(th, bp)                 # 8.
        self.finish(th, bp.plan)                       # 9.
        self.total_hits += 1
        self.tracer_ns += time.perf_counter_ns() - t0

    def _native_cb(self, token: int, tid: int, cpu: int) -> int:
        """The C loop's call for a hit with Python handlers (steps 1-4 done in C: regs hold the
        thread's state, ip = probe address; ``cpu`` is the loop's CPU, the approximation).
        Returns 1 after an error (kept for loop_native to raise: the thread stays held at its
        breakpoint).  The C loop times the call as a whole, so its time is not added here."""
        try:
            self.run_entry_probes(self.threads[tid], self.nl.tokens[token], cpu)
            return 0
        except BaseException as e:
            self._cb_error = e
            return 1

    def run_entry_probes(self, th: Thread, bp: Breakpoint, cpu_hint: int = -1) -> int:
        """Run the entry probes of ``bp`` for ``th`` (regs hold its state, ip = bp.addr); both
        loops come here.  Returns the nanoseconds spent in programs and handlers."""
        f = self.filler
        f.cur_thread = th                              # for bpf_get_stack's unwinder
        f.cur_at_entry = bp.at_entry
        ns = 0
        # 6. the facts, read once per stop: the thread is held, they cannot change between its probes
        hit = f.fill(th.proc.tgid, th.tid, bp.addr, 0, False, cpu_hint)
        for p in bp.probes:
            hit.cookie = p.cookie
            ns += self._call_probe(p, hit)
        return ns

    def _call_probe(self, p: Probe, hit: HitContext) -> int:
        """7. Run one probe's native program and/or Python handler; count the hit and its time
        (returned in ns) for the probe."""
        h0 = time.perf_counter_ns()
        if p.native_fn:
            self.native_calls.run(p, hit)
        if p.handler is not None:
            p.handler(hit)
        dt = time.perf_counter_ns() - h0
        p.handler_ns += dt
        p.hits += 1
        return dt

    def finish(self, th: Thread, plan: O.Plan) -> None:
        """9. Complete the displaced instruction (emulate or go out of line) and resume the thread."""
        if not O.complete(plan, self.v, th.proc.tgid):
            return self._fault(th, plan)
        self.regs.set(th.tid)
        th.stopped = th.at_bp = False
        P.cont_quiet(th.tid, 0)
        return None

    def _fault(self, th: Thread, plan: O.Plan) -> None:
        """The emulated instruction would fault: deliver SIGSEGV at it, as the CPU would."""
        self.v[P.RIP] = plan.addr
        self.regs.set(th.tid)
        th.stopped = th.at_bp = False
        P.cont_quiet(th.tid, signal.SIGSEGV)

    # ------------------------------------------------------------------ returns
    def hijack_return(self, th: Thread, bp: Breakpoint) -> None:
        proc = th.proc
        tramp = proc.scratch.tramp
        sp = self.v[P.RSP]
        ret = P.vm_read_u64(proc.tgid, sp)
        if ret is None or not tramp:
            return
        sh = th.shadow
        chained = ret == tramp
        # the kernel's rule: at a call, entries at or below this stack slot belong to frames that
        # are gone (longjmp/exceptions); at a chained (tail) call the entry at this slot lives on
        for e in sh.drop_abandoned(sp if chained else sp + 1):
            self._log_drop(e)
        if len(sh.entries) >= MAX_DEPTH:
            return
        if chained:
            if not sh.entries:
                return
            ret = sh.entries[-1].orig_ret
        e = RetEntry(sp, ret, bp.addr, bp.ret_probes, chained=chained)
        if self.ret_log is not None:
            e.log_index = self.ret_log.add(proc.tgid, sp, ret, tramp)
        if not chained and not P.vm_write_u64(proc.tgid, sp, tramp):
            self._log_drop(e)
            return
        sh.entries.append(e)

    def _log_drop(self, e: RetEntry) -> None:
        if self.ret_log is not None and e.log_index >= 0:
            self.ret_log.remove(e.log_index)

    def on_return(self, th: Thread, t0: int) -> None:
        """A probed function returned through the trampoline: run its return probes, resume the
        thread at the real return address.  The guardian's records of the entries go only after
        the thread runs on: killed before that, the guardian must still know the return address
        (the trap guard waits for it to put it back into the stack slot)."""
        v = self.v
        proc = th.proc
        slot = (v[P.RSP] - 8) & O.M64
        sh = th.shadow
        for e in sh.drop_abandoned(slot):
            self._log_drop(e)
        if not sh.entries:
            raise ProbeError(f"thread {th.tid} returned through the trampoline with no pending return "
                             f"(rsp 0x{v[P.RSP]:x}): cannot recover its return address")
        filler = self.filler
        filler.cur_thread = th
        filler.cur_at_entry = False
        popped: list[RetEntry] = []
        while True:
            e = sh.entries.pop()
            popped.append(e)
            v[P.RIP] = e.orig_ret
            if proc.run_handlers and e.probes:
                try:
                    hit = filler.fill(proc.tgid, th.tid, e.func, 0, True)   # once per return, as above
                    for p in e.probes:
                        hit.cookie = p.cookie
                        self.handler_ns += self._call_probe(p, hit)
                except BaseException:
                    # the return went through the trampoline and its shadow entry is gone: put the
                    # thread at the real return address before the error ends tracing, or detaching
                    # would resume it inside the unmapped scratch page
                    while e.chained and sh.entries:
                        e = sh.entries.pop()
                        popped.append(e)
                    v[P.RIP] = e.orig_ret
                    with contextlib.suppress(P.PtraceError):
                        self.regs.set(th.tid)
                    for d in popped:
                        self._log_drop(d)
                    raise
            if not e.chained or not sh.entries:
                break
        v[P.RIP] = e.orig_ret
        self.regs.set(th.tid)
        th.stopped = False
        P.cont_quiet(th.tid, 0)
        for d in popped:
            self._log_drop(d)
        self.total_hits += 1
        self.tracer_ns += time.perf_counter_ns() - t0

    # ------------------------------------------------------------------ events
    def on_event(self, th: Thread, sig: int, ev: int) -> None:
        tid = th.tid
        if ev == P.PTRACE_EVENT_STOP:
            if sig in GROUP_STOP_SIGS:
                th.stopped = False
                P.listen(tid)       # group-stop: stay stopped until SIGCONT, like an untraced process
                return
            self.resume(th)
            return
        if ev == P.PTRACE_EVENT_CLONE:
            new = P.get_event_msg(tid)
            t = self.add_thread(th.proc, new, stopped=False)
            early = self._early.pop(new, None)
            if early is not None:
                self.dispatch(t.tid, early)
            self.resume(th)
            return
        if ev in (P.PTRACE_EVENT_FORK, P.PTRACE_EVENT_VFORK):
            child = P.get_event_msg(tid)
            self.on_fork(th, child, vfork=ev == P.PTRACE_EVENT_VFORK)
            self.resume(th)
            return
        if ev == P.PTRACE_EVENT_EXEC:
            self.on_exec(th)
            self.resume(th)
            return
        if ev == P.PTRACE_EVENT_EXIT and th.tid == th.proc.tgid and th.proc.no_clone:
            self.on_leader_exit(th)
            return
        self.resume(th)

    def on_leader_exit(self, th: Thread) -> None:
        """The traced leader of a process with untraced threads is exiting: the group ends, or an
        untraced thread execs (reported to nobody).  In the second case the new image is seized
        and armed like any exec (``UntracedThreads.catch_exec``)."""
        proc = th.proc
        execing = self.untraced.exec_under_way(proc)
        self.resume(th)
        if not execing:
            return
        st = self.untraced.catch_exec(proc.tgid)
        if st is None or (st & 0x7F) != 0x7F:
            if st is not None:
                self.thread_gone(th, st)
            return
        th.stopped = True
        th.dead = False
        if (st >> 16) == P.PTRACE_EVENT_EXEC:
            self.on_event(th, (st >> 8) & 0xFF, P.PTRACE_EVENT_EXEC)
            return
        self.on_exec(th)            # seized just after the exec's own stop: the same work now
        self.resume(th)

    def _wait_initial_stop(self, pid: int) -> int | None:
        """The first stop of an auto-attached child (it may already have been seen)."""
        st = self._early.pop(pid, None)
        if st is None:
            st = P.wait_tid(pid)
            if st is None:
                return None
        if (st & 0x7F) != 0x7F:
            return None
        return st

    def on_fork(self, th: Thread, child: int, vfork: bool) -> None:
        parent = th.proc
        if self._wait_initial_stop(child) is None:
            return
        if vfork:
            # the child borrows the parent's memory until it execs or exits: keep tracing it so
            # its hits run the displaced instructions; handlers only with follow_forks
            cp = Proc(child, parent.mem, parent.inj, parent.scratch, run_handlers=self.follow_forks,
                      vfork_parent=parent)
            self.procs[child] = cp
            ct = self.add_thread(cp, child, stopped=True)
            ct.shadow.entries = list(th.shadow.entries)
            self.resume(ct)
            return
        if self.follow_forks:
            cp = new_proc(child)
            cp.bps = {a: Breakpoint(bp.addr, bp.orig, bp.plan, list(bp.probes), list(bp.ret_probes),
                                    bp.internal, bp.armed, at_entry=bp.at_entry)
                      for a, bp in parent.bps.items()}
            cp.scratch.pages = list(parent.scratch.pages)
            cp.inj.stub = parent.inj.stub
            if parent.scratch.guard is not None:      # the child has the guard's copy and handler
                cp.scratch.guard = parent.scratch.guard.copy_for(cp.mem)
            cp.scratch.guard_tried = parent.scratch.guard_tried
            cp.semas = dict(parent.semas)
            cp.sema_done = set(parent.sema_done)
            on_arm = self.armer.on_arm
            if on_arm is not None:
                for bp in cp.bps.values():
                    on_arm(cp, bp.addr, bp.orig[0])
            if self.intarget is not None:
                self.intarget.follow_fork(parent, child, cp.mem)
            self.procs[child] = cp
            ct = self.add_thread(cp, child, stopped=True)
            ct.shadow.entries = [RetEntry(e.slot, e.orig_ret, e.func, e.probes, chained=e.chained)
                                 for e in th.shadow.entries]
            self.resume(ct)
            return
        # default: the child must not keep our breakpoints or trampolines
        try:
            mem = P.ProcMem(child)
        except OSError:
            P.detach(child)
            return
        try:
            clean_memory(mem, parent.bps.values(), th.shadow.entries, parent.scratch.tramp)
            release_semaphores(mem, parent.semas)
            if self.intarget is not None:
                self.regs.get(th.tid)
                self.intarget.clean_fork_child(parent, mem, self.v[P.FS_BASE])
            if parent.scratch.guard is not None:      # its SIGTRAP disposition back, too
                restore_child_disposition(parent, mem, child)
        finally:
            mem.close()
        P.detach(child)

    def on_exec(self, th: Thread) -> None:
        proc = th.proc
        old_tid = th.tid
        with contextlib.suppress(P.PtraceError):
            old_tid = P.get_event_msg(th.tid)
        if proc.vfork_parent is not None:
            # the vfork child left its parent's memory: nothing of ours in its new image
            self._drop_proc(proc)
            P.detach(th.tid)
            th.stopped = False
            return
        tgid = proc.tgid
        for t in list(proc.threads.values()):
            if t.tid != tgid:
                self.threads.pop(t.tid, None)
                proc.threads.pop(t.tid, None)
        if old_tid != tgid:
            self.threads.pop(old_tid, None)
        leader = proc.threads.get(tgid) or self.add_thread(proc, tgid, stopped=True)
        leader.stopped = True
        leader.shadow = ShadowStack()
        if proc.no_clone:           # the new image starts tracing every thread until armed again
            P.set_options(tgid, P.TRACE_OPTIONS)
            proc.no_clone = False
        for bp in proc.bps.values():
            bp.armed = False
        proc.bps.clear()
        proc.semas.clear()
        proc.sema_done.clear()
        proc.mem.close()
        proc.mem = P.ProcMem(tgid)
        proc.inj.mem = proc.mem
        proc.scratch.mem = proc.mem
        proc.scratch.forget()
        if self.ret_log is not None:
            self.ret_log.clear_pid(tgid)
        self.filler.forget_process(tgid)
        self._native_dirty = True
        if self.intarget is not None:
            self.intarget.forget(tgid)
        self.arm_all(proc)
        self.settle_clone_tracing()

    def thread_gone(self, th: Thread, status: int) -> None:
        proc = th.proc
        self._native_dirty = True
        self.threads.pop(th.tid, None)
        proc.threads.pop(th.tid, None)
        self.filler.forget_thread(th.tid)
        for e in th.shadow.entries:
            self._log_drop(e)
        if th.tid == proc.tgid:
            proc.exit_status = status
            if self.ret_log is not None and proc.vfork_parent is None:
                self.ret_log.clear_pid(proc.tgid)
            for t in list(proc.threads.values()):
                self.threads.pop(t.tid, None)
            proc.threads.clear()
            self._drop_proc(proc)

    def _drop_proc(self, proc: Proc) -> None:
        self.procs.pop(proc.tgid, None)
        for t in list(proc.threads.values()):
            self.threads.pop(t.tid, None)
        if proc.vfork_parent is None and proc is not self.main:
            proc.mem.close()

