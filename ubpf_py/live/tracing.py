"""The userspace backend of ``ubpf-run``: load, attach through ptrace, run, report.

Order matters and mirrors the kernel oracle: start (or seize) the target so it
is stopped before ``main``; set globals (``$PID`` needs the pid); load and
verify; attach every planned probe; let the target run; on exit, Ctrl-C,
SIGTERM or an error, detach (the probe engine restores the target) and print
the maps and globals.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from ubpf_py.errors import SymbolError, TargetError, UbpfError, UsageError
from ubpf_py.helpers.facts import facts_needed
from ubpf_py.live.attach import AttachRequest, expand_multi, parse_attach_option, plan_attachments
from ubpf_py.live.collection import Collection, LoadedProgram
from ubpf_py.live.loader_opts import apply_loader_options, fill_cgroup_maps
from ubpf_py.output.dump import snapshot_globals, snapshot_map
from ubpf_py.output.records import decode_record, event_type_id
from ubpf_py.output.values import ValueDecoder
from ubpf_py.output.writers import Writer, make_writer
from ubpf_py.vm.env import HitContext
from ubpf_py.vm.memory import Region

PT_REGS_SIZE = 168
USDT_SPECS_MAP = "__bpf_usdt_specs"
USDT_IP_MAP = "__bpf_usdt_ip_to_spec_id"


def parse_set_value(text: str, pid: int | None) -> int | str:
    """``--set`` values: integers (any base), ``$PID``, otherwise a string."""
    if text == "$PID":
        if pid is None:
            raise UsageError("--set ...=$PID needs a traced process")
        return pid
    try:
        return int(text, 0)
    except ValueError:
        return text


@dataclass
class ProbeStats:
    """Per attachment: hits and time spent running the program."""

    request: AttachRequest
    hits: int = 0
    prog_ns: int = 0
    #: the program runs from the C stop loop (engine counters hold hits and time)
    native: bool = False
    probe_ids: list[int] = field(default_factory=list)


@dataclass
class OutputPump:
    """Moves program output (printk, ring buffers, perf buffers) to the writer."""

    writer: Writer
    collection: Collection
    ringbufs: list[Any] = field(default_factory=list)
    perfbufs: list[Any] = field(default_factory=list)
    decoder: ValueDecoder | None = None
    event_type_id: int = 0
    reported_lost: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for m in self.collection.map_list:
            if m.spec.type_name == "ringbuf":
                self.ringbufs.append(m)
            elif m.spec.type_name == "perf_event_array":
                self.perfbufs.append(m)
        #: each perf buffer's sample count at the last drain (new samples -> something to read)
        self.perf_seen = [m.samples for m in self.perfbufs]

    def printk(self, hit: HitContext, message: str) -> None:
        comm = hit.comm.decode(errors="replace") if isinstance(hit.comm, bytes) else str(hit.comm)
        self.writer.printk(comm, hit.tgid, hit.tid, hit.cpu, time.monotonic_ns(), message)

    def drain(self) -> None:
        """Print what the programs wrote.  Called after every hit on the Python path, so an
        empty buffer costs one integer comparison and builds nothing."""
        for m in self.ringbufs:
            if m.avail():
                for data in m.records():
                    self.writer.record("ringbuf", m.spec.name, None, bytes(data), self._fields(data))
        for i, m in enumerate(self.perfbufs):
            if m.samples != self.perf_seen[i]:
                self.perf_seen[i] = m.samples
                for cpu, data in m.consume():
                    self.writer.record("perfbuf", m.spec.name, cpu, bytes(data), self._fields(data, perf=True))

    def _fields(self, data: bytes, perf: bool = False) -> Any:
        return decode_record(self.decoder, self.collection.spec.path, self.event_type_id, data, perf)

    def report_lost(self) -> None:
        for m in self.ringbufs + self.perfbufs:
            lost = int(getattr(m, "dropped", 0) or getattr(m, "lost", 0) or 0)
            if lost:
                kind = "ringbuf" if m in self.ringbufs else "perfbuf"
                self.writer.lost(kind, m.spec.name, lost)


def _core_targets(spec: Any, programs: list[str], plan: list[AttachRequest], pid: int) -> Any:
    """CO-RE targets: the traced binaries' own types (BTF or DWARF), then the kernel's
    (``obj.core_targets``); None (the default targets) when no program relocates."""
    if not any(spec.programs[n].core_relocs for n in programs):
        return None
    from ubpf_py.obj.core_targets import core_targets
    from ubpf_py.probe import resolve

    paths = []
    for req in plan:
        if req.binary:
            with contextlib.suppress(UbpfError):
                paths.append(resolve.resolve_binary(req.binary, pid=pid))
    return core_targets(paths)


def _user_map(coll: Collection, name: str) -> Any:
    m = coll.maps.get(name)
    if m is None:
        raise UsageError(f"the object has no map {name!r} (maps: {', '.join(coll.maps)})")
    return m


def run_userspace(args: argparse.Namespace) -> int:
    """Entry point for the userspace backend (called by the CLI)."""
    from ubpf_py.obj.elf import load_object
    from ubpf_py.obj.globals import set_global
    from ubpf_py.probe.engine import ProbeSession

    if args.pid is not None and not os.path.exists(f"/proc/{args.pid}"):
        raise TargetError(f"no such process: pid {args.pid} (check the pid; it may have exited)")
    spec = load_object(args.object)
    explicit = [parse_attach_option(a, spec) for a in args.attach]
    apply_loader_options(spec, args.map_size, args.no_autoload, {r.program for r in explicit})
    plan = plan_attachments(spec, explicit, auto=not args.no_auto)
    if not plan:
        raise UsageError(f"{args.object}: nothing to attach: no program names its target in its section "
                         f"and no --attach was given (programs: {', '.join(spec.programs)})")

    out = open(args.output, "w") if args.output else None  # noqa: SIM115 - closed in finally
    session = None
    exact = not getattr(args, "approx_facts", False)
    try:
        if args.command:
            session = ProbeSession.launch(args.command, follow_forks=args.follow_forks, exact_cpu=exact)
        else:
            session = ProbeSession.attach(args.pid, follow_forks=args.follow_forks, exact_cpu=exact)
        pid = session.pid
        for item in args.set:
            name, _, value = item.partition("=")
            set_global(spec, name, parse_set_value(value, pid))

        programs = sorted({r.program for r in plan})
        coll = Collection.load(spec, engine=args.engine, verifier=args.verifier, programs=programs,
                               check_memory=not args.no_memory_checks,
                               target_btf=_core_targets(spec, programs, plan, pid))
        if args.verifier_log:
            for lp in coll.programs.values():
                if lp.report is not None and lp.report.log:
                    print(lp.report.log.rstrip(), file=sys.stderr)
        decoder = ValueDecoder(spec.btf)
        writer = make_writer(args.format, out, decoder)
        pump = OutputPump(writer, coll, decoder=decoder,
                          event_type_id=_event_type_id(spec, args.event_type))
        coll.env.printk = pump.printk
        fill_cgroup_maps(args.cgroup_map, lambda m, i, fd: _user_map(coll, m).update(
            i.to_bytes(4, "little"), fd.to_bytes(4, "little")))
        coll.env.hit = session.hit  # the engine updates this one object in place on every hit
        session.tracer.filler.needs = facts_needed([spec.programs[n] for n in programs], spec.maps)
        _register_ctx(coll.env.memory, session.regs_buffer)
        maps_seen = MapsSnapshot(pid)
        native = _native_hits_wanted(args, session)
        plan = expand_multi(plan, pid)
        stats = _attach_all(session, coll, plan, pump, writer, maps_seen, native)
        if any(st.probe_ids and st.native for st in stats):
            _add_native_poll(session, coll, pump, maps_seen)
        try:
            status = session.run(duration=args.duration)
        except KeyboardInterrupt:
            status = None
            writer.note("interrupted: detaching")
        finally:
            pump.drain()
            session.detach()
        if status is not None:
            writer.proc_maps(pid, maps_seen.as_json())
            writer.target_exit(pid, status if status >= 0 else None, -status if status < 0 else None)
        pump.report_lost()
        writer.symbolizer = _symbolizer(maps_seen)
        for m in coll.map_list:
            writer.map_dump(snapshot_map(m))
        for g in snapshot_globals(spec, coll.maps):
            writer.global_var(g)
        if args.verbose:
            _collect_native_stats(session, stats)
            writer.stats(_stats_report(stats))
        writer.close()
        return 0
    finally:
        if session is not None:
            with contextlib.suppress(UbpfError, OSError):
                session.detach()
        if out is not None:
            out.close()


def _symbolizer(maps_seen: MapsSnapshot) -> Any:
    from ubpf_py.output.symbolize import Symbolizer

    return Symbolizer(maps_seen.maps) if maps_seen.maps else None


def _event_type_id(spec: Any, name: str | None) -> int:
    return event_type_id(spec, name)


class MapsSnapshot:
    """The target's /proc/PID/maps, taken at the first probe hit (libraries are mapped by then)
    so addresses can be symbolised after the target has gone."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.maps: list[Any] = []
        self.taken = False
        self.take()

    def take(self) -> None:
        from ubpf_py.probe.procmaps import read_maps

        with contextlib.suppress(OSError, UbpfError):
            self.maps = read_maps(self.pid)

    def as_json(self) -> list[dict]:
        return [{"start": hex(m.start), "end": hex(m.end), "perms": m.perms, "offset": hex(m.offset),
                 "path": m.path} for m in self.maps]


