"""``BPFObject``: open, configure, load, attach, run, read -- one object, either backend.

The life of an object follows libbpf's skeleton (open -> set globals and map
sizes -> load -> attach -> read maps -> destroy) with bcc's conveniences
(``attach_uprobe(binary=..., sym=...)``, maps as dicts, callbacks for
buffers).  A target process is chosen before ``load()`` (``launch`` a command,
held before ``main`` until ``run()``, or ``attach_pid``) because globals such as
the traced pid are written before load and the kernel backend attaches per
process.  Example (the README runs it)::

    from ubpf_py import BPFObject

    with BPFObject.open("mallocsize.bpf.c") as obj:      # .c is compiled with clang
        obj.launch(["ls", "-l", "/usr/bin"])
        obj.load()
        obj.attach_auto()                                # SEC("uprobe/libc.so.6:malloc")
        status = obj.run()                               # until ls exits
        print(obj.globals["calls"], obj.maps["size_hist"].values())
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ubpf_py.api.events import EventRouter, LostCallback, PrintkCallback, RecordCallback
from ubpf_py.api.maps import Globals, MapView
from ubpf_py.errors import UsageError
from ubpf_py.live.attach import AttachRequest, parse_attach_option, plan_attachments
from ubpf_py.obj.spec import ObjectSpec
from ubpf_py.output.values import ValueDecoder

BACKENDS = ("userspace", "kernel")


@dataclass
class Link:
    """One attached program (one request; a USDT request may cover several sites)."""

    program: str
    request: AttachRequest
    #: what was chosen (a library, the number of USDT sites, "kernel uprobe")
    detail: str
    handle: Any = None

    @property
    def target(self) -> str:
        return self.request.describe()

    @property
    def path(self) -> tuple[str, str]:
        """How hits run: ("in-target" | "ptrace" | "kernel", why not in the target)."""
        return (getattr(self.handle, "path", "") or "kernel", getattr(self.handle, "path_reason", ""))


class Maps(Mapping[str, MapView]):
    """The object's maps by name (globals' data sections included, as ``.bss`` and the like)."""

    def __init__(self, views: dict[str, MapView]) -> None:
        self._views = views

    def __getitem__(self, name: str) -> MapView:
        try:
            return self._views[name]
        except KeyError:
            raise KeyError(f"no map {name!r} (maps: {', '.join(self._views) or 'none'})") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._views)

    def __len__(self) -> int:
        return len(self._views)


class BPFObject:
    """One BPF object, from open to close (see the module docstring)."""

    def __init__(self, spec: ObjectSpec, *, backend: str = "userspace") -> None:
        if backend not in BACKENDS:
            raise UsageError(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}")
        self.spec = spec
        self.backend_name = backend
        self.decoder = ValueDecoder(spec.btf)
        self.maps = Maps({m.name: MapView(m, self.decoder, self) for m in spec.maps})
        self.globals = Globals(spec, self.decoder, self)
        self.events = EventRouter()
        self.links: list[Link] = []
        self.pid: int | None = None
        self.exit_status: int | None = None
        self.loaded = False
        self._backend: Any = None
        self._live_maps: dict[str, Any] = {}

    # ---- open --------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str, *, backend: str = "userspace", cflags: list[str] | None = None) -> BPFObject:
        """Open an ELF object, or a C source (compiled with clang; ``cflags`` added)."""
        from ubpf_py.obj.compile import compile_source, is_source
        from ubpf_py.obj.elf import load_object

        if backend == "kernel":    # say first when the kernel backend cannot run at all
            from ubpf_py.kernel.api_backend import require_kernel_bpf

            require_kernel_bpf()
        if is_source(path):
            path = compile_source(path, cflags=cflags)
        return cls(load_object(path), backend=backend)

    @property
    def path(self) -> str:
        return self.spec.path

    @property
    def programs(self) -> dict[str, Any]:
        """Program specs by name (``.section``, ``.kind``, ``.attach``)."""
        return dict(self.spec.programs)

    # ---- target ------------------------------------------------------------------------
    def _get_backend(self) -> Any:
        if self._backend is None:
            if self.backend_name == "kernel":
                from ubpf_py.kernel.api_backend import KernelBackend

                self._backend = KernelBackend(self.spec)
            else:
                from ubpf_py.live.tracing import UserspaceBackend

                self._backend = UserspaceBackend(self.spec)
        return self._backend

    def launch(self, argv: list[str], *, follow_forks: bool = False, stdout: Any = None) -> int:
        """Start ``argv`` held before its ``main`` until :meth:`run`; returns its pid.
        ``stdout``: a file, an fd or ``subprocess.DEVNULL`` for the target's standard output."""
        self._need_no_target("launch")
        if stdout == subprocess.DEVNULL:
            with open(os.devnull, "wb") as devnull:   # the child has its own copy once started
                self.pid = self._get_backend().launch(list(argv), follow_forks=follow_forks, stdout=devnull)
        else:
            self.pid = self._get_backend().launch(list(argv), follow_forks=follow_forks, stdout=stdout)
        return self.pid

    def attach_pid(self, pid: int, *, follow_forks: bool = False) -> int:
        """Trace a running process."""
        self._need_no_target("attach_pid")
        self.pid = self._get_backend().attach_pid(pid, follow_forks=follow_forks)
        return pid

    def _need_no_target(self, what: str) -> None:
        if self.pid is not None:
            raise UsageError(f"{what}: this object already traces pid {self.pid} (one target per object)")
        if self.loaded:
            raise UsageError(f"{what}: choose the target before load()")

    # ---- load --------------------------------------------------------------------------
    def load(self, *, engine: str = "jit", verifier: str = "strict", check_memory: bool = True,
             native_hits: bool = True, programs: list[str] | None = None,
             event_type: str | None = None, mode: str = "auto", budget: int | None = None) -> None:
        """Verify and load the programs (``programs``: only these and what they tail-call) and
        create the maps.  ``engine``/``native_hits``/``check_memory`` apply to the userspace
        backend; ``event_type`` names the BTF struct ring/perf records are decoded as; ``mode``
        (userspace backend): "auto" runs verified JIT programs inside the target where the
        program and site allow it, "intarget" makes that mandatory, "ptrace" never does it;
        ``budget``: per-run bound of programs the verifier did not accept (None: the default,
        0: unbounded)."""
        if self.loaded:
            raise UsageError("load: the object is already loaded")
        if self.pid is None:
            raise UsageError("load: choose the target first (launch([...]) or attach_pid(PID)): "
                             "globals such as its pid are set before load")
        coll = self._get_backend().load(engine=engine, verifier=verifier, check_memory=check_memory,
                                        native_hits=native_hits, programs=programs, sink=self.events,
                                        event_type_id=self._event_type_id(event_type), mode=mode,
                                        budget=budget)
        self._live_maps = dict(coll.maps)
        self.loaded = True
        self.collection = coll

    def _event_type_id(self, name: str | None) -> int:
        if not name:
            return 0
        btf = self.spec.btf
        if btf is None:
            raise UsageError(f"event type {name}: the object has no BTF to find the type in")
        from ubpf_py.obj.btf import KIND_STRUCT

        tid = btf.find(name.removeprefix("struct ").strip(), KIND_STRUCT)
        if not tid:
            raise UsageError(f"event type {name}: no struct of that name in the object's BTF")
        return tid

    def _raw_map(self, name: str) -> Any:
        return self._live_maps.get(name)

    # ---- attach ------------------------------------------------------------------------
    def attach_request(self, req: AttachRequest) -> Link:
        if not self.loaded:
            raise UsageError(f"attach {req.program}: load() the object first")
        handle, detail = self._backend.attach(req)
        link = Link(req.program, req, detail, handle)
        self.links.append(link)
        return link

    def attach_uprobe(self, program: str, *, binary: str = "", sym: str = "", offset: int = 0,
                      retprobe: bool = False, cookie: int = 0) -> Link:
        """Attach ``program`` at ``sym`` + ``offset`` of ``binary`` (a path, a library name such as
        ``libc.so.6``, or empty: look ``sym`` up in the target and its libraries).  An empty
        ``sym`` makes ``offset`` a file offset (libbpf's rule)."""
        self._need_program(program)
        if not binary and not sym:
            raise UsageError(f"attach_uprobe {program}: give sym=, or binary= with a file offset")
        return self.attach_request(AttachRequest(program, binary, sym, offset, retprobe, cookie))

    def attach_uretprobe(self, program: str, *, binary: str = "", sym: str = "", offset: int = 0,
                         cookie: int = 0) -> Link:
        return self.attach_uprobe(program, binary=binary, sym=sym, offset=offset, retprobe=True, cookie=cookie)

    def attach_usdt(self, program: str, *, binary: str, provider: str, name: str, cookie: int = 0) -> Link:
        """Attach ``program`` to every site of USDT probe ``provider:name`` in ``binary``."""
        self._need_program(program)
        return self.attach_request(AttachRequest(program, binary, cookie=cookie, usdt=(provider, name)))

    def attach_spec(self, text: str) -> Link:
        """``PROG=BINARY:FUNC[+OFF][@COOKIE]`` (``ubpf-run --attach`` syntax)."""
        return self.attach_request(parse_attach_option(text, self.spec))

    def attach_auto(self, exclude: set[str] | None = None) -> list[Link]:
        """Attach every program whose section names its target (a skeleton's ``__attach()``)."""
        skip = exclude or set()
        return [self.attach_request(r) for r in plan_attachments(self.spec, [], auto=True)
                if r.program not in skip]

    def _need_program(self, name: str) -> None:
        if name not in self.spec.programs:
            raise UsageError(f"no program {name!r} in {self.path} "
                             f"(programs: {', '.join(self.spec.programs) or 'none'})")

    # ---- events ------------------------------------------------------------------------
    def on_printk(self, callback: PrintkCallback) -> None:
        """Call ``callback(PrintkEvent)`` for every bpf_printk line (default: print to stdout)."""
        self.events.printk_cbs.append(callback)

    def ring_buffer(self, map_name: str | None, callback: RecordCallback) -> None:
        """Call ``callback(Record)`` for every record of ring buffer ``map_name`` (None: every
        ring and perf buffer)."""
        if map_name is not None:
            self._need_map(map_name, "ringbuf")
        self.events.record_cbs.setdefault(map_name, []).append(callback)

    def perf_buffer(self, map_name: str, callback: RecordCallback, lost: LostCallback | None = None) -> None:
        """Call ``callback(Record)`` for every sample of perf event array ``map_name``;
        ``lost(kind, map, count)`` when samples were dropped."""
        self._need_map(map_name, "perf_event_array")
        self.events.record_cbs.setdefault(map_name, []).append(callback)
        if lost is not None:
            self.events.lost_cbs.append(lost)

    def on_lost(self, callback: LostCallback) -> None:
        self.events.lost_cbs.append(callback)

    def _need_map(self, name: str, type_name: str) -> None:
        view = self.maps[name]
        if view.type != type_name:
            raise UsageError(f"map {name} is a {view.type}, not a {type_name}")

    # ---- run ---------------------------------------------------------------------------
    def run(self, duration: float | None = None, *, interval: float | None = None,
            on_interval: Callable[[], None] | None = None) -> int | None:
        """Let the target run with the probes in until it exits (returns its exit status,
        -signal if killed), ``duration`` seconds pass or Ctrl-C/SIGTERM arrives (None); then
        detach.  ``on_interval()`` is called about every ``interval`` seconds meanwhile, at a
        point where no program runs (read or clear maps there)."""
        if not self.links:
            raise UsageError("run: nothing is attached (attach_uprobe/attach_usdt/attach_auto first)")
        if interval is not None and interval <= 0:
            raise UsageError(f"interval must be positive, not {interval}")
        status = self._backend.run(duration, on_interval, interval)
        self.exit_status = status
        return status

    def poll(self) -> None:
        """Deliver buffered events now (they are also delivered while ``run`` runs)."""
        if self._backend is not None:
            self._backend.drain()

    def detach(self) -> None:
        """Remove every probe (the target keeps running); maps stay readable."""
        if self._backend is not None:
            self._backend.detach()
        self.links = []

    def close(self) -> None:
        """Detach and free everything (a launched target that never ran is killed)."""
        if self._backend is not None:
            self._backend.detach()
            self._backend.close()

    def __enter__(self) -> BPFObject:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- reports (used by ubpf-run) ----------------------------------------------------
    @property
    def backend(self) -> Any:
        """The backend object (``live.tracing.UserspaceBackend`` or ``kernel.api_backend.KernelBackend``)."""
        return self._get_backend()
