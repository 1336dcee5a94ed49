"""The userspace backend behind ``ubpf_py.api``: ptrace probes, programs in this process.

Order matters and mirrors the kernel oracle: start (or seize) the target so it
is stopped before ``main``; set globals (``$PID`` needs the pid); load and
verify; attach every probe; let the target run; on exit, Ctrl-C, SIGTERM or an
error, detach (the probe engine restores the target).  Which engine path a
program takes on a hit is ``live.hitpath.hit_runner``'s choice.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from ubpf_py.abi.kernel import PT_REGS_SIZE
from ubpf_py.errors import UbpfError, UsageError
from ubpf_py.helpers.facts import facts_needed
from ubpf_py.live.attach import AttachRequest
from ubpf_py.live.collection import Collection
from ubpf_py.live.hitpath import (
    HitPlumbing,
    ProbeStats,
    add_native_poll,
    collect_native_stats,
    hit_runner,
    native_hits_wanted,
    poll_interval,
    settle_path,
    stats_report,
)
from ubpf_py.live.intarget import MODES, InTargetPlan, runtime_unavailable
from ubpf_py.live.intarget import prepare as prepare_in_target
from ubpf_py.live.pump import EventSink, OutputPump
from ubpf_py.live.sites import resolve_sites, usdt_specs_for
from ubpf_py.obj.spec import ObjectSpec
from ubpf_py.output.values import ValueDecoder
from ubpf_py.vm.budget import DEFAULT_BUDGET
from ubpf_py.vm.memory import Region

#: the interval timer thread wakes the tracing thread with this signal (see ``UserspaceBackend.run``)
TICK_SIGNAL = signal.SIGUSR2


class MapsSnapshot:
    """The target's /proc/PID/maps, taken at the first probe hit (libraries are mapped by then)
    so addresses can be symbolised after the target has gone."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.maps: list[Any] = []
        self.take()

    def take(self) -> None:
        from ubpf_py.probe.procmaps import read_maps

        with contextlib.suppress(OSError, UbpfError):
            self.maps = read_maps(self.pid)

    def as_json(self) -> list[dict]:
        return [{"start": hex(m.start), "end": hex(m.end), "perms": m.perms, "offset": hex(m.offset),
                 "path": m.path} for m in self.maps]


