"""What programs emit, delivered to callbacks: printk lines, ring/perf buffer records, losses.

The two backends produce these through one sink interface (``live.pump.EventSink``);
:class:`EventRouter` is that sink for the Python API, calling what the user
registered (``BPFObject.on_printk``, ``ring_buffer``, ``perf_buffer``, ``on_lost``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ubpf_py.kernel.events import PrintkEvent
from ubpf_py.output.trace import format_trace_line


@dataclass(frozen=True, slots=True)
class Record:
    """One ring buffer record or perf buffer sample."""

    #: "ringbuf" or "perfbuf"
    kind: str
    map: str
    #: the CPU a perf sample was written on (None for ring buffers)
    cpu: int | None
    data: bytes
    #: the record decoded through BTF (the event type, or the only struct of its size), else None
    value: Any = None


PrintkCallback = Callable[[PrintkEvent], None]
RecordCallback = Callable[[Record], None]
LostCallback = Callable[[str, str, int], None]


class EventRouter:
    """The API's event sink.  Without an ``on_printk`` callback, printk lines go to stdout in
    trace_pipe format (what ``cat trace_pipe`` would show); records without a callback for
    their map are dropped."""

    def __init__(self) -> None:
        self.printk_cbs: list[PrintkCallback] = []
        self.record_cbs: dict[str | None, list[RecordCallback]] = {}
        self.lost_cbs: list[LostCallback] = []

    def printk(self, comm: str, tgid: int, tid: int, cpu: int, ts_ns: int, message: str) -> None:
        line = format_trace_line(comm, tid, cpu, ts_ns, message)
        if not self.printk_cbs:
            print(line, file=sys.stdout, flush=True)
            return
        ev = PrintkEvent(message, tgid, tid, cpu, comm, ts_ns, line)
        for cb in self.printk_cbs:
            cb(ev)

    def record(self, kind: str, map_name: str, cpu: int | None, data: bytes, fields: Any = None) -> None:
        cbs = self.record_cbs.get(map_name, []) + self.record_cbs.get(None, [])
        if not cbs:
            return
        rec = Record(kind, map_name, cpu, data, fields)
        for cb in cbs:
            cb(rec)

    def lost(self, kind: str, map_name: str, count: int) -> None:
        for cb in self.lost_cbs:
            cb(kind, map_name, count)
