"""Threads the tracer does not trace: new threads of a process whose probes all run in the target.

A probe that runs in the target needs no tracer per hit, and the runtime needs none per new
thread either (a thread finds its slot by FS base and reads its tid from the libc's TCB).
Tracing every thread anyway (``PTRACE_O_TRACECLONE``) costs two ptrace stops and a round trip
through the tracer per ``pthread_create`` (measured: benchmarks/thread_create.py).  So once
every probe of a process runs in the target and no int3 is armed in it (an int3 would kill an
untraced thread with SIGTRAP), its traced threads get ``NOCLONE_OPTIONS``: threads created
afterwards run untraced.  What still needs them all stopped (patching a late library's sites,
detach) seizes the untraced ones for that moment (``seize_untraced``) and lets them go again
(``release``).  A fork by an untraced thread is not seen: the child finds the in-target gate
closed (``intarget/space.py``) and runs no program.

The process goes back to tracing every thread (``settle``) as soon as it needs an int3
(a late library whose probe cannot run in the target): the untraced threads are seized for
good then.  ``UBPF_TRACE_NEW_THREADS=1`` keeps every thread traced (a switch for comparing
costs, not needed otherwise).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import threading
import time
from collections.abc import Callable

from ubpf_py.abi.runtime import DL_NOTIFY_SIGNAL
from ubpf_py.probe import ptrace as P
from ubpf_py.probe.procs import Proc, Thread


def untraced_allowed() -> bool:
    return os.environ.get("UBPF_TRACE_NEW_THREADS", "") in ("", "0")


class UntracedThreads:
    """Decides per process whether new threads are traced, and stops the untraced ones when the
    whole process must be stopped.  Shares the tracer's tables; ``add_thread(proc, tid, stopped)``
    registers a thread, ``stop_all()`` brings every registered thread to a stop (the restorer's)."""

    def __init__(self, threads: dict[int, Thread], add_thread: Callable[[Proc, int, bool], Thread],
                 stop_all: Callable[[], None], on_change: Callable[[], None]) -> None:
        self.threads = threads
        self.add_thread = add_thread
        self.stop_all = stop_all
        self.on_change = on_change
        self.enabled = untraced_allowed()

    @staticmethod
    def eligible(proc: Proc, intarget, follow_forks: bool) -> bool:
        """May ``proc`` run threads we do not trace?  Only if nothing in it needs a ptrace stop:
        no int3 armed (probes on the ptrace path, the dynamic linker's breakpoint), forks not
        followed (a followed child must be seen), and its in-target gate closes on fork."""
        if intarget is None or follow_forks or proc.vfork_parent is not None:
            return False
        if any(bp.armed for bp in proc.bps.values()):
            return False
        st = intarget.procs.get(proc.tgid)
        return st is None or (st.ready and st.rt.wipe_on_fork)

    def settle(self, proc: Proc, want: bool) -> None:
        """Switch ``proc`` to untraced new threads (``want``) or back to tracing all of them.
        Every traced thread of ``proc`` must be stopped."""
        want = want and self.enabled
        if want == proc.no_clone:
            return
        if not want:
            self.seize_untraced(proc)
            for t in proc.threads.values():          # kept for good: they may meet an int3 now
                t.temp = False
        opts = P.NOCLONE_OPTIONS if want else P.TRACE_OPTIONS
        for t in list(proc.threads.values()):
            if t.stopped and not t.dead:
                P.set_options(t.tid, opts)
        proc.no_clone = want

    def seize_untraced(self, proc: Proc) -> list[Thread]:
        """Seize and stop every thread of ``proc`` we do not trace, re-reading the task list until
        no new one appears (a running thread may create more); the traced ones are stopped too.
        Returns the threads seized (``temp``: ``release`` lets them go)."""
        if not proc.no_clone:
            return []
        seized: list[Thread] = []
        for _ in range(1000):
            new = [tid for tid in P.list_threads(proc.tgid) if tid not in self.threads]
            if not new:
                break
            for tid in new:
                try:
                    P.seize(tid, P.NOCLONE_OPTIONS)
                except P.PtraceError as e:
                    if e.errno == errno.ESRCH:      # it just exited
                        continue
                    raise
                t = self.add_thread(proc, tid, False)
                t.temp = True
                seized.append(t)
                P.interrupt(tid)
            self.stop_all()
        return seized

    def release(self, seized: list[Thread]) -> None:
        """Let go of threads ``seize_untraced`` took (stopped; a signal that stopped one meanwhile is
        handed back by the detach)."""
        for t in seized:
            if not t.temp or self.threads.get(t.tid) is not t:
                continue
            P.detach(t.tid, t.pending_sig)
            self.threads.pop(t.tid, None)
            t.proc.threads.pop(t.tid, None)
        self.on_change()

    @staticmethod
    def exec_under_way(proc: Proc) -> bool:
        """At the traced leader's exit stop: is another thread of ``proc`` waiting in an exec for the
        leader to go (state D in de_thread), rather than the group exiting?  Such an exec is
        reported to nobody (the exec'ing thread is not traced)."""
        for tid in P.list_threads(proc.tgid):
            if tid == proc.tgid:
                continue
            try:
                with open(f"/proc/{proc.tgid}/task/{tid}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            if stat[stat.rfind(b")") + 2:stat.rfind(b")") + 3] == b"D":
                return True
        return False

    @staticmethod
    def catch_exec(tgid: int, budget_s: float = 0.5) -> int | None:
        """The leader of ``tgid`` was let go from its exit stop while an untraced thread execs:
        seize the pid as soon as the exec'ing thread has taken it over (EPERM until then: the old
        leader is still ours).  Attached before the exec finishes, the next stop is its
        PTRACE_EVENT_EXEC; after, an interrupt stops it (the new image may have run a little).
        Returns that stop's wait status, or None (no exec after all, or it could not be seized).

        Why not seize the exec'ing thread itself while the leader is still held (no window at
        all)?  PTRACE_SEIZE takes the process's cred_guard_mutex, which the exec holds while it
        waits in de_thread for the leader to go: the tracer would block until the leader goes,
        and the leader goes only when the tracer lets it (tried: a deadlock)."""
        deadline = time.monotonic() + budget_s
        while True:
            try:
                P.seize(tgid, P.TRACE_OPTIONS)
                break
            except P.PtraceError as e:
                if e.errno == errno.ESRCH or time.monotonic() >= deadline:
                    return None
            time.sleep(0)
        stop_by = time.monotonic() + 0.02
        while True:
            try:
                pid, st = os.waitpid(tgid, P.WALL | os.WNOHANG)
            except ChildProcessError:
                return None
            if pid:
                return st
            if stop_by and time.monotonic() >= stop_by:
                P.interrupt(tgid)
                stop_by = 0
            time.sleep(0.0002)


class DlWaker:
    """Wakes the tracing (main) thread with SIGURG when a thread of the target waits in
    ``ubpf_dl_notify``.  The target sends SIGURG to the tracer itself, but only where it may
    signal it (same user, or root): a root tracer of another user's process is never woken that
    way, so this thread watches the shared request word every ``every`` seconds as well."""

    def __init__(self, tracer, every: float = 0.005) -> None:
        self.tracer = tracer
        self.every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="ubpf-dl-waker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _loop(self) -> None:
        main = threading.main_thread().ident
        while not self._stop.wait(self.every):
            eng = self.tracer.intarget
            if eng is not None and eng.dl_words is not None and eng.dl_pending():
                with contextlib.suppress(OSError, ValueError):
                    signal.pthread_kill(main, DL_NOTIFY_SIGNAL)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
