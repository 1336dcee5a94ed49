"""Output formatting: trace_pipe lines, bpftrace-style histograms, JSON lines, attach parsing."""

from __future__ import annotations

import io
import json

import pytest

from ubpf_py.errors import UsageError
from ubpf_py.live.attach import AttachRequest, parse_attach_option, plan_attachments
from ubpf_py.obj.spec import AttachPoint, ObjectSpec, ProgramSpec
from ubpf_py.output.dump import GlobalDump, MapDump
from ubpf_py.output.hist import render_log2_hist, slot_label
from ubpf_py.output.trace import format_trace_line
from ubpf_py.output.values import ValueDecoder
from ubpf_py.output.writers import JsonWriter, TextWriter


def test_trace_line_layout_matches_trace_pipe():
    line = format_trace_line("hello", 5820, 1, 12_345_678_901_234, "add(1, 2)")
    assert line == "           hello-5820    [001] ..... 12345.678901: bpf_trace_printk: add(1, 2)"


def test_hist_labels_and_bars():
    assert [slot_label(i) for i in (0, 1, 10, 11, 20)] == ["[0, 2)", "[2, 4)", "[1K, 2K)", "[2K, 4K)", "[1M, 2M)"]
    vals = [0] * 16
    vals[5], vals[6], vals[8] = 20, 10, 5
    lines = render_log2_hist(vals)
    assert len(lines) == 4  # slots 5..8, zero slot 7 included
    assert lines[0].startswith("[32, 64)") and lines[0].count("@") == 52
    assert lines[1].count("@") == 26 and lines[2].count("@") == 0
    assert render_log2_hist([0] * 8) == ["(empty)"]


def _dump(**kw) -> MapDump:
    base = dict(name="counts", type_name="hash", key_size=4, value_size=8, max_entries=16, internal=False,
                key_type_id=0, value_type_id=0, entries=[(b"\1\0\0\0", (5).to_bytes(8, "little")),
                                                       (b"\2\0\0\0", (2).to_bytes(8, "little"))])
    base.update(kw)
    return MapDump(**base)


def test_text_writer_sorts_counters_and_draws_histograms():
    out = io.StringIO()
    w = TextWriter(out, ValueDecoder(None))
    w.map_dump(_dump())
    hist = [(i.to_bytes(4, "little"), (3 if i == 4 else 0).to_bytes(8, "little")) for i in range(10)]
    w.map_dump(_dump(name="lat_hist", type_name="array", max_entries=10, entries=hist))
    text = out.getvalue()
    assert text.index("@counts[2]: 2") < text.index("@counts[1]: 5")
    assert "@lat_hist:" in text and "[16, 32)" in text


def test_json_writer_events_round_trip():
    out = io.StringIO()
    w = JsonWriter(out, ValueDecoder(None))
    w.printk("hello", 10, 11, 0, 5, "msg")
    w.record("ringbuf", "rb", None, b"\x01\x02")
    w.map_dump(_dump(type_name="percpu_hash", entries=[(b"\0" * 4, [b"\1" + b"\0" * 7, b"\2" + b"\0" * 7])]))
    w.global_var(GlobalDump("total", ".bss", (7).to_bytes(8, "little"), 0))
    w.target_exit(10, 0, None)
    evs = [json.loads(x) for x in out.getvalue().splitlines()]
    assert [e["event"] for e in evs] == ["printk", "record", "map", "global", "exit"]
    assert evs[1]["data"] == "0102"
    assert evs[2]["entries"] == [["00000000", ["0100000000000000", "0200000000000000"]]]
    assert evs[2]["decoded"] == [[0, [1, 2]]]
    assert evs[3]["value"] == 7


def _spec() -> ObjectSpec:
    progs = {
        "entry": ProgramSpec("entry", "uprobe", "uprobe", []),
        "ret": ProgramSpec("ret", "uretprobe/./app:f", "uretprobe", [], attach=AttachPoint("./app", "f")),
        "probe": ProgramSpec("probe", "usdt", "usdt", []),
    }
    return ObjectSpec("x.o", progs, [])


def test_attach_option_forms():
    spec = _spec()
    r = parse_attach_option("entry=./app:func+0x10@0x400", spec)
    assert (r.program, r.binary, r.function, r.offset, r.cookie, r.retprobe) == ("entry", "./app", "func", 16, 1024,
                                                                              False)
    r = parse_attach_option("entry=libc.so.6:malloc", spec)
    assert (r.binary, r.function) == ("libc.so.6", "malloc")
    r = parse_attach_option("probe=./app:corpus:tick@77", spec)
    assert r.usdt == ("corpus", "tick") and r.cookie == 77
    assert parse_attach_option("ret=./app:f", spec).retprobe


@pytest.mark.parametrize("bad", ["entry", "entry=", "entry=app", "nope=./a:f", "entry=./a:f+x", "probe=./a:f"])
def test_attach_option_errors(bad):
    with pytest.raises(UsageError, match="--attach"):
        parse_attach_option(bad, _spec())


def test_plan_auto_and_explicit():
    spec = _spec()
    plan = plan_attachments(spec, [AttachRequest("entry", "./app", "g")])
    assert [(r.program, r.origin) for r in plan] == [("entry", "option"), ("ret", "section")]
    assert plan[1].describe() == "uretprobe ./app:f+0 cookie=0"
    assert [r.program for r in plan_attachments(spec, [], auto=False)] == []