def _native_hits_wanted(args: argparse.Namespace, session: Any) -> bool:
    """Native hits need the JIT, the C stop loop and no opt-out."""
    if getattr(args, "no_native_hits", False) or os.environ.get("UBPF_NATIVE_HITS", "1") == "0":
        return False
    return args.engine == "jit" and bool(getattr(session, "native_loop", False))


def _probe_kwargs(prog: LoadedProgram, st: ProbeStats, pump: OutputPump, maps_seen: MapsSnapshot,
                  native: bool, native_syncs: list) -> dict:
    """``add_probe`` arguments: the program's native entry (no Python per hit) when it is eligible,
    else the Python handler."""
    ex = prog.executable
    if native and hasattr(ex, "native_entry") and ex.native_ineligible() is None:
        st.native = True
        if ex.native_sync not in native_syncs:
            native_syncs.append(ex.native_sync)
        return {"handler": None, "native_prog": ex.native_entry(), "native_facts": ex.native_facts_addr,
                "native_status": ex.native_status_addr, "native_error": ex.raise_native_fault}
    return {"handler": _make_handler(prog, st, pump, maps_seen, native_syncs)}


def _add_native_poll(session: Any, coll: Collection, pump: OutputPump, maps_seen: MapsSnapshot) -> None:
    """Work the per-hit Python handler did, done between runs of the C loop instead: keep the JIT
    region tables current, take the maps snapshot, drain ring/perf buffers."""
    syncs = [lp.executable.native_sync for lp in coll.programs.values()
             if hasattr(lp.executable, "native_sync")]
    drain = pump.drain if (pump.ringbufs or pump.perfbufs) else None

    def poll() -> None:
        for s in syncs:
            s()
        if not maps_seen.taken and session.stats.total_hits:
            maps_seen.taken = True
            maps_seen.take()
        if drain is not None:
            drain()

    session.add_poll(poll, _poll_interval(pump))


