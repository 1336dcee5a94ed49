"""The kernel backend behind ``ubpf_py.api`` (``backend="kernel"``): bpf() and perf_event uprobes.

Only the execution differs from the userspace backend: programs are loaded with
bpf(), probes are perf_event uprobes, printk lines come from trace_pipe and
records from the kernel's ring/perf buffers.  The attach plan (``live.attach``)
and the event sink are shared, so a user with privileges switches backends
without changing anything else.  A launched target waits at a gate
(``kernel.target``) until :meth:`KernelBackend.run`, so probes see it from its
first instruction.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from typing import Any

from ubpf_py.errors import KernelBackendError, TargetError, UbpfError
from ubpf_py.kernel.events import LostEvent, PrintkEvent, RecordEvent
from ubpf_py.live.attach import AttachRequest
from ubpf_py.live.pump import EventSink, decode_record
from ubpf_py.obj.spec import ObjectSpec
from ubpf_py.output.values import ValueDecoder


class KernelBackend:
    name = "kernel"

    def __init__(self, spec: ObjectSpec) -> None:
        require_kernel_bpf()
        self.spec = spec
        self.child: Any = None
        self.pid: int | None = None
        self.session: Any = None
        self.sink: EventSink | None = None
        self.decoder = ValueDecoder(spec.btf)
        self.event_type_id = 0
        self._exit_maps = ""

    # ---- target ------------------------------------------------------------------------
    def launch(self, argv: list[str], *, follow_forks: bool = False, stdout: Any = None) -> int:
        from ubpf_py.kernel.target import spawn_gated

        self.child = spawn_gated(argv, cwd=os.getcwd(), stdout=stdout)
        self.child.watch_exit()
        self.pid = self.child.pid
        return self.pid

    def attach_pid(self, pid: int, *, follow_forks: bool = False) -> int:
        if not os.path.exists(f"/proc/{pid}"):
            raise TargetError(f"no such process: pid {pid} (check the pid; it may have exited)")
        self.pid = pid
        return pid

    # ---- load / attach -----------------------------------------------------------------
    def load(self, *, engine: str, verifier: str, check_memory: bool, native_hits: bool, mode: str = "auto",
             budget: int | None = None,
             programs: list[str] | None, sink: EventSink, event_type_id: int) -> Any:
        from ubpf_py.kernel.backend import KernelSession

        self.sink, self.event_type_id = sink, event_type_id
        self.session = KernelSession(self.spec, [], self.pid, cwd=os.getcwd())
        return self.session.coll

    def attach(self, req: AttachRequest) -> tuple[Any, str]:
        if self.session is None:
            raise UbpfError("attach needs a loaded object (call load() first)")
        links = self.session.attach_request(req)
        return links, "kernel uprobe"

    # ---- run ---------------------------------------------------------------------------
    def run(self, duration: float | None, tick: Callable[[], None] | None = None,
            tick_every: float | None = None) -> int | None:
        """Move kernel events to the sink until the target ends, the duration passes or Ctrl-C."""
        if self.child is not None:
            self.child.release()
        deadline = None if duration is None else time.monotonic() + duration
        next_tick = None if tick is None or not tick_every else time.monotonic() + tick_every
        status = None
        try:
            while True:
                self.drain(0.05)
                if self.child is not None:
                    status = self.child.poll()
                    if status is not None:
                        break
                elif not os.path.exists(f"/proc/{self.pid}"):
                    break
                now = time.monotonic()
                if next_tick is not None and now >= next_tick:
                    tick()
                    next_tick = time.monotonic() + tick_every
                if deadline is not None and now > deadline:
                    break
        except KeyboardInterrupt:   # Ctrl-C, or SIGTERM/SIGHUP turned into it by ubpf-run: detach
            status = None
        finally:
            end = time.monotonic() + 0.3  # trace_pipe and perf buffers lag a little behind the exit
            while time.monotonic() < end:
                self.drain(0.02)
        if self.child is not None:
            self._exit_maps = self.child.exit_maps
        return status

    def end_command(self, grace: float) -> tuple[int | None, str]:
        """The launched command ends with the session, as with the userspace backend: SIGTERM,
        then SIGKILL after ``grace`` seconds; (exit code or -signal, how)."""
        child = self.child
        if child is None:
            return None, ""
        status = child.poll()
        if status is not None:
            return status, "had exited"
        how = "terminated"
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, signal.SIGTERM)
        end = time.monotonic() + grace
        while (status := child.poll()) is None:
            if time.monotonic() > end and how == "terminated":
                how = "killed"
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGKILL)
            time.sleep(0.01)
        return status, how

    def drain(self, timeout: float = 0.0) -> None:
        if self.session is None or self.sink is None:
            return
        for ev in self.session.poll(timeout):
            if isinstance(ev, PrintkEvent):
                self.sink.printk(ev.comm, ev.tgid, ev.tid, ev.cpu, ev.timestamp_ns, ev.message)
            elif isinstance(ev, RecordEvent):
                fields = decode_record(self.decoder, self.spec.path, ev.data, self.event_type_id,
                                       perf=ev.kind == "perfbuf")
                self.sink.record(ev.kind, ev.map, ev.cpu, ev.data, fields)
            elif isinstance(ev, LostEvent):
                self.sink.lost("perfbuf", ev.map, ev.count)

    def report_lost(self) -> None:
        """Kernel losses arrive as events (PERF_RECORD_LOST) while draining."""

    # ---- inspect -----------------------------------------------------------------------
    def raw_maps(self) -> dict[str, Any]:
        return self.session.coll.maps if self.session is not None else {}

    def symbolizer(self) -> Any:
        return None

    def proc_maps(self) -> list[dict]:
        return _proc_maps_json(self._exit_maps)

    def stats_report(self) -> dict:
        return {"probes": [], "lines": ["per-probe statistics are not kept by the kernel backend"]}

    def detach(self) -> None:
        """Remove the uprobes; maps stay readable until ``close``."""
        if self.session is not None:
            for link in self.session.links:
                link.close()
            self.session.links = []

    def kill_target(self) -> None:
        if self.child is not None:
            with contextlib.suppress(OSError):
                self.child.kill()

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None
        if self.child is not None and not self.child.released:
            self.kill_target()


def require_kernel_bpf() -> None:
    """KernelBackendError (exit code 5) when this process cannot use bpf() and uprobes."""
    from ubpf_py.kernel.syscall import kernel_bpf_skip_reason

    reason = kernel_bpf_skip_reason()
    if reason:
        raise KernelBackendError(f"the kernel backend cannot use bpf() here: {reason} "
                                 f"(run as root, or use the default userspace backend)")


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
