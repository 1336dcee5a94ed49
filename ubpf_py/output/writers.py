"""Text and JSON-lines writers for everything ubpf-run reports.

Both writers get the same calls in the same order; the text writer is for
people (trace_pipe lines, bpftrace-like map dumps, histograms), the JSON writer
for programs (one object per line with an ``"event"`` field).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, TextIO

from ubpf_py.output.dump import GlobalDump, MapDump
from ubpf_py.output.hist import (
    map_histograms,
    render_hist,
    slot_label,
    slot_lower_bound,
    slot_upper_bound,
    slots_of,
)
from ubpf_py.output.trace import format_trace_line
from ubpf_py.output.values import ValueDecoder


class Writer:
    """Common state: the output stream and a BTF value decoder."""

    def __init__(self, out: TextIO | None = None, decoder: ValueDecoder | None = None,
                 err: TextIO | None = None) -> None:
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.decoder = decoder or ValueDecoder(None)
        #: turns user addresses into function+offset (file:line); set once the target's maps are known
        self.symbolizer: Any = None
        #: ``--hist``: map or global name -> "log2" | "linear"
        self.hist_modes: dict[str, str] = {}

    def stack_lines(self, d: MapDump, value: bytes) -> list[str]:
        """A stack-trace map value (u64 addresses) as symbolised frames, innermost first."""
        addrs = [int.from_bytes(value[i:i + 8], "little") for i in range(0, len(value) - 7, 8)]
        while addrs and not addrs[-1]:
            addrs.pop()
        if self.symbolizer is None:
            return [hex(a) for a in addrs]
        return self.symbolizer.format_stack(addrs)

    def flush(self) -> None:
        self.out.flush()


class TextWriter(Writer):
    def note(self, text: str) -> None:
        print(f"ubpf-run: {text}", file=self.err, flush=True)

    def attached(self, program: str, target: str, detail: str = "", path: str = "", reason: str = "") -> None:
        how = f" [{path}{': ' + reason if reason else ''}]" if path else ""
        self.note(f"attached {program} to {target}" + (f" ({detail})" if detail else "") + how)

    def printk(self, comm: str, tgid: int, tid: int, cpu: int, ts_ns: int, message: str) -> None:
        print(format_trace_line(comm, tid, cpu, ts_ns, message), file=self.out, flush=True)

    def record(self, kind: str, map_name: str, cpu: int | None, data: bytes, fields: Any = None) -> None:
        head = f"{kind} {map_name}" + (f" cpu={cpu}" if cpu is not None else "")
        if fields is not None:
            from ubpf_py.obj.btf_format import render

            print(f"{head}: {render(fields)}", file=self.out, flush=True)
        else:
            print(f"{head}: {len(data)} bytes", file=self.out)
            for line in hexdump(data):
                print(f"    {line}", file=self.out)
            self.out.flush()

    def lost(self, kind: str, map_name: str, count: int) -> None:
        self.note(f"{count} {kind} records lost from map {map_name}")

    def target_exit(self, pid: int, exit_code: int | None, signal: int | None) -> None:
        how = f"exited with status {exit_code}" if signal is None else f"was killed by signal {signal}"
        self.note(f"target {pid} {how}")

    def proc_maps(self, pid: int, maps: list[dict]) -> None:
        """Text output does not print the target's memory map."""

    def map_dump(self, d: MapDump) -> None:
        if not d.entries or d.internal:  # global data is printed variable by variable
            return
        hists = map_histograms(d, self.decoder, self.hist_modes.get(d.name))
        if hists is not None:
            for h in hists:
                print(f"\n@{d.name}" + (f"[{h.key}]" if h.key is not None else "") + ":", file=self.out)
                for line in render_hist(h.slots, h.kind):
                    print(line, file=self.out)
            return
        shown = [(k, v) for k, v in d.entries if not _all_zero(v)]
        if not shown:
            return
        print(f"\n@{d.name} ({d.type_name}):", file=self.out)
        if d.type_name == "stack_trace":
            for k, v in shown:
                print(f"@{d.name}[{int.from_bytes(k[:4], 'little')}]:", file=self.out)
                for line in self.stack_lines(d, v):
                    print(f"        {line}", file=self.out)
            return
        for k, v in _sorted_by_count(shown, d):
            key = self.decoder.text(d.key_type_id, k, d.key_size)
            if isinstance(v, list):
                total = self.decoder.sum_percpu(d.value_type_id, v, d.value_size)
                val = total if total is not None else "[" + ", ".join(
                    self.decoder.text(d.value_type_id, x, d.value_size) for x in v) + "]"
            else:
                val = self.decoder.text(d.value_type_id, v, d.value_size)
            print(f"@{d.name}[{key}]: {val}", file=self.out)

    def global_var(self, g: GlobalDump) -> None:
        if _all_zero(g.data) or g.static_const:  # static constants (printk formats) say nothing new
            return
        value = self.decoder.value(g.type_id, g.data)
        slots = slots_of(value)
        forced = self.hist_modes.get(g.name)
        if forced and slots is None and isinstance(value, list) and all(isinstance(x, int) for x in value):
            slots = value
        if slots is not None:
            print(f"\n{g.name}:", file=self.out)
            for line in render_hist(slots, forced or "log2"):
                print(line, file=self.out)
            return
        print(f"{g.name} = {self.decoder.text(g.type_id, g.data, len(g.data))}", file=self.out)

    def stats(self, stats: dict) -> None:
        for line in stats.get("lines", []):
            self.note(line)

    def interval(self, when: float, dumps: list[MapDump], globals_: list[GlobalDump]) -> None:
        """One ``--interval`` print: a wall-clock header (libbpf-tools' ``%H:%M:%S``), then the
        maps and globals."""
        print(f"\n{time.strftime('%H:%M:%S', time.localtime(when))}", file=self.out)
        for d in dumps:
            self.map_dump(d)
        for g in globals_:
            self.global_var(g)
        self.out.flush()

    def close(self) -> None:
        self.out.flush()


