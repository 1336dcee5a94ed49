"""Program output of the userspace backend (printk, ring buffers, perf buffers) -> an event sink.

The sink has the writers' three calls (``printk``, ``record``, ``lost``); the CLI
passes a writer, the Python API a router to user callbacks.  Drained after every
Python-path hit and, for programs that run from the C stop loop, from the loop's
poll hook (see ``live.hitpath``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from ubpf_py.errors import UbpfError
from ubpf_py.live.collection import Collection
from ubpf_py.output.values import ValueDecoder
from ubpf_py.vm.env import HitContext


class EventSink(Protocol):
    def printk(self, comm: str, tgid: int, tid: int, cpu: int, ts_ns: int, message: str) -> None: ...

    def record(self, kind: str, map_name: str, cpu: int | None, data: bytes, fields: Any = None) -> None: ...

    def lost(self, kind: str, map_name: str, count: int) -> None: ...


@dataclass
class OutputPump:
    """Moves program output to the sink."""

    sink: EventSink
    collection: Collection
    ringbufs: list[Any] = field(default_factory=list)
    perfbufs: list[Any] = field(default_factory=list)
    decoder: ValueDecoder | None = None
    event_type_id: int = 0
    #: the in-target runtime's printk ring (``intarget.printk_ring``): programs running inside
    #: the target print through it, formatted here exactly as the ptrace path formats
    printk_ring: Any = None

    def __post_init__(self) -> None:
        for m in self.collection.map_list:
            if m.spec.type_name == "ringbuf":
                self.ringbufs.append(m)
            elif m.spec.type_name == "perf_event_array":
                self.perfbufs.append(m)
        #: each perf buffer's sample count at the last drain (new samples -> something to read)
        self.perf_seen = [m.samples for m in self.perfbufs]

    @property
    def has_buffers(self) -> bool:
        return bool(self.ringbufs or self.perfbufs or self.printk_ring is not None)

    def printk(self, hit: HitContext, message: str) -> None:
        comm = hit.comm.decode(errors="replace") if isinstance(hit.comm, bytes) else str(hit.comm)
        self.sink.printk(comm, hit.tgid, hit.tid, hit.cpu, time.monotonic_ns(), message)

    def drain(self) -> None:
        """Deliver what the programs wrote.  Called after every hit on the Python path, so an
        empty buffer costs one integer comparison and builds nothing."""
        pr = self.printk_ring
        if pr is not None and pr.avail():
            from ubpf_py.intarget.printk_ring import events

            for ev in events(pr.records()):
                self.sink.printk(ev.comm.rstrip(b"\0").decode(errors="replace"), ev.tgid, ev.tid, ev.cpu,
                                 ev.ktime_ns, ev.text)
        for m in self.ringbufs:
            if m.avail():
                for data in m.records():
                    self.sink.record("ringbuf", m.spec.name, None, bytes(data), self._fields(data))
        for i, m in enumerate(self.perfbufs):
            if m.samples != self.perf_seen[i]:
                self.perf_seen[i] = m.samples
                for cpu, data in m.consume():
                    self.sink.record("perfbuf", m.spec.name, cpu, bytes(data), self._fields(data, perf=True))

    def _fields(self, data: bytes, perf: bool = False) -> Any:
        """Decode a record: the event type, else the only BTF struct of the record's size, else the
        only DWARF struct of that size (clang leaves stack-only structs out of BTF), else None."""
        if self.decoder is None:
            return None
        return decode_record(self.decoder, self.collection.spec.path, bytes(data), self.event_type_id, perf)

    def report_lost(self) -> None:
        for m in self.ringbufs + self.perfbufs:
            lost = int(getattr(m, "dropped", 0) or getattr(m, "lost", 0) or 0)
            if lost:
                kind = "ringbuf" if m in self.ringbufs else "perfbuf"
                self.sink.lost(kind, m.spec.name, lost)


def decode_record(decoder: ValueDecoder, obj_path: str, data: bytes, type_id: int = 0, perf: bool = False) -> Any:
    """A ring/perf record as a Python value (see ``OutputPump._fields``), or None."""
    tid = type_id or decoder.unique_struct_of_size(len(data))
    if tid:
        return decoder.value(tid, data)
    from ubpf_py.obj.dwarf_types import find_struct_by_size

    try:
        layout = find_struct_by_size(obj_path, len(data), slack=7 if perf else 0)
    except UbpfError:
        return None
    return layout.decode(data) if layout is not None else None
