"""The kernel backend: run an ObjectSpec in the kernel with PMU uprobes on one process.

Interface for the CLI (``ubpf-run --backend kernel``) and for tests::

    child = spawn_gated(argv, cwd=..., stdout=...)           # kernel.target
    with KernelSession(spec, attach_requests, child.pid) as s:  # loads, attaches
        child.release()
        while child.poll() is None:
            for ev in s.poll(0.05): ...                         # PrintkEvent | RecordEvent | LostEvent
        events = list(s.poll(0.2))                              # drain after exit
        maps = s.dump_maps()
        globals_ = s.read_globals()

or, in one call, ``run_command(spec, attach_requests, argv, cwd=...) -> RunResult``.

* ``attach_requests`` are ``ubpf_py.live.attach.AttachRequest`` (program, binary,
  function, offset, retprobe, cookie, usdt).  Function names become file offsets through
  ``resolver(binary, function, pid) -> (path, file_offset)``; the default resolver
  finds the binary with ``resolve_binary_path`` and the function with
  ``ubpf_py.probe.symbols.resolve_function`` (libbpf's rules).  USDT requests need
  ``ubpf_py.probe.usdt``.
* ``target_pid`` None attaches system-wide (pid -1), for comparison runs only.
* ``dump_maps()`` returns the kernel oracle's structure with bytes instead of hex:
  ``{name: {"type": type_name, "key_size", "value_size", "max_entries", "internal",
  "entries": [(key, value | [per-cpu values])] or None}}`` (None for ringbuf,
  perf_event_array, prog_array and keyless maps).
* ``read_globals()`` returns ``{var: bytes}`` for every global of the object's data maps.
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ubpf_py.errors import KernelBackendError, NotSupportedError, SymbolError
from ubpf_py.kernel.events import (
    Event,
    LostEvent,
    PerfBufReader,
    PrintkEvent,
    RecordEvent,
    RingbufReader,
    TracePipeReader,
)
from ubpf_py.kernel.loader import (
    MAP_PERF_EVENT_ARRAY,
    MAP_PROG_ARRAY,
    MAP_RINGBUF,
    KernelCollection,
    load_collection,
)
from ubpf_py.kernel.maps import KEYLESS_MAP_TYPES
from ubpf_py.kernel.perf import UprobeLink, attach_uprobe
from ubpf_py.kernel.target import spawn_gated
from ubpf_py.obj.spec import MAP_TYPES, ObjectSpec

Resolver = Callable[[str, str, int | None], tuple[str, int]]

# helpers that write to trace_pipe: trace_printk, trace_vprintk
_PRINTK_HELPERS = (6, 177)
_NO_ENTRIES = frozenset({MAP_RINGBUF, MAP_PERF_EVENT_ARRAY, MAP_PROG_ARRAY, 12, 13}) | KEYLESS_MAP_TYPES


LIBRARY_DIRS = ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64", "/lib", "/usr/lib",
                "/usr/local/lib")


def resolve_binary_path(binary: str, cwd: str | None = None, pid: int | None = None) -> str:
    """The file an attach point's binary names: ``ubpf_py.probe.resolve.resolve_binary``
    when present (the userspace backend's rules), else libbpf's: a path with ``/`` is taken
    relative to ``cwd``; a library name (``x.so``, ``x.so.N``) is looked up in the
    target's mapped files, ``cwd``, LD_LIBRARY_PATH and the system library
    directories; any other bare name in PATH."""
    try:
        from ubpf_py.probe.resolve import resolve_binary
    except ImportError:
        pass
    else:
        return resolve_binary(binary, pid, cwd)
    base = cwd or os.getcwd()
    if "/" in binary:
        return binary if os.path.isabs(binary) else os.path.normpath(os.path.join(base, binary))
    if binary.endswith(".so") or ".so." in binary:
        if pid is not None:
            for row in _proc_maps(pid):
                if os.path.basename(row["path"]) == binary and os.path.exists(row["path"]):
                    return row["path"]
        dirs = [base, *filter(None, os.environ.get("LD_LIBRARY_PATH", "").split(":")), *LIBRARY_DIRS]
    else:
        dirs = os.environ.get("PATH", "/usr/bin:/bin").split(":")
    for d in dirs:
        cand = os.path.join(d, binary)
        if os.path.isfile(cand):
            return os.path.realpath(cand) if "/" not in d else cand
    raise SymbolError(f"cannot find binary {binary!r} (searched {', '.join(dirs[:6])}...); give its path")


def default_resolver(binary: str, function: str, pid: int | None, cwd: str | None = None) -> tuple[str, int]:
    """(path, file offset) of ``function`` in ``binary`` with ``ubpf_py.probe.symbols``."""
    path = resolve_binary_path(binary, cwd, pid)
    try:
        from ubpf_py.probe.symbols import resolve_function
    except ImportError:
        raise NotSupportedError("symbol resolution for the kernel backend (ubpf_py.probe.symbols "
                                "is not available); pass a resolver") from None
    return path, resolve_function(path, function)


def _uses_printk(spec: ObjectSpec) -> bool:
    for p in spec.programs.values():
        for ins in p.instructions:
            if ins.opcode == 0x85 and ins.src == 0 and ins.imm in _PRINTK_HELPERS:
                return True
    return False


@dataclass
class KernelSession:
    """Live kernel objects + uprobes + output readers for one traced process."""

    spec: ObjectSpec
    attach: list[Any]
    target_pid: int | None
    resolver: Resolver | None = None
    log_level: int = 0
    #: read trace_pipe (default: when a program calls bpf_trace_printk/vprintk)
    trace: bool | None = None
    #: directory relative binary paths are resolved against (default: our cwd, as libbpf)
    cwd: str | None = None
    coll: KernelCollection = field(init=False)
    links: list[UprobeLink] = field(default_factory=list, init=False)
    _readers: list[Any] = field(default_factory=list, init=False)
    _trace: TracePipeReader | None = field(default=None, init=False)
    _usdt_ids: Any = field(default=None, init=False)

    def __post_init__(self) -> None:
        # every program is loaded (as libbpf does): tail-call targets are not attached
        self.coll = load_collection(self.spec, log_level=self.log_level)
        try:
            self._open_outputs()
            for req in self.attach:
                self.links.extend(self._attach_one(req))
        except BaseException:
            self.close()
            raise

    # ---- setup ---------------------------------------------------------------------------
    def _open_outputs(self) -> None:
        for mspec, kmap in zip(self.spec.maps, self.coll.map_list, strict=True):
            if mspec.type == MAP_RINGBUF:
                self._readers.append(RingbufReader(kmap))
            elif mspec.type == MAP_PERF_EVENT_ARRAY:
                self._readers.append(PerfBufReader(kmap))
        if self.trace or (self.trace is None and _uses_printk(self.spec)):
            tgids = {self.target_pid} if self.target_pid is not None else None
            self._trace = TracePipeReader(tgids)

    def attach_request(self, req: Any) -> list[UprobeLink]:
        """Attach one more request after load (the Python API attaches one call at a time)."""
        links = self._attach_one(req)
        self.links.extend(links)
        return links

    def _attach_one(self, req: Any) -> list[UprobeLink]:
        prog_fd = self.coll.programs.get(req.program)
        if prog_fd is None:
            raise KernelBackendError(f"attach: the object has no program {req.program!r}")
        pid = self.target_pid if self.target_pid is not None else -1
        if getattr(req, "usdt", None):
            return self._attach_usdt(req, prog_fd, pid)
        if not req.function:
            path, off = resolve_binary_path(req.binary, self.cwd, self.target_pid), 0
        elif self.resolver is not None:
            path, off = self.resolver(req.binary, req.function, self.target_pid)
        else:
            path, off = default_resolver(req.binary, req.function, self.target_pid, self.cwd)
        if self.cwd and not os.path.isabs(path):
            path = os.path.join(self.cwd, path)
        link = attach_uprobe(prog_fd, path, off + req.offset, pid=pid, retprobe=req.retprobe,
                             cookie=req.cookie)
        return [link]

    def _attach_usdt(self, req: Any, prog_fd: int, pid: int) -> list[UprobeLink]:
        """libbpf's USDT attach: one uprobe per probe site, the attach cookie is the spec id,
        ``__bpf_usdt_specs[spec id]`` holds the argument spec and the user's cookie, and a
        semaphore (if any) is the kernel's ref_ctr_offset."""
        try:
            from ubpf_py.probe.usdt import find_usdt
        except ImportError:
            raise NotSupportedError("USDT probes in the kernel backend (ubpf_py.probe.usdt is not available)") from None
        from ubpf_py.live.sites import UsdtSpecs

        specs = self.coll.maps.get("__bpf_usdt_specs")
        if specs is None:
            raise KernelBackendError(f"program {req.program} is attached to a USDT probe but the object has no "
                                     "__bpf_usdt_specs map; build it with <bpf/usdt.bpf.h> and BPF_USDT")
        if self._usdt_ids is None:
            self._usdt_ids = UsdtSpecs(specs.max_entries, lambda k, v: specs.update(k, v))
        path = resolve_binary_path(req.binary, self.cwd, self.target_pid)
        provider, name = req.usdt
        links = []
        for note in find_usdt(path, provider, name):
            sid = self._usdt_ids.spec_id(note, req.cookie)
            assert note.file_offset is not None  # find_usdt rejects sites without one
            links.append(attach_uprobe(prog_fd, path, note.file_offset, pid=pid, cookie=sid,
                                       ref_ctr_offset=note.sema_offset))
        return links

    # ---- output --------------------------------------------------------------------------
    def fds(self) -> list[int]:
        """Descriptors worth polling for readability (trace_pipe, ring/perf buffers)."""
        out = [self._trace.fd] if self._trace else []
        for r in self._readers:
            if isinstance(r, RingbufReader):
                out.append(r.map.fd)
            else:
                out.extend(fd for _cpu, fd, _ring in r.rings)
        return out

    def poll(self, timeout: float = 0.0) -> Iterator[Event]:
        """Events available now (waiting up to ``timeout`` seconds for the first)."""
        if timeout > 0:
            fds = self.fds()
            if fds:
                with contextlib.suppress(OSError):
                    select.select(fds, [], [], timeout)
            else:
                time.sleep(timeout)
        for r in self._readers:
            yield from r.read()
        if self._trace:
            yield from self._trace.read()

    def dump_maps(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for mspec, kmap in zip(self.spec.maps, self.coll.map_list, strict=True):
            entries: list[tuple[bytes, Any]] | None = None
            if mspec.type not in _NO_ENTRIES:
                entries = []
                for key in kmap.all_keys():
                    value = kmap.lookup_percpu(key) if kmap.is_percpu else kmap.lookup(key)
                    if value is not None:
                        entries.append((key, value))
            out[mspec.name] = {
                "type": MAP_TYPES.get(mspec.type, str(mspec.type)), "key_size": kmap.key_size,
                "value_size": kmap.value_size, "max_entries": kmap.max_entries,
                "internal": mspec.internal, "entries": entries,
            }
        return out

    def read_globals(self) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        values: dict[str, bytes | None] = {}
        for name, g in {**self.spec.globals, **self.spec.kconfig}.items():
            if g.map_name not in values:
                kmap = self.coll.maps.get(g.map_name)
                values[g.map_name] = kmap.lookup(bytes(kmap.key_size)) if kmap else None
            data = values[g.map_name]
            if data is not None:
                out[name] = data[g.offset: g.offset + g.size]
        return out

    def close(self) -> None:
        for link in self.links:
            link.close()
        self.links = []
        for r in self._readers:
            r.close()
        self._readers = []
        if self._trace:
            self._trace.close()
            self._trace = None
        if hasattr(self, "coll"):
            self.coll.close()

    def __enter__(self) -> KernelSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class RunResult:
    """Everything a kernel run of one command observed (the oracle's fields)."""

    pid: int
    exit_code: int | None
    signal: int | None
    stdout: bytes
    printk: list[PrintkEvent]
    records: list[RecordEvent]
    perf_lost: int
    maps: dict[str, dict[str, Any]]
    globals: dict[str, bytes]
    notes: list[str]
    #: /proc/PID/maps rows seen last before exit (when asked for): start, end, perms, offset, path
    proc_maps: list[dict[str, Any]] = field(default_factory=list)

    def to_oracle_json(self) -> dict[str, Any]:
        """The kernel oracle's JSON (shared/corpus/README.md), so its checker can judge us."""
        def hexval(v: Any) -> Any:
            return [x.hex() for x in v] if isinstance(v, list) else v.hex()

        maps = {}
        for name, m in self.maps.items():
            entries = None if m["entries"] is None else [[k.hex(), hexval(v)] for k, v in m["entries"]]
            maps[name] = {**m, "entries": entries}
        return {
            "pid": self.pid, "exit_code": self.exit_code, "signal": self.signal,
            "stdout": self.stdout.decode(errors="replace"),
            "printk": [e.message for e in self.printk],
            "records": [{"kind": r.kind, "map": r.map, **({"cpu": r.cpu} if r.cpu is not None else {}),
                         "data": r.data.hex()} for r in self.records],
            "perf_lost": self.perf_lost, "maps": maps,
            "globals": {k: v.hex() for k, v in self.globals.items()},
            "proc_maps": [{**r, "start": hex(r["start"]), "end": hex(r["end"]), "offset": hex(r["offset"])}
                          for r in self.proc_maps],
        }


def run_command(spec: ObjectSpec, attach: list[Any], argv: list[str], *, cwd: str | None = None,
                resolver: Resolver | None = None, timeout: float = 60.0, cpu: int | None = None,
                capture_stdout: bool = True, on_event: Callable[[Event], None] | None = None,
                system_wide: bool = False, capture_proc_maps: bool = False,
                before_load: Callable[[int], None] | None = None) -> RunResult:
    """Start ``argv`` gated, attach, release, collect events until it exits (then drain).

    ``before_load(pid)`` runs after the target exists and before the object is loaded
    (set globals such as ``$PID`` there); ``capture_proc_maps`` ptrace-watches the exit
    to record /proc/PID/maps as the oracle does."""
    child = spawn_gated(argv, cwd=cwd, stdout=subprocess.PIPE if capture_stdout else None, cpu=cpu)
    printk: list[PrintkEvent] = []
    records: list[RecordEvent] = []
    lost = 0
    out = bytearray()
    proc_maps: list[dict[str, Any]] = []
    try:
        if capture_proc_maps:
            child.watch_exit()
        if before_load is not None:
            before_load(child.pid)
        session = KernelSession(spec, attach, None if system_wide else child.pid, resolver=resolver, cwd=cwd)
    except BaseException:
        child.kill()
        raise

    def take(ev: Event) -> None:
        nonlocal lost
        if isinstance(ev, PrintkEvent):
            printk.append(ev)
        elif isinstance(ev, RecordEvent):
            records.append(ev)
        elif isinstance(ev, LostEvent):
            lost += ev.count
        if on_event:
            on_event(ev)

    with session:
        child.release()
        deadline = time.monotonic() + timeout
        stdout_fd = child.proc.stdout.fileno() if child.proc.stdout else -1
        if stdout_fd >= 0:
            os.set_blocking(stdout_fd, False)
        while True:
            for ev in session.poll(0.02):
                take(ev)
            if stdout_fd >= 0:
                out += _read_available(stdout_fd)
            if child.poll() is not None:
                break
            if time.monotonic() > deadline:
                child.kill()
                raise KernelBackendError(f"target {argv[0]} did not exit within {timeout:g}s; killed it")
        drain_until = time.monotonic() + 0.3
        while time.monotonic() < drain_until:
            for ev in session.poll(0.02):
                take(ev)
        if stdout_fd >= 0:
            out += _read_available(stdout_fd)
            child.proc.stdout.close()
        rc = child.proc.returncode
        if child.exit_maps:
            proc_maps = _parse_proc_maps(child.exit_maps)
        maps = session.dump_maps()
        globals_ = session.read_globals()
        notes = list(session.coll.notes)
    return RunResult(child.pid, rc if rc >= 0 else None, -rc if rc < 0 else None, bytes(out), printk,
                     records, lost, maps, globals_, notes, proc_maps)


def _proc_maps(pid: int) -> list[dict[str, Any]]:
    try:
        text = open(f"/proc/{pid}/maps").read()  # noqa: SIM115 -- one read of a proc file
    except OSError:
        return []
    return _parse_proc_maps(text)


def _parse_proc_maps(text: str) -> list[dict[str, Any]]:
    rows = []
    for line in text.splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) < 5:
            continue
        start, end = parts[0].split("-")
        rows.append({"start": int(start, 16), "end": int(end, 16), "perms": parts[1],
                     "offset": int(parts[2], 16), "path": parts[5] if len(parts) > 5 else ""})
    return rows


def _read_available(fd: int) -> bytes:
    buf = bytearray()
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


__all__ = ["KernelSession", "RunResult", "default_resolver", "resolve_binary_path", "run_command"]
