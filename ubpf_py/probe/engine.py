"""Public API of the probe engine: start or attach, add probes, run, detach.

    s = ProbeSession.launch(["./hello"], cwd=build_dir)     # stopped at exec, before main
    pid = s.add_probe("./hello", 0x1190, on_add)             # kernel-like (file, offset)
    rid = s.add_probe("./hello", 0x1190, on_ret, is_return=True)
    status = s.run()                                          # until exit / duration / Ctrl-C
    s.stats.hits[pid]

Handlers get the session's ``HitContext`` (``ubpf_py.vm.env``), updated in place
for every hit; ``hit.ctx_addr`` is the address of ``regs_buffer`` whose first
168 bytes are the kernel-layout ``struct pt_regs`` of the thread (ip = probe
address for entry probes, the return address for return probes, ax = return
value).  Handlers must not change the target except through
``hit.user_memory.write``.

The engine knows nothing about BPF: a handler is any callable.  Whoever runs
BPF programs registers ``regs_buffer`` as the context region of its memory map.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ubpf_py.abi.runtime import DL_NOTIFY_SIGNAL
from ubpf_py.errors import ProbeError, TargetError
from ubpf_py.probe import ptrace as P
from ubpf_py.probe.breakpoints import Probe, check_offset
from ubpf_py.probe.procs import Proc, new_proc
from ubpf_py.probe.tracer import Tracer
from ubpf_py.probe.untraced import DlWaker
from ubpf_py.vm.env import HitContext
from ubpf_py.vm.memory import HostBuffer

Handler = Callable[[HitContext], None]


@dataclass
class SessionStats:
    """Counters of a session.  ``tracer_ns`` is the time from a hit's stop reaching the tracer
    to the thread's resume (handlers included); ``handler_ns`` the part spent in handlers."""

    hits: dict[int, int] = field(default_factory=dict)
    handler_ns_by_probe: dict[int, int] = field(default_factory=dict)
    total_hits: int = 0
    tracer_ns: int = 0
    handler_ns: int = 0
    run_s: float = 0.0

    @property
    def per_hit_us(self) -> float:
        return self.tracer_ns / self.total_hits / 1000 if self.total_hits else 0.0

    @property
    def overhead_per_hit_us(self) -> float:
        """Tracer time per hit excluding handlers (the engine's own cost in the tracer)."""
        return (self.tracer_ns - self.handler_ns) / self.total_hits / 1000 if self.total_hits else 0.0


def _fileno(x) -> int | None:
    if x is None:
        return None
    return x if isinstance(x, int) else x.fileno()


