"""How a program runs when its probe is hit (userspace backend).

:func:`hit_runner` is the one place that decides it, per attached program:

* **native**: an eligible JIT program is called straight from the C stop loop
  (no Python per hit); buffers are drained and JIT region tables refreshed by a
  poll hook between runs of the loop (:func:`add_native_poll`);
* **python**: the tracer calls :func:`make_handler`'s closure, which runs the
  program on the engine's pt_regs buffer and then does the per-hit chores.

A new way of running programs (say, inside the target) is one more branch of
``hit_runner`` returning the ``ProbeSession.add_probe`` arguments it needs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ubpf_py.live.attach import AttachRequest
from ubpf_py.live.collection import LoadedProgram
from ubpf_py.live.pump import OutputPump
from ubpf_py.vm.env import HitContext


@dataclass
class ProbeStats:
    """Per attachment: hits and time spent running the program."""

    request: AttachRequest
    hits: int = 0
    prog_ns: int = 0
    #: the program runs from the C stop loop (engine counters hold hits and time)
    native: bool = False
    probe_ids: list[int] = field(default_factory=list)
    #: the program's entry in the in-target image (0: it runs in the tracer) and why not
    target_entry: int = 0
    reason: str = ""
    #: after attaching: "in-target" or "ptrace", and why not in the target
    path: str = ""
    path_reason: str = ""
    #: in-target hits whose program did not run (the thread was already inside a program:
    #: a signal handler; or the thread table was full), as the kernel's recursion guard counts them
    missed: int = 0


@dataclass
class HitPlumbing:
    """What the hit paths of one session share."""

    pump: OutputPump
    #: called once, at the first hit (takes the target's memory map for symbolising)
    on_first_hit: Callable[[], None]
    #: may programs run from the C stop loop?
    native: bool = False
    #: region-table refreshers of programs running natively (see ``make_handler``)
    native_syncs: list[Callable[[], None]] = field(default_factory=list)
    #: called after every Python-path hit and every poll of the C loop (interval printing)
    after_hit: list[Callable[[], None]] = field(default_factory=list)
    first_hit_done: bool = False
    #: a program is running on the Python path (signal handlers must not touch maps then)
    in_program: bool = False
    #: which programs run inside the target (``live.intarget``); None: none do
    in_target: Any = None

    def first_hit(self) -> None:
        if not self.first_hit_done:
            self.first_hit_done = True
            self.on_first_hit()


def native_hits_wanted(engine: str, allowed: bool, session: Any) -> bool:
    """Native hits need the JIT, the C stop loop and no opt-out (``UBPF_NATIVE_HITS=0``)."""
    if not allowed or os.environ.get("UBPF_NATIVE_HITS", "1") == "0":
        return False
    return engine == "jit" and bool(getattr(session, "native_loop", False))


def hit_runner(prog: LoadedProgram, st: ProbeStats, plumbing: HitPlumbing) -> dict[str, Any]:
    """How ``prog`` runs on a hit: the ``ProbeSession.add_probe`` keyword arguments.

    Inside the target (``target_entry``: a patched jump, no stop) when the in-target plan has
    the program; besides, for sites that refuse a jump, the program's native entry from the
    C stop loop (no Python per hit) when it is eligible, else the Python handler."""
    kw = _tracer_runner(prog, st, plumbing)
    plan = plumbing.in_target
    if plan is not None:
        st.target_entry = plan.entry(prog.name)
        st.reason = plan.reasons.get(prog.name, "")
        kw["target_entry"] = st.target_entry
        if st.target_entry:
            from ubpf_py.live.intarget import reported_ids

            kw["target_reports_ids"] = reported_ids(prog)
    return kw


def _tracer_runner(prog: LoadedProgram, st: ProbeStats, plumbing: HitPlumbing) -> dict[str, Any]:
    ex = prog.executable
    if plumbing.native and hasattr(ex, "native_entry") and ex.native_ineligible() is None:
        st.native = True
        if ex.native_sync not in plumbing.native_syncs:
            plumbing.native_syncs.append(ex.native_sync)
        return {"handler": None, "native_prog": ex.native_entry(), "native_facts": ex.native_facts_addr,
                "native_status": ex.native_status_addr, "native_error": ex.raise_native_fault}
    return {"handler": make_handler(prog, st, plumbing)}


def make_handler(prog: LoadedProgram, st: ProbeStats, plumbing: HitPlumbing) -> Callable[[HitContext], None]:
    """The per-hit callback: run the program on the engine's pt_regs, move its output.
    Programs running from the C loop may see map storage grow (new memory regions) when a
    Python-run program inserts, so their region tables are refreshed after it."""
    clock = time.perf_counter_ns
    run = prog.run
    pump = plumbing.pump
    drain = pump.drain if pump.has_buffers else None
    syncs = plumbing.native_syncs
    after = plumbing.after_hit

    def handler(hit: HitContext) -> None:
        if not plumbing.first_hit_done:
            plumbing.first_hit()
        plumbing.in_program = True
        t0 = clock()
        run(hit.ctx_addr)
        st.prog_ns += clock() - t0
        plumbing.in_program = False
        st.hits += 1
        if drain is not None:
            drain()
        for sync in syncs:
            sync()
        for fn in after:
            fn()

    return handler


def add_native_poll(session: Any, programs: list[LoadedProgram], plumbing: HitPlumbing) -> None:
    """Work the per-hit Python handler does, done between runs of the C loop instead: keep the
    JIT region tables current, take the maps snapshot, drain ring/perf buffers."""
    syncs = [lp.executable.native_sync for lp in programs if hasattr(lp.executable, "native_sync")]
    pump = plumbing.pump
    drain = pump.drain if pump.has_buffers else None

    def poll() -> None:
        for s in syncs:
            s()
        if not plumbing.first_hit_done and session.stats.total_hits:
            plumbing.first_hit()
        if drain is not None:
            drain()
        for fn in plumbing.after_hit:
            fn()

    session.add_poll(poll, poll_interval(pump))


def poll_interval(pump: OutputPump) -> float:
    """50 ms, shorter for small ring/perf buffers so they are drained before they fill at the
    C loop's hit rate (about one hit per 15 us): 50 ms per 256 KiB of the smallest, >= 1 ms."""
    sizes = [m.spec.max_entries for m in pump.ringbufs]
    sizes += [64 * 1024 for _ in pump.perfbufs]       # perf buffers: a few pages per CPU
    if not sizes:
        return 0.05
    return max(0.001, min(0.05, 0.05 * min(sizes) / (256 * 1024)))