def _poll_interval(pump: OutputPump) -> float:
    """50 ms, shorter for small ring/perf buffers so they are drained before they fill at the
    C loop's hit rate (about one hit per 15 us): 50 ms per 256 KiB of the smallest, >= 1 ms."""
    sizes = [m.spec.max_entries for m in pump.ringbufs]
    sizes += [64 * 1024 for _ in pump.perfbufs]       # perf buffers: a few pages per CPU
    if not sizes:
        return 0.05
    return max(0.001, min(0.05, 0.05 * min(sizes) / (256 * 1024)))


def _collect_native_stats(session: Any, stats: list[ProbeStats]) -> None:
    """Hits and program time of native probes come from the engine's per-probe counters."""
    st_all = session.stats
    for st in stats:
        if st.native:
            st.hits = sum(st_all.hits.get(i, 0) for i in st.probe_ids)
            st.prog_ns = sum(st_all.handler_ns_by_probe.get(i, 0) for i in st.probe_ids)


def _attach_all(session: Any, coll: Collection, plan: list[AttachRequest], pump: OutputPump,
                writer: Writer, maps_seen: MapsSnapshot, native: bool = False) -> list[ProbeStats]:
    from ubpf_py.probe import resolve, symbols

    stats = []
    spec_ids = None
    native_syncs: list = []     # native programs' region-table refreshers (see _make_handler)
    for req in plan:
        prog = coll.program(req.program)
        st = ProbeStats(req)
        if req.usdt:
            from ubpf_py.probe import usdt

            spec_ids = spec_ids or usdt.UsdtSpecIds(_usdt_max_specs(coll))
            path = resolve.resolve_binary(req.binary, pid=session.pid)
            notes = usdt.find_usdt(path, req.usdt[0], req.usdt[1])
            if not notes:
                raise SymbolError(f"no USDT probe {req.usdt[0]}:{req.usdt[1]} in {path} "
                                  f"(list them with: ubpf-run --list 'usdt:{req.binary}:*')")
            for note in notes:
                spec_id, is_new = spec_ids.assign(note, req.cookie)
                if is_new:
                    _fill_usdt_spec(coll, note, spec_id, req.cookie)
                st.probe_ids.append(session.add_probe(path, note.file_offset, cookie=spec_id,
                                                      ref_ctr_offset=note.sema_offset,
                                                      **_probe_kwargs(prog, st, pump, maps_seen, native, native_syncs)))
            writer.attached(req.program, req.describe(), f"{len(notes)} site(s) in {path}")
        else:
            if req.binary:
                path = resolve.resolve_binary(req.binary, pid=session.pid)
                offset = symbols.resolve_function(path, req.function, req.offset)
                detail = ""
            else:
                path, offset, detail = resolve.find_function_in_process(session.pid, req.function)
                offset += req.offset
            st.probe_ids.append(session.add_probe(path, offset, is_return=req.retprobe, cookie=req.cookie,
                                                  **_probe_kwargs(prog, st, pump, maps_seen, native, native_syncs)))
            writer.attached(req.program, req.describe(), detail)
        stats.append(st)
    return stats