class JsonWriter(Writer):
    """One JSON object per line; see docs/OUTPUT.md for the event kinds."""

    def _emit(self, obj: dict) -> None:
        self.out.write(json.dumps(obj, separators=(",", ":")) + "\n")
        self.out.flush()

    def note(self, text: str) -> None:
        self._emit({"event": "note", "message": text})

    def attached(self, program: str, target: str, detail: str = "", path: str = "", reason: str = "") -> None:
        self._emit({"event": "attached", "program": program, "target": target, "err": 0, "detail": detail,
                    "path": path, "path_reason": reason})

    def printk(self, comm: str, tgid: int, tid: int, cpu: int, ts_ns: int, message: str) -> None:
        # trace_pipe ends every message with one newline whether the program wrote it or not, so the
        # kernel cannot tell "x\n" from "x": both backends report the text without it
        self._emit({"event": "printk", "comm": comm, "pid": tgid, "tid": tid, "cpu": cpu,
                    "timestamp_ns": ts_ns, "message": message.removesuffix("\n")})

    def record(self, kind: str, map_name: str, cpu: int | None, data: bytes, fields: Any = None) -> None:
        obj = {"event": "record", "kind": kind, "map": map_name, "data": data.hex()}
        if cpu is not None:
            obj["cpu"] = cpu
        if fields is not None:
            obj["fields"] = fields
        self._emit(obj)

    def lost(self, kind: str, map_name: str, count: int) -> None:
        self._emit({"event": "lost", "kind": kind, "map": map_name, "count": count})

    def target_exit(self, pid: int, exit_code: int | None, signal: int | None) -> None:
        self._emit({"event": "exit", "pid": pid, "exit_code": exit_code, "signal": signal})

    def proc_maps(self, pid: int, maps: list[dict]) -> None:
        self._emit({"event": "proc_maps", "pid": pid, "maps": maps})

    def map_dump(self, d: MapDump) -> None:
        self._emit(self._map_obj(d))

    def interval(self, when: float, dumps: list[MapDump], globals_: list[GlobalDump]) -> None:
        """One ``--interval`` print as one record: wall-clock time, every map and global."""
        self._emit({"event": "interval", "timestamp": when,
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when)) + f".{int(when % 1 * 1e6):06d}Z",
                    "maps": [self._map_obj(d) for d in dumps],
                    "globals": [self._global_obj(g) for g in globals_]})

    def _map_obj(self, d: MapDump) -> dict:
        entries = None
        decoded = None
        if d.entries is not None:
            entries = [[k.hex(), [x.hex() for x in v] if isinstance(v, list) else v.hex()] for k, v in d.entries]
            decoded = [[self.decoder.value(d.key_type_id, k), [self.decoder.value(d.value_type_id, x) for x in v]
                        if isinstance(v, list) else self.decoder.value(d.value_type_id, v)]
                       for k, v in d.entries]
        obj = {"event": "map", "name": d.name, "type": d.type_name, "key_size": d.key_size,
               "value_size": d.value_size, "max_entries": d.max_entries, "internal": d.internal,
               "entries": entries, "decoded": decoded}
        hists = map_histograms(d, self.decoder, self.hist_modes.get(d.name))
        if hists:
            obj["hist"] = [{"key": h.key_value, "kind": h.kind,
                            "buckets": [{"label": slot_label(i, h.kind), "min": slot_lower_bound(i, h.kind),
                                         "max": slot_upper_bound(i, h.kind), "count": c}
                                        for i, c in enumerate(h.slots) if c]} for h in hists]
        if d.type_name == "stack_trace" and d.entries:
            obj["stacks"] = {str(int.from_bytes(k[:4], "little")): self.stack_lines(d, v) for k, v in d.entries}
        return obj

    def global_var(self, g: GlobalDump) -> None:
        self._emit(self._global_obj(g))

    def _global_obj(self, g: GlobalDump) -> dict:
        return {"event": "global", "name": g.name, "map": g.map_name, "data": g.data.hex(),
                "value": self.decoder.value(g.type_id, g.data)}

    def stats(self, stats: dict) -> None:
        self._emit({"event": "stats", **{k: v for k, v in stats.items() if k != "lines"}})

    def close(self) -> None:
        self.out.flush()


def hexdump(data: bytes) -> list[str]:
    lines = []
    for off in range(0, len(data), 16):
        chunk = data[off:off + 16]
        hexpart = " ".join(f"{b:02x}" for b in chunk)
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        lines.append(f"{off:04x}  {hexpart:<47}  {text}")
    return lines


def _all_zero(v: Any) -> bool:
    if isinstance(v, list):
        return all(_all_zero(x) for x in v)
    return not any(v)


def _sorted_by_count(entries: list[tuple[bytes, Any]], d: MapDump) -> list[tuple[bytes, Any]]:
    """Counter-like maps (integer values) sorted ascending by value, like bpftrace."""
    if d.value_size not in (1, 2, 4, 8):
        return entries

    def count(item: tuple[bytes, Any]) -> int:
        v = item[1]
        vals = v if isinstance(v, list) else [v]
        return sum(int.from_bytes(x, "little") for x in vals)

    return sorted(entries, key=count)


def make_writer(fmt: str, out: TextIO | None, decoder: ValueDecoder) -> Writer:
    if fmt == "json":
        return JsonWriter(out, decoder)
    return TextWriter(out, decoder)