def settle_path(session: Any, st: ProbeStats) -> None:
    """After attaching: which path the probe's hits take, and why not in the target (a program
    reason, or a site the in-target engine refused and armed with an int3 instead)."""
    site_reason = next((r for i in st.probe_ids if (r := session.in_target_reason(i))), None)
    if st.target_entry and site_reason is None:
        st.path, st.path_reason = "in-target", ""
    else:
        st.path, st.path_reason = "ptrace", st.reason or site_reason or ""


def collect_native_stats(session: Any, stats: list[ProbeStats]) -> None:
    """Hits and program time of native and in-target probes come from the engine's counters."""
    st_all = session.stats
    for st in stats:
        if st.native or st.path == "in-target":
            st.hits = sum(st_all.hits.get(i, 0) for i in st.probe_ids)
            st.prog_ns = sum(st_all.handler_ns_by_probe.get(i, 0) for i in st.probe_ids)
        if st.path == "in-target":
            st.missed = sum(session.in_target_missed(i) for i in st.probe_ids)


def stats_report(stats: list[ProbeStats]) -> dict:
    rows = []
    lines = []
    for st in stats:
        per_hit = st.prog_ns / st.hits if st.hits else 0.0
        rows.append({"program": st.request.program, "target": st.request.describe(), "hits": st.hits,
                     "program_ns": st.prog_ns, "program_ns_per_hit": per_hit, "path": st.path,
                     "path_reason": st.path_reason, "missed": st.missed})
        if st.path == "in-target":    # programs are not timed in the target (a clock read per hit)
            lines.append(f"{st.request.program} on {st.request.describe()}: {st.hits} hits in the target"
                         + (f", {st.missed} missed (a program was already running on that thread, or no CPU id came free)"
                            if st.missed else ""))
            continue
        lines.append(f"{st.request.program} on {st.request.describe()}: {st.hits} hits through ptrace "
                     f"({st.path_reason or 'chosen'}), {st.prog_ns / 1e6:.3f} ms in the program "
                     f"({per_hit:.0f} ns/hit)")
    return {"probes": rows, "lines": lines}