def _usdt_max_specs(coll: Collection) -> int:
    specs = coll.maps.get(USDT_SPECS_MAP)
    if specs is None:
        raise UbpfError(f"the object has USDT programs but no {USDT_SPECS_MAP} map: "
                        f"build it with libbpf's usdt.bpf.h")
    return specs.spec.max_entries


def _fill_usdt_spec(coll: Collection, note: Any, spec_id: int, cookie: int) -> None:
    """Write the argument spec libbpf's usdt.bpf.h reads (the attach cookie is the spec id)."""
    from ubpf_py.probe import usdt
    from ubpf_py.probe.usdt_layout import layout_from_btf

    value = usdt.encode_usdt_spec(note, cookie, layout_from_btf(coll.spec.btf))
    rc = coll.maps[USDT_SPECS_MAP].update(spec_id.to_bytes(4, "little"), value, 0)
    if rc:
        raise UbpfError(f"cannot store USDT spec {spec_id} in {USDT_SPECS_MAP} (error {rc})")


def _make_handler(prog: LoadedProgram, st: ProbeStats, pump: OutputPump, maps_seen: MapsSnapshot,
                  native_syncs: list | None = None):
    """The per-hit callback: run the program on the engine's pt_regs, move its output.
    ``native_syncs``: programs running from the C loop; a Python-run program may grow map storage
    (new memory regions) while the C loop runs, so their region tables are refreshed after it."""
    clock = time.perf_counter_ns
    run = prog.run
    drain = pump.drain if (pump.ringbufs or pump.perfbufs) else None
    syncs = native_syncs if native_syncs is not None else []

    def handler(hit: HitContext) -> None:
        if not maps_seen.taken:
            maps_seen.taken = True
            maps_seen.take()
        t0 = clock()
        run(hit.ctx_addr)
        st.prog_ns += clock() - t0
        st.hits += 1
        if drain is not None:
            drain()
        for sync in syncs:
            sync()

    return handler


def _register_ctx(memory: Any, buf: Any) -> None:
    """Let programs read the probe engine's pt_regs buffer (read-only, the first 168 bytes)."""
    if memory.find(buf.addr, PT_REGS_SIZE) is None:
        memory.add(Region.of(buf, "context (struct pt_regs)", writable=False, size=PT_REGS_SIZE))


def _stats_report(stats: list[ProbeStats]) -> dict:
    rows = []
    lines = []
    for st in stats:
        per_hit = st.prog_ns / st.hits if st.hits else 0.0
        rows.append({"program": st.request.program, "target": st.request.describe(), "hits": st.hits,
                     "program_ns": st.prog_ns, "program_ns_per_hit": per_hit})
        lines.append(f"{st.request.program} on {st.request.describe()}: {st.hits} hits, "
                     f"{st.prog_ns / 1e6:.3f} ms in the program ({per_hit:.0f} ns/hit)")
    return {"probes": rows, "lines": lines}
