"""What ``ubpf-run OBJECT ...`` does, over the public API: one :class:`RunOptions` in, output out.

The CLI parses the command line into ``RunOptions``; this module opens the
object (compiling C sources), starts or seizes the target, sets globals, loads,
attaches the plan, routes events to a writer, prints maps every ``--interval``,
serves ``--metrics``, and prints maps and globals at the end -- all through
``ubpf_py.api.BPFObject``, so both backends behave alike.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from ubpf_py.api import BPFObject
from ubpf_py.errors import NoProgramError, NotSupportedError, UsageError
from ubpf_py.live.attach import parse_attach_option, plan_attachments
from ubpf_py.live.options import RunOptions
from ubpf_py.maps.budget import check_spec_maps
from ubpf_py.output.dump import NO_ENTRIES
from ubpf_py.output.writers import Writer, make_writer

#: how often --metrics refreshes its snapshot of the maps when no --interval is given
METRICS_REFRESH_S = 1.0


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


def run(opts: RunOptions) -> int:
    """Trace as ``opts`` says; returns the exit code (0: traced, whatever the target's status)."""
    obj = BPFObject.open(opts.object, backend=opts.backend)
    spec = obj.spec
    require_programs(spec)
    check_spec_maps(spec)       # before the target is started: a map we cannot create ends it here
    if opts.keep_command and opts.command and opts.backend == "kernel":
        # the kernel backend's command dies with ubpf-run (PR_SET_PDEATHSIG): it cannot be kept
        raise NotSupportedError("--keep-command with --backend kernel (the command ends with the session)")
    plan = plan_attachments(spec, [parse_attach_option(a, spec) for a in opts.attach], auto=opts.auto_attach)
    if not plan:
        raise UsageError(f"{opts.object}: nothing to attach: no program names its target in its section "
                         f"and no --attach was given (programs: {', '.join(spec.programs)})")
    for name in opts.hist:
        if name not in obj.maps and name not in obj.globals:
            raise UsageError(f"--hist {name}: the object has no such map or global "
                             f"(maps: {', '.join(obj.maps)}; globals: {', '.join(obj.globals)})")
    out = open(opts.output, "w") if opts.output else None  # noqa: SIM115 - closed in finally
    metrics = None
    try:
        writer = make_writer(opts.format, out, obj.decoder)
        writer.hist_modes = dict(opts.hist)
        _route_events(obj, writer)
        if opts.command:
            obj.launch(opts.command, follow_forks=opts.follow_forks, stdout=_target_stdout(opts))
        else:
            obj.attach_pid(opts.pid, follow_forks=opts.follow_forks)
        pid = obj.pid
        for item in opts.sets:
            name, _, value = item.partition("=")
            obj.globals[name] = parse_set_value(value, pid)
        obj.load(engine=opts.engine, verifier=opts.verifier, check_memory=opts.check_memory,
                 native_hits=opts.native_hits, programs=sorted({r.program for r in plan}),
                 event_type=opts.event_type, mode=opts.mode, budget=opts.max_insns)
        if opts.verifier_log:
            _print_verifier_logs(obj)
        for req in plan:
            link = obj.attach_request(req)
            writer.attached(req.program, req.describe(), link.detail, *link.path)
        if opts.metrics:
            from ubpf_py.output.metrics import MetricsServer

            metrics = MetricsServer.start(opts.metrics, obj, opts.hist)
            writer.note(f"metrics at http://{opts.metrics.rpartition(':')[0] or '0.0.0.0'}:{metrics.port}/metrics")
        tick = _ticker(obj, writer, opts, metrics)
        every = opts.interval or (METRICS_REFRESH_S if metrics else None)
        status = obj.run(opts.duration, interval=every, on_interval=tick)
        backend = obj.backend
        if status is None and opts.command:
            status = end_command(backend, opts, writer.note)
        if status is not None:
            writer.proc_maps(pid, backend.proc_maps())
            writer.target_exit(pid, status if status >= 0 else None, -status if status < 0 else None)
        backend.report_lost()
        writer.symbolizer = backend.symbolizer()
        for view in obj.maps.values():
            writer.map_dump(view.dump())
        for g in obj.globals.dumps():
            writer.global_var(g)
        if opts.verbose:
            writer.stats(backend.stats_report())
        writer.close()
        return 0
    finally:
        if metrics is not None:
            metrics.stop()
        if opts.command and obj._backend is not None:   # an error ended the session: the command ends too
            end_command(obj._backend, opts, _note_stderr)
        obj.close()
        if out is not None:
            out.close()


def require_programs(spec: Any) -> None:
    """An object with no program we can run is refused the same way by runs and ``--check``."""
    if not spec.programs:
        raise NoProgramError(f"{spec.path}: no runnable program (every executable section was "
                             f"skipped or there is none): nothing to verify or run")


#: seconds a command started with ``-- CMD`` gets between SIGTERM and SIGKILL when the session ends
COMMAND_GRACE_S = 2.0


def end_command(backend: Any, opts: RunOptions, note: Any) -> int | None:
    """The command started with ``-- CMD`` ends with the session (SIGTERM, SIGKILL after
    COMMAND_GRACE_S) unless ``--keep-command``; a note says which.  Returns its exit code
    (-signal) when it was ended, None when it keeps running or was collected already."""
    if getattr(backend, "_command_noted", False):
        return None
    backend._command_noted = True
    pid = backend.pid if hasattr(backend, "pid") and backend.pid else getattr(backend.session, "pid", "?")
    if opts.keep_command:
        note(f"command {pid} keeps running, no longer traced (--keep-command)")
        return None
    code, how = backend.end_command(COMMAND_GRACE_S)
    if how == "had exited":
        return code
    if how:
        sig = "SIGKILL after SIGTERM was ignored" if how == "killed" else "SIGTERM"
        note(f"command {pid} ended with the session ({sig}; --keep-command keeps it running)")
    return code


def _note_stderr(text: str) -> None:
    print(f"ubpf-run: {text}", file=sys.stderr, flush=True)


def _target_stdout(opts: RunOptions) -> Any:
    """JSON on our stdout must stay parseable: the launched target's stdout goes to our stderr
    then (with ``-o FILE`` it keeps the terminal's stdout)."""
    if opts.format == "json" and not opts.output:
        return sys.stderr.fileno()
    return None


def _route_events(obj: BPFObject, writer: Writer) -> None:
    obj.on_printk(lambda ev: writer.printk(ev.comm, ev.tgid, ev.tid, ev.cpu, ev.timestamp_ns, ev.message))
    obj.ring_buffer(None, lambda r: writer.record(r.kind, r.map, r.cpu, r.data, r.value))
    obj.on_lost(writer.lost)


def _print_verifier_logs(obj: BPFObject, err: TextIO | None = None) -> None:
    for lp in getattr(obj.collection, "programs", {}).values():
        report = getattr(lp, "report", None)
        if report is not None and report.log:
            print(report.log.rstrip(), file=err or sys.stderr)


def _ticker(obj: BPFObject, writer: Writer, opts: RunOptions, metrics: Any) -> Any:
    """The periodic work while tracing: refresh the metrics snapshot, print (and clear) the maps."""
    if not opts.interval and metrics is None:
        return None
    views = [v for v in obj.maps.values() if not v.spec.internal and v.type not in NO_ENTRIES]

    def tick() -> None:
        if metrics is not None:
            metrics.refresh()
        if opts.interval:
            writer.interval(time.time(), [v.dump() for v in views], obj.globals.dumps())
            if opts.clear:
                for v in views:
                    v.clear()

    return tick