class ProbeSession:
    """One traced process (and, with ``follow_forks``, its fork children)."""

    def __init__(self, *, follow_forks: bool = False, exact_cpu: bool = True,
                 native: bool | None = None) -> None:
        #: the pt_regs context: 216 bytes (user_regs_struct); programs see the first 168
        self.regs_buffer = HostBuffer(P.USER_REGS_SIZE)
        self._regs = P.RegsBuf(self.regs_buffer)
        self.tracer = Tracer(self._regs, follow_forks=follow_forks, exact_cpu=exact_cpu, native=native)
        self.pid = 0
        self._next_id = 1
        self._detached = False
        self._exit: int | None = None
        self._run_s = 0.0
        self._launched = False
        self._ran = False
        self.guardian = None

    # ------------------------------------------------------------------ start
    @classmethod
    def launch(cls, argv: Sequence[str], cwd: str | os.PathLike | None = None,
               env: dict[str, str] | None = None, *, stdin=None, stdout=None, stderr=None,
               follow_forks: bool = False, exact_cpu: bool = True, guardian: bool = False,
               native: bool | None = None) -> ProbeSession:
        """Start ``argv`` stopped right after its exec (before the dynamic linker and ``main``).

        ``native``: None = the C stop loop when available, else Python; True = require it;
        False = the pure-Python loop."""
        if not argv:
            raise TargetError("empty command line: give the program to run")
        self = cls(follow_forks=follow_forks, exact_cpu=exact_cpu, native=native)
        fds = (_fileno(stdin), _fileno(stdout), _fileno(stderr))
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:   # child: only async-signal-safe-ish work, then exec
            try:
                os.close(err_r)
                for i, fd in enumerate(fds):
                    if fd is not None and fd != i:
                        os.dup2(fd, i)
                if cwd is not None:
                    os.chdir(cwd)
                for s in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                    signal.signal(s, signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGSTOP)
                if env is None:
                    os.execvp(argv[0], list(argv))
                else:
                    os.execvpe(argv[0], list(argv), env)
            except OSError as e:
                os.write(err_w, str(e.errno).encode())
            finally:
                os._exit(127)
        os.close(err_w)
        try:
            _, st = os.waitpid(pid, os.WUNTRACED)
            if not os.WIFSTOPPED(st):
                raise TargetError(f"cannot start {argv[0]}: it exited before exec")
            P.seize(pid)
            os.kill(pid, signal.SIGCONT)
            while True:
                _, st = os.waitpid(pid, P.WALL)
                if os.WIFEXITED(st) or os.WIFSIGNALED(st):
                    msg = os.read(err_r, 64)
                    why = os.strerror(int(msg)) if msg else "it exited before exec"
                    raise TargetError(f"cannot run {argv[0]}: {why} (check the path and permissions)")
                sig, ev = P.stop_sig(st), P.stop_event(st)
                if ev == P.PTRACE_EVENT_EXEC:
                    break
                if ev == 0 and sig not in (signal.SIGCONT, signal.SIGSTOP):
                    P.cont(pid, sig)
                else:
                    P.cont(pid, 0)
        except BaseException:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except OSError:
                pass
            os.close(err_r)
            raise
        os.close(err_r)
        self.pid = pid
        proc = new_proc(pid)
        self.tracer.adopt_main(proc)
        self.tracer.add_thread(proc, pid, stopped=True)
        self._launched = True
        self.tracer.arm_all(proc)
        if guardian:
            self.start_guardian()
        return self

    @classmethod
    def attach(cls, pid: int, *, follow_forks: bool = False, exact_cpu: bool = True,
               guardian: bool = False, native: bool | None = None) -> ProbeSession:
        """Attach to running process ``pid`` and all its threads (they keep running between hits)."""
        if not os.path.exists(f"/proc/{pid}"):
            raise TargetError(f"no such process: pid {pid} (check the pid; it may have exited)")
        if pid == os.getpid():
            raise TargetError(f"pid {pid} is this process: ubpf-py cannot trace itself")
        tracer_pid = P.tracer_pid(pid)
        if tracer_pid:
            raise TargetError(f"pid {pid} is already traced by pid {tracer_pid} (a debugger?); detach it first")
        self = cls(follow_forks=follow_forks, exact_cpu=exact_cpu, native=native)
        self.pid = pid
        proc = new_proc(pid)
        tr = self.tracer
        tr.adopt_main(proc)
        seized: set[int] = set()
        try:
            while True:
                tids = [t for t in P.list_threads(pid) if t not in seized]
                if not tids:
                    break
                for tid in tids:
                    try:
                        P.seize(tid)
                    except P.PtraceError as e:
                        if e.errno == 3 and tid != pid:   # ESRCH: the thread just exited
                            continue
                        raise P.attach_error(pid, e.errno) from None
                    seized.add(tid)
                    tr.add_thread(proc, tid, stopped=False)
                    P.interrupt(tid)
            tr.restorer.stop_all()
        except BaseException:
            for tid in seized:
                P.detach(tid)
            raise
        self._launched = False
        tr.arm_all(proc)
        if guardian:
            self.start_guardian()
        return self

    def start_guardian(self) -> None:
        from ubpf_py.probe.guardian import Guardian
        self.guardian = Guardian.start(self.tracer)

    # ------------------------------------------------------------------ probes
    def add_probe(self, binary_path: str, file_offset: int, handler: Handler | None, *,
                  is_return: bool = False, cookie: int = 0, native_prog: int = 0,
                  native_facts: int = 0, native_status: int = 0,
                  native_error: Callable[[], None] | None = None,
                  ref_ctr_offset: int = 0, target_entry: int = 0,
                  target_reports_ids: frozenset[str] = frozenset()) -> int:
        """Attach ``handler`` at ``file_offset`` of ``binary_path``; armed in every mapping of that
        file now and whenever it is mapped later (dlopen, exec).  Returns the probe id.

        ``native_prog``: address of a native function ``uint64_t prog(uint64_t ctx)`` called with
        the pt_regs address on every hit (before ``handler``, which may then be None); with the
        native loop and no Python handler, hits of that probe never enter Python.
        ``native_facts``: address of five u64 the engine fills before each call of ``native_prog``
        (cpu, tgid << 32 | tid, gid << 32 | uid, func ip, cookie: layout in native/hotloop.c, the
        same as the JIT runtime block's fact slots). ``native_status``: address of a u64 that is
        non-zero after a failed call; the engine then stops (thread held at the breakpoint, so
        detaching leaves the target as it was) and calls ``native_error()``, which raises.
        Per-probe hit counts and program time of native-only hits are in ``stats``.
        ``ref_ctr_offset``: file offset of a USDT semaphore (u16) to increment while the probe is
        armed, like the kernel's uprobe ref_ctr_offset.
        ``target_entry``: the program's entry in the in-target image (``enable_in_target`` and
        ``load_in_target_image`` first): the site gets a jump into a trampoline that runs it in
        the target with no stop; where a site refuses (``in_target_reason``) the probe falls
        back to an int3 and ``handler``/``native_prog``.  ``target_reports_ids``: the ids the in-target
        program reports ("pid", "uid"): it stays on the ptrace path in a process of a child pid or
        user namespace (where the target sees other ids than the tracer and the kernel)."""
        if handler is None and not native_prog and not target_entry:
            raise ProbeError("add_probe needs a handler, a native_prog or a target_entry")
        if target_entry and self.tracer.intarget is None:
            raise ProbeError("add_probe(target_entry=...) needs enable_in_target() first")
        if self._detached:
            raise ProbeError("session is detached: start a new one")
        binary_path = os.fspath(binary_path)
        if binary_path == "/proc/self/exe":
            binary_path = f"/proc/{self.pid}/exe"
        check_offset(binary_path, file_offset)
        probe = Probe(self._next_id, binary_path, file_offset, handler, is_return, cookie & ((1 << 64) - 1),
                      native_fn=native_prog, ref_ctr_offset=ref_ctr_offset, native_facts=native_facts,
                      native_status=native_status, native_error=native_error, target_entry=target_entry,
                      target_reports_ids=target_reports_ids)
        self._next_id += 1
        tr = self.tracer
        tr.probes[probe.id] = probe
        try:
            for proc in list(tr.procs.values()):
                if proc.vfork_parent is None:
                    tr.arm_probe(proc, probe)
        except BaseException:
            del tr.probes[probe.id]
            raise
        return probe.id

    # ------------------------------------------------------------------ in-target execution
    def enable_in_target(self, arena_size: int | None = None):
        """Map the in-target runtime's private area and shared arena into the target (stopped
        before its main, or every thread stopped after attach); returns the arena, whose memory
        the tracer and the target share at one address (maps are allocated from it)."""
        from ubpf_py.intarget.process import InTargetEngine
        from ubpf_py.intarget.space import DEFAULT_ARENA_SIZE

        tr = self.tracer
        if tr.intarget is None:
            tr.intarget = InTargetEngine.create(tr.main, arena_size or DEFAULT_ARENA_SIZE)
            tr.intarget.on_patch = tr.on_patch
        return tr.intarget.arena

    def load_in_target_image(self, link: Callable[[int], bytes], code_size: int, printk_ring: int = 0) -> int:
        """Place code in the target: ``link(base)`` returns ``code_size`` bytes linked for ``base``;
        returns base.  Installed in every process that gets in-target probes (exec'd images too)."""
        from ubpf_py.intarget.space import reserve_image

        eng = self.tracer.intarget
        if eng is None:
            raise ProbeError("load_in_target_image needs enable_in_target() first")
        reserve_image(eng.plan, self.pid, code_size)
        code = link(eng.plan.image_addr)
        eng.set_image(code, eng.plan.image_addr, eng.plan.image_size, printk_ring)
        return eng.plan.image_addr

    def in_target_missed(self, probe_id: int) -> int:
        """In-target hits of probe ``probe_id`` whose program did not run (see PROBE_BLOCK.missed)."""
        eng = self.tracer.intarget
        return 0 if eng is None else eng.hits(probe_id)[1]

    def in_target_reason(self, probe_id: int) -> str | None:
        """Why probe ``probe_id`` (or one of its sites) runs on the ptrace path; None if it runs
        in the target everywhere (or was never meant to)."""
        eng = self.tracer.intarget
        return None if eng is None else eng.reasons.get(probe_id)

    @property
    def native_loop(self) -> bool:
        """Is the C stop loop in use (so hits of native-only probes never enter Python)?"""
        return self.tracer.nl is not None

    def add_poll(self, fn: Callable[[], None], interval_s: float = 0.05) -> None:
        """Call ``fn()`` between runs of the C loop: before each run and, while hits stay in C,
        after a hit once ``interval_s`` has passed (work such as draining ring buffers that
        native-only probes no longer do per hit).  Not called by the pure-Python loop."""
        tr = self.tracer
        tr.poll_hooks.append(fn)
        if tr.nl is not None:
            ns = int(interval_s * 1e9)
            tr.nl.set_poll(min(ns, tr.nl.poll_ns) if tr.nl.poll_ns else ns)

    @property
    def hit(self) -> HitContext:
        return self.tracer.filler.hit

    # ------------------------------------------------------------------ run
    def run(self, duration: float | None = None) -> int | None:
        """Handle probe hits until the target exits (returns its exit code, or -signal), the
        duration elapses or Ctrl-C/SIGTERM/SIGHUP arrives (then detaches and returns None)."""
        if self._detached:
            raise ProbeError("session is detached: start a new one")
        self._ran = True
        tr = self.tracer
        main = threading.current_thread() is threading.main_thread()
        old: dict[int, object] = {}
        deadline = None if duration is None else time.monotonic() + duration

        def on_signal(_signum, _frame):
            tr.request_stop()

        wake_r = wake_w = -1
        old_wakeup = -1
        dl_waker = None
        if main:
            for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGALRM):
                old[s] = signal.signal(s, on_signal)
            if tr.nl is not None:
                # the C loop polls this pipe: Python's own signal handler writes to it at once
                wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
                old_wakeup = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
                tr.nl.set_wakeup_fd(wake_r)
                # the in-target dlopen notification (runtime/dlnotify.c) wakes the loop with SIGURG
                # (sent by the target, and by dl_waker where the target may not signal us)
                old[DL_NOTIFY_SIGNAL] = signal.signal(DL_NOTIFY_SIGNAL, lambda _s, _f: None)
                tr.wakeup_ready = True
                dl_waker = DlWaker(tr)
                dl_waker.start()
            if duration is not None:
                signal.setitimer(signal.ITIMER_REAL, max(duration, 1e-3))
        t0 = time.monotonic()

        def restore() -> None:
            tr.wakeup_ready = False
            if dl_waker is not None:
                dl_waker.stop()
            self._run_s += time.monotonic() - t0
            self._restore_signals(main, old, duration)
            if wake_r >= 0:
                signal.set_wakeup_fd(old_wakeup)
                tr.nl.set_wakeup_fd(-1)
                os.close(wake_r)
                os.close(wake_w)

        try:
            tr.loop(deadline)
        except BaseException:
            restore()
            self._safe_detach()
            raise
        restore()
        main_proc = tr.main
        if main_proc is not None and main_proc.exit_status is not None:
            st = main_proc.exit_status
            self._exit = os.WEXITSTATUS(st) if os.WIFEXITED(st) else -os.WTERMSIG(st)
            self.detach()
            return self._exit
        self.detach()
        return None

    @staticmethod
    def _restore_signals(main: bool, old: dict, duration) -> None:
        if not main:
            return
        if duration is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
        for s, h in old.items():
            signal.signal(s, h)

    def _safe_detach(self) -> None:
        try:
            self.detach()
        except Exception:
            pass

    def detach(self) -> None:
        """Restore the target (bytes, return addresses, semaphores, scratch pages) and release all
        threads.  A launched target keeps running as our child (``wait()`` collects its status) --
        unless ``run()`` was never called: a command started for tracing that never got its probes
        (attaching failed) is killed rather than let run unobserved."""
        if self._detached:
            return
        self._detached = True
        try:
            if self._launched and not self._ran and self._exit is None:
                self.kill()
                return
            self.tracer.detach()
        finally:
            if self.guardian is not None:
                self.guardian.stop()

    def kill(self) -> None:
        """SIGKILL a launched target (still stopped before its main, or running) and reap it."""
        if not self._launched or self._exit is not None:
            return
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._detached = True
        self.tracer.threads.clear()
        self.tracer.restorer.close_all()
        st = P.reap_group(self.pid)
        if st is not None:
            self._exit = os.WEXITSTATUS(st) if os.WIFEXITED(st) else -os.WTERMSIG(st)

    def end_command(self, grace: float = 2.0) -> tuple[int | None, str]:
        """End a launched target that outlived the session: SIGTERM, then SIGKILL after ``grace``
        seconds.  Returns (its exit code or -signal, "terminated" / "killed" / "had exited");
        (None, "") when there is nothing to end (attached with --pid, or already collected)."""
        if not self._launched or self._exit is not None:
            return self._exit, "had exited" if self._exit is not None else ""
        if not self._detached:
            self.detach()
        how = "terminated"
        time.sleep(0.05)      # a signal it got while traced (a terminal Ctrl-C) may be ending it
        done = self._reap_nowait()
        if done is not None:
            return (None, "") if done is False else (self._exit, "had exited")
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            how = "had exited"
        deadline = time.monotonic() + grace
        while True:
            done = self._reap_nowait()
            if done is not None:
                return (None, "") if done is False else (self._exit, how)
            if time.monotonic() >= deadline and how != "killed":
                how = "killed"
                os.kill(self.pid, signal.SIGKILL)
            time.sleep(0.01)

    def _reap_nowait(self) -> bool | None:
        """Collect the launched target if it has ended: True (``_exit`` set), None (still running),
        False (not our child any more: collected elsewhere)."""
        try:
            p, st = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            return False
        if not p:
            return None
        self._exit = os.WEXITSTATUS(st) if os.WIFEXITED(st) else -os.WTERMSIG(st)
        return True

    def wait(self) -> int:
        """After detaching from a launched target: wait for it and return its exit code."""
        if self._exit is not None:
            return self._exit
        _, st = os.waitpid(self.pid, 0)
        self._exit = os.WEXITSTATUS(st) if os.WIFEXITED(st) else -os.WTERMSIG(st)
        return self._exit

    @property
    def stats(self) -> SessionStats:
        tr = self.tracer
        hits, tns, hns = tr.totals()
        def native(p: Probe, k: int) -> int:
            return p.native_counter[k] if p.native_counter is not None else 0

        def in_target(p: Probe) -> int:
            return tr.intarget.hits(p.id)[0] if tr.intarget is not None else 0

        return SessionStats(
            hits={i: p.hits + native(p, 0) + in_target(p) for i, p in tr.probes.items()},
            handler_ns_by_probe={i: p.handler_ns + native(p, 1) for i, p in tr.probes.items()},
            total_hits=hits, tracer_ns=tns, handler_ns=hns, run_s=self._run_s)

    def __enter__(self) -> ProbeSession:
        return self

    def __exit__(self, *exc) -> None:
        self._safe_detach()


__all__ = ["Handler", "ProbeSession", "Proc", "SessionStats"]