class UserspaceBackend:
    """One object traced in one process through ptrace."""

    name = "userspace"

    def __init__(self, spec: ObjectSpec) -> None:
        self.spec = spec
        self.session: Any = None
        self.coll: Collection | None = None
        self.pump: OutputPump | None = None
        self.plumbing: HitPlumbing | None = None
        self.stats: list[ProbeStats] = []
        self.maps_seen: MapsSnapshot | None = None
        self._usdt: Any = None
        self._native_poll = False
        self._engine = "jit"
        self._native_allowed = True
        self._mode = "auto"
        self.in_target: InTargetPlan | None = None

    # ---- target ------------------------------------------------------------------------
    def launch(self, argv: list[str], *, follow_forks: bool = False, stdout: Any = None) -> int:
        from ubpf_py.probe.engine import ProbeSession

        self.session = ProbeSession.launch(argv, follow_forks=follow_forks, stdout=stdout, guardian=_guardian())
        return self.session.pid

    def attach_pid(self, pid: int, *, follow_forks: bool = False) -> int:
        from ubpf_py.probe.engine import ProbeSession

        self.session = ProbeSession.attach(pid, follow_forks=follow_forks, guardian=_guardian())
        return pid

    # ---- load --------------------------------------------------------------------------
    def load(self, *, engine: str, verifier: str, check_memory: bool, native_hits: bool,
             programs: list[str] | None, sink: EventSink, event_type_id: int, mode: str = "auto",
             budget: int | None = None, exact_facts: bool = True,
             core_binaries: list[str] | None = None) -> Collection:
        """Load the programs; with ``mode`` auto/intarget the maps live in memory shared with the
        target and eligible programs are compiled into an image inside it (``live.intarget``).
        ``exact_facts``: per-hit CPU, uid/gid and comm read from /proc at each hit (only those the
        programs use); False keeps the approximation (``--approx-facts``).  ``core_binaries``: the
        binaries whose own types (.BTF or DWARF) CO-RE relocations of userspace types resolve
        against before the kernel's (default: the target's executable)."""
        if mode not in MODES:
            raise UsageError(f"unknown mode {mode!r}: use one of {', '.join(MODES)}")
        no_target = runtime_unavailable(mode, engine)
        if no_target is not None and mode == "intarget":
            raise UsageError(f"--mode intarget: {no_target}")
        arena = self.session.enable_in_target() if no_target is None else None
        wanted_specs = list(programs) if programs is not None else list(self.spec.programs)
        coll = Collection.load(self.spec, engine=engine, verifier=verifier, programs=programs,
                               check_memory=check_memory, arena=arena,
                               budget=DEFAULT_BUDGET if budget is None else budget,
                               target_btf=self._core_targets(wanted_specs, core_binaries))
        wanted = list(programs) if programs is not None else list(coll.programs)
        filler = self.session.tracer.filler
        filler.exact_cpu = exact_facts
        filler.needs = facts_needed([self.spec.programs[n] for n in coll.programs], self.spec.maps)
        if arena is not None:
            self.in_target = prepare_in_target(self.session, coll, wanted, verifier=verifier)
        else:
            self.in_target = InTargetPlan(reasons=dict.fromkeys(wanted, no_target))
        if mode == "intarget" and self.in_target.reasons:
            name, why = next(iter(self.in_target.reasons.items()))
            raise UsageError(f"--mode intarget: program {name} cannot run in the target: {why}")
        self.coll = coll
        self._engine, self._native_allowed, self._mode = engine, native_hits, mode
        self.pump = OutputPump(sink, coll, decoder=ValueDecoder(self.spec.btf), event_type_id=event_type_id)
        coll.env.printk = self.pump.printk
        self.pump.printk_ring = self.in_target.printk_ring
        return coll

    def _core_targets(self, programs: list[str], binaries: list[str] | None) -> Any:
        """CO-RE targets: the traced binaries' own types (BTF or DWARF), then the kernel's
        (``obj.core_targets``); None (the default targets) when no program relocates."""
        if not any(self.spec.programs[n].core_relocs for n in programs if n in self.spec.programs):
            return None
        from ubpf_py.obj.core_targets import core_targets
        from ubpf_py.probe import resolve

        pid = self.session.pid
        paths = []
        for binary in binaries if binaries is not None else ["/proc/self/exe"]:
            with contextlib.suppress(UbpfError, OSError):
                paths.append(resolve.resolve_binary(binary, pid=pid))
        return core_targets(paths)

    def resolve_context(self) -> tuple[int | None, str | None, str | None]:
        """(pid, cwd, exe) binary names of attach points are resolved with (``live.attach.expand_multi``)."""
        return (self.session.pid if self.session is not None else None), None, None

    def _ready(self) -> tuple[Any, Collection, HitPlumbing]:
        """Join the loaded collection and the target (first attach)."""
        if self.session is None or self.coll is None:
            raise UbpfError("attach needs a loaded object and a target (launch or attach a pid first)")
        if self.plumbing is None:
            self.coll.env.hit = self.session.hit  # the engine updates this one object in place per hit
            _register_ctx(self.coll.env.memory, self.session.regs_buffer)
            self.maps_seen = MapsSnapshot(self.session.pid)
            self.plumbing = HitPlumbing(self.pump, self.maps_seen.take,
                                        native_hits_wanted(self._engine, self._native_allowed, self.session),
                                        in_target=self.in_target)
        return self.session, self.coll, self.plumbing

    # ---- attach ------------------------------------------------------------------------
    def attach(self, req: AttachRequest) -> tuple[ProbeStats, str]:
        session, coll, plumbing = self._ready()
        prog = coll.program(req.program)
        st = ProbeStats(req)

        def usdt_specs() -> Any:
            if self._usdt is None:
                self._usdt = usdt_specs_for(coll.maps, self.spec.btf)
            return self._usdt

        sites, detail = resolve_sites(req, session.pid, usdt_specs)
        for site in sites:
            st.probe_ids.append(session.add_probe(site.path, site.offset, is_return=site.retprobe,
                                                  cookie=site.cookie, ref_ctr_offset=site.ref_ctr_offset,
                                                  **hit_runner(prog, st, plumbing)))
        settle_path(session, st)
        if st.path == "ptrace" and st.target_entry and self._mode == "intarget":
            raise UsageError(f"--mode intarget: {req.program} on {req.describe()} cannot run in the target: "
                             f"{st.path_reason}")
        self.stats.append(st)
        if st.native and not self._native_poll:
            self._native_poll = True
            add_native_poll(session, list(coll.programs.values()), plumbing)
        return st, detail

    # ---- run ---------------------------------------------------------------------------
    def run(self, duration: float | None, tick: Callable[[], None] | None = None,
            tick_every: float | None = None) -> int | None:
        """Trace until the target exits (its status; -signal when killed), ``duration`` passes or
        Ctrl-C/SIGTERM (None).  ``tick`` runs about every ``tick_every`` seconds at a point where
        no program is running: after a Python-path hit, in the C loop's poll hook, or (idle
        Python loop) from the wake-up signal's handler."""
        session, _coll, plumbing = self._ready()
        waker = None
        old = None
        tick, tick_every = self._with_in_target_drain(tick, tick_every)
        if tick is not None and tick_every:
            state = {"next": time.monotonic() + tick_every, "in_tick": False}

            def guarded_tick() -> None:
                """Time-gated, never re-entered, never inside a running program."""
                if time.monotonic() < state["next"] or state["in_tick"] or plumbing.in_program:
                    return
                state["in_tick"] = True
                try:
                    tick()
                finally:
                    state["next"] = time.monotonic() + tick_every
                    state["in_tick"] = False

            plumbing.after_hit.append(guarded_tick)
            if session.native_loop:
                session.add_poll(guarded_tick, tick_every)
            if threading.current_thread() is threading.main_thread():
                # the C loop wakes on any handled signal (wakeup fd) and then runs its poll hooks;
                # the Python loop runs the handler itself (in_program keeps it out of programs)
                old = signal.signal(TICK_SIGNAL, (lambda s, f: None) if session.native_loop
                                    else (lambda s, f: guarded_tick()))
                waker = _Waker(tick_every)
                waker.start()
            # off the main thread (no signals there): ticks come with hits and C-loop polls only
        try:
            return session.run(duration=duration)
        finally:
            if waker is not None:
                waker.stop()
                signal.signal(TICK_SIGNAL, old)
            if self.pump is not None:
                self.pump.drain()
            self.detach()

    def _with_in_target_drain(self, tick: Callable[[], None] | None,
                              every: float | None) -> tuple[Callable[[], None] | None, float | None]:
        """Hits of in-target probes never stop the target, so nothing would wake the tracer to
        print what they write: drain ring/perf buffers (and printk records) on a timer too."""
        pump = self.pump
        if pump is None or not any(st.path == "in-target" for st in self.stats):
            return tick, every
        if not pump.has_buffers:
            return tick, every
        drain_every = poll_interval(pump)
        due = [time.monotonic() + (every or 0)]

        def drain_and_tick() -> None:
            pump.drain()
            if tick is not None and every and time.monotonic() >= due[0]:
                due[0] = time.monotonic() + every
                tick()

        return drain_and_tick, min(every or drain_every, drain_every)

    def drain(self) -> None:
        if self.pump is not None:
            self.pump.drain()

    def report_lost(self) -> None:
        if self.pump is not None:
            self.pump.report_lost()

    # ---- inspect -----------------------------------------------------------------------
    def raw_maps(self) -> dict[str, Any]:
        return self.coll.maps if self.coll is not None else {}

    def symbolizer(self) -> Any:
        from ubpf_py.output.symbolize import Symbolizer

        maps = self.maps_seen.maps if self.maps_seen is not None else []
        return Symbolizer(maps) if maps else None

    def proc_maps(self) -> list[dict]:
        return self.maps_seen.as_json() if self.maps_seen is not None else []

    def stats_report(self) -> dict:
        if self.session is not None:
            collect_native_stats(self.session, self.stats)
        return stats_report(self.stats)

    def detach(self) -> None:
        if self.session is not None:
            with contextlib.suppress(UbpfError, OSError):
                self.session.detach()

    def end_command(self, grace: float) -> tuple[int | None, str]:
        """End a launched command that outlived the session (``ProbeSession.end_command``)."""
        if self.session is None:
            return None, ""
        return self.session.end_command(grace)

    def close(self) -> None:
        """Detach, then free the arena the maps lived in (maps are unreadable afterwards)."""
        self.detach()
        eng = self.session.tracer.intarget if self.session is not None else None
        if eng is not None:
            eng.close()


class _Waker:
    """A thread that sends TICK_SIGNAL to the main thread every ``every`` seconds: the tracing
    thread may be blocked in waitpid or in the C loop, and a signal is what wakes both."""

    def __init__(self, every: float) -> None:
        self.every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="ubpf-interval", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _loop(self) -> None:
        main = threading.main_thread().ident
        while not self._stop.wait(self.every):
            with contextlib.suppress(OSError, ValueError):
                signal.pthread_kill(main, TICK_SIGNAL)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _guardian() -> bool:
    """A guardian process puts the target back if this tracer is killed (kill -9): on by default,
    ``UBPF_GUARDIAN=0`` turns it off."""
    import os

    return os.environ.get("UBPF_GUARDIAN", "1") != "0"


def _register_ctx(memory: Any, buf: Any) -> None:
    """Let programs read the probe engine's pt_regs buffer (read-only, the first 168 bytes)."""
    if memory.find(buf.addr, PT_REGS_SIZE) is None:
        memory.add(Region.of(buf, "context (struct pt_regs)", writable=False, size=PT_REGS_SIZE))
