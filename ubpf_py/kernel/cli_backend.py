"""``ubpf-run --backend kernel``: the same object, attach plan and output, run by the kernel.

Only the execution differs from the userspace backend: programs are loaded with
bpf(), probes are perf_event uprobes, printk lines come from trace_pipe and
records from the kernel's ring/perf buffers.  The attach plan
(``live.attach``) and the writers (``output``) are shared, so a user with
privileges can switch backends without changing anything else.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from typing import Any

from ubpf_py.errors import KernelBackendError, TargetError, UsageError
from ubpf_py.kernel.events import LostEvent, PrintkEvent, RecordEvent
from ubpf_py.output.dump import GlobalDump, MapDump
from ubpf_py.output.values import ValueDecoder
from ubpf_py.output.writers import Writer, make_writer


def run_kernel_backend(args: argparse.Namespace) -> int:
    from ubpf_py.kernel.backend import KernelSession
    from ubpf_py.kernel.syscall import kernel_bpf_skip_reason
    from ubpf_py.kernel.target import spawn_gated
    from ubpf_py.live.attach import expand_multi, parse_attach_option, plan_attachments
    from ubpf_py.live.tracing import parse_set_value
    from ubpf_py.obj.elf import load_object
    from ubpf_py.obj.globals import set_global

    reason = kernel_bpf_skip_reason()
    if reason:
        raise KernelBackendError(f"the kernel backend cannot use bpf() here: {reason} "
                                 f"(run as root, or use the default userspace backend)")
    from ubpf_py.live.loader_opts import apply_loader_options, fill_cgroup_maps

    spec = load_object(args.object)
    explicit = [parse_attach_option(a, spec) for a in args.attach]
    apply_loader_options(spec, args.map_size, args.no_autoload, {r.program for r in explicit})
    plan = plan_attachments(spec, explicit, auto=not args.no_auto)
    if not plan:
        raise UsageError(f"{args.object}: nothing to attach (no section names a target and no --attach)")
    out = open(args.output, "w") if args.output else None  # noqa: SIM115 - closed in finally
    child = None
    try:
        if args.command:
            child = spawn_gated(args.command, cwd=os.getcwd())
            child.watch_exit()
            child.run_to_exec()   # probes see the target from its first instruction, not the gate
            if child.poll() is not None:
                raise TargetError(f"cannot start {args.command[0]!r} (exit status {child.poll()}); "
                                  "check the command and its path")
            pid = child.pid
        else:
            pid = args.pid
            if not os.path.exists(f"/proc/{pid}"):
                raise KernelBackendError(f"no such process: pid {pid}")
        for item in args.set:
            name, _, value = item.partition("=")
            set_global(spec, name, parse_set_value(value, pid))
        exe = args.command[0] if args.command else None
        plan = expand_multi(plan, None if exe else pid, os.getcwd(), exe)
        decoder = ValueDecoder(spec.btf)
        writer = make_writer(args.format, out, decoder)
        with KernelSession(spec, plan, pid, cwd=os.getcwd(), exe=exe) as session:
            fill_cgroup_maps(getattr(args, "cgroup_map", []), lambda m, i, fd: _kernel_map(session, m).update(
                i.to_bytes(4, "little"), fd.to_bytes(4, "little")))
            for req in plan:
                writer.attached(req.program, req.describe(), "kernel uprobe")
            if child is not None:
                child.release()
            decode = _record_decoder(spec, decoder, getattr(args, "event_type", None))
            status = _pump(session, child, pid, writer, args.duration, decode)
            if status is not None:
                maps_text = child.exit_maps if child is not None else ""
                writer.proc_maps(pid, _proc_maps_json(maps_text))
                writer.target_exit(pid, status if status >= 0 else None, -status if status < 0 else None)
            dumps = session.dump_maps()
            globals_ = session.read_globals()
        for d in map_dumps(spec, dumps):
            writer.map_dump(d)
        for g in global_dumps(spec, globals_):
            writer.global_var(g)
        writer.close()
        return 0
    finally:
        if out is not None:
            out.close()


def _kernel_map(session: Any, name: str) -> Any:
    m = session.coll.maps.get(name)
    if m is None:
        raise UsageError(f"the object has no map {name!r} (maps: {', '.join(session.coll.maps)})")
    return m


def _record_decoder(spec: Any, decoder: ValueDecoder, event_type: str | None) -> Any:
    """Records decoded exactly as the userspace backend decodes them (``output.records``)."""
    from ubpf_py.output.records import decode_record, event_type_id

    tid = event_type_id(spec, event_type)
    return lambda data, perf: decode_record(decoder, spec.path, tid, data, perf)


def _pump(session: Any, child: Any, pid: int, writer: Writer, duration: float | None,
          decode: Any = None) -> int | None:
    """Move kernel events to the writer until the target ends, the duration passes or Ctrl-C."""
    deadline = None if duration is None else time.monotonic() + duration
    status = None
    try:
        while True:
            for ev in session.poll(0.05):
                _emit(writer, ev, decode)
            if child is not None:
                status = child.poll()
                if status is not None:
                    break
            elif not os.path.exists(f"/proc/{pid}"):
                break
            if deadline is not None and time.monotonic() > deadline:
                break
    except KeyboardInterrupt:
        writer.note("interrupted: detaching")
    end = time.monotonic() + 0.3  # trace_pipe and perf buffers lag a little behind the exit
    while time.monotonic() < end:
        for ev in session.poll(0.02):
            _emit(writer, ev, decode)
    return status


def _emit(writer: Writer, ev: Any, decode: Any = None) -> None:
    if isinstance(ev, PrintkEvent):
        writer.printk(ev.comm, ev.tgid, ev.tid, ev.cpu, ev.timestamp_ns, ev.message)
    elif isinstance(ev, RecordEvent):
        fields = decode(ev.data, ev.kind == "perfbuf") if decode is not None else None
        writer.record(ev.kind, ev.map, ev.cpu, ev.data, fields)
    elif isinstance(ev, LostEvent):
        writer.lost("perfbuf", ev.map, ev.count)


def map_dumps(spec: Any, dumps: dict[str, dict]) -> list[MapDump]:
    specs = {m.name: m for m in spec.maps}
    out = []
    for name, d in dumps.items():
        ms = specs.get(name)
        out.append(MapDump(name, d["type"], d["key_size"], d["value_size"], d["max_entries"], d["internal"],
                           ms.key_type_id if ms else 0, ms.value_type_id if ms else 0, d["entries"],
                           ms.section if ms else ""))
    return out


def global_dumps(spec: Any, values: dict[str, bytes]) -> list[GlobalDump]:
    maps = {m.name: m for m in spec.maps}
    out = []
    for name, data in values.items():
        var = spec.globals.get(name)
        if var is None:
            continue
        m = maps.get(var.map_name)
        out.append(GlobalDump(name, var.map_name, data, var.type_id,
                              var.linkage == "static" and bool(m and m.readonly)))
    return out


def _proc_maps_json(text: str) -> list[dict]:
    rows = []
    for line in text.splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) < 5:
            continue
        start, _, end = parts[0].partition("-")
        with contextlib.suppress(ValueError):
            rows.append({"start": hex(int(start, 16)), "end": hex(int(end, 16)), "perms": parts[1],
                         "offset": hex(int(parts[2], 16)), "path": parts[5] if len(parts) > 5 else ""})
    return rows
