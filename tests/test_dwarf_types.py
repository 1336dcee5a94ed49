"""Struct layouts from BPF objects' DWARF, checked against the corpus manifest's event layouts."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
from bpf_build import compile_bpf
from paths import CORPUS

from ubpf_py.errors import ObjectLoadError
from ubpf_py.obj.dwarf_types import ArrayType, IntType, StructLayout, find_struct_by_size, struct_layouts

FAKE_PID = 4242


def _manifest_events(case: str) -> dict[str, Any]:
    manifest = json.loads((CORPUS / "manifest.json").read_text())
    case_doc = next(c for c in manifest["cases"] if c["name"] == case)
    return case_doc["expect"]["events"][0]


def _leaves(t: Any, off: int, path: tuple) -> list[tuple[tuple, int, int, Any]]:
    """(path, offset, size, type) of every scalar; char arrays are one leaf, other arrays per element."""
    if isinstance(t, StructLayout):
        out = []
        for m in t.members:
            out += _leaves(m.type, off + m.offset, (*path, m.name) if m.name else path)
        return out
    if isinstance(t, ArrayType) and not (isinstance(t.elem, IntType) and t.elem.char):
        esz = t.elem.size
        return [leaf for i in range(t.dims[0]) for leaf in _leaves(t.elem, off + i * esz, (*path, i))]
    return [(path, off, t.size, t)]


def _get(d: Any, path: tuple) -> Any:
    for p in path:
        d = d[p]
    return d


def _pack(layout: list, record: dict, size: int) -> bytearray:
    """Bytes of a manifest record, written through the manifest's (kernel-checked) layout."""
    buf = bytearray(size)
    for name, typ, off, sz in layout:
        if name not in record:
            continue
        v = record[name]
        if typ == "str":
            raw = v.encode()[: sz - 1]
            buf[off:off + len(raw)] = raw
            continue
        v = FAKE_PID if v == "$PID" else int(v, 0) if isinstance(v, str) else v
        buf[off:off + sz] = v.to_bytes(sz, "little", signed=typ.startswith("i"))
    return buf


def _expected(typ: str, v: Any) -> Any:
    if typ == "str":
        return v
    return FAKE_PID if v == "$PID" else int(v, 0) if isinstance(v, str) else v


@pytest.mark.parametrize("case,obj,struct_name,names", [
    ("ringbuf", "ringbuf.bpf.o", "event", ["pid", "kind", "u", "name"]),
    ("readline", "readline.bpf.o", "event", ["pid", "comm", "line"]),
])
def test_event_struct_matches_manifest(corpus_build: Path, case: str, obj: str, struct_name: str,
                                       names: list[str]) -> None:
    ev = _manifest_events(case)
    path = corpus_build / obj
    layouts = struct_layouts(path)
    s = layouts[struct_name]
    assert [m.name for m in s.members] == names  # names read through relocated .debug_str_offsets
    assert s.size == ev["size"]
    assert find_struct_by_size(path, ev["size"]) is s

    # every field of the manifest's layout is a leaf of ours at the same offset and size
    leaves = _leaves(s, 0, ())
    where = {}
    for name, typ, off, sz in ev["layout"]:
        match = [lf for lf in leaves if lf[1] == off and lf[2] == sz]
        assert match, f"manifest field {name} ({off}, {sz}) has no DWARF member"
        leaf_path, _o, _s, t = match[0]
        if typ == "str":
            assert isinstance(t, ArrayType) and t.elem.char
        else:
            assert isinstance(t, IntType) and t.signed == typ.startswith("i"), name
        where[name] = leaf_path

    for rec in ev["records"]:
        data = bytes(_pack(ev["layout"], rec, ev["size"]))
        decoded = s.decode(data)
        assert set(decoded) == set(names)
        for name, typ, _off, _sz in ev["layout"]:
            if name in rec:
                assert _get(decoded, where[name]) == _expected(typ, rec[name]), (name, rec)


def test_ringbuf_union_decodes_both_views(corpus_build: Path) -> None:
    s = struct_layouts(corpus_build / "ringbuf.bpf.o")["event"]
    data = struct.pack("<IIq32s", 7, 2, -1, b"via-output")
    d = s.decode(data)
    assert d == {"pid": 7, "kind": 2, "u": {"ival": -1, "pair": [0xFFFFFFFF, 0xFFFFFFFF]}, "name": "via-output"}
    assert s.text(data) == ('{ .pid = 7, .kind = 2, .u = { .ival = -1, .pair = [4294967295, 4294967295] }, '
                            '.name = "via-output" }')
    with pytest.raises(ObjectLoadError, match="shorter than struct event"):
        s.decode(data[:40])


def test_perf_padding_slack(corpus_build: Path) -> None:
    path = corpus_build / "readline.bpf.o"
    assert find_struct_by_size(path, 104) is None          # padded sample size, no slack
    found = find_struct_by_size(path, 104, slack=7)
    assert found is not None and found.name == "event" and found.size == 100
    rec = struct.pack("<I16s80s", 9, b"readline", b"echo hello world") + b"\xaa\xbb\xcc\xdd"
    assert found.decode(rec) == {"pid": 9, "comm": "readline", "line": "echo hello world"}


def test_no_struct_of_that_size(corpus_build: Path) -> None:
    assert find_struct_by_size(corpus_build / "ringbuf.bpf.o", 47) is None
    assert find_struct_by_size(corpus_build / "ringbuf.bpf.o", 0) is None


_SOURCE = r"""
#include <stdbool.h>
typedef unsigned int u32;
enum color { RED = 1, GREEN = 2, NEG = -3 };
struct pair8 { int a; int b; };
struct other8 { long x; };
typedef struct { unsigned short port; unsigned char proto; } flow_t;
struct rec {
    signed char sc;
    bool flag;
    unsigned int lo4 : 4;
    int neg3 : 3;
    enum color c;
    const char *ptr;
    double ratio;
    unsigned short grid[2][3];
    union { long big; u32 halves[2]; };
    struct pair8 nested;
    flow_t flow;
    char tag[5];
};
int use(struct rec *r, struct pair8 *p, struct other8 *o, flow_t *f)
{
    return r->sc + p->a + (int)o->x + f->port;
}
"""


@pytest.fixture(scope="module")
def custom_objects(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("dwarf")
    with_g = compile_bpf(_SOURCE, d, "g", debug=True)
    without_g = compile_bpf(_SOURCE, d, "nog", debug=False)
    return with_g, without_g


def test_types_of_every_kind(custom_objects: tuple[Path, Path]) -> None:
    obj, _ = custom_objects
    layouts = struct_layouts(obj)
    assert {"rec", "pair8", "other8", "flow_t"} <= set(layouts)
    rec = layouts["rec"]
    off = {m.name: m.offset for m in rec.members}
    # the C ABI layout (x86-64 and BPF agree), written out so a wrong DWARF reading cannot hide
    assert rec.size == 72
    assert off == {"sc": 0, "flag": 1, "lo4": 0, "neg3": 0, "c": 4, "ptr": 8, "ratio": 16, "grid": 24,
                   "": 40, "nested": 48, "flow": 56, "tag": 60}
    data = bytearray(rec.size)
    data[0] = 0xFE                                            # sc = -2
    data[1] = 1
    # lo4 = 9 in bits 16..19, neg3 = -2 (0b110) in bits 20..22 of the first int
    data[2] = 9 | (0b110 << 4)
    struct.pack_into("<i", data, off["c"], -3)
    struct.pack_into("<Q", data, off["ptr"], 0x7FFF1234)
    struct.pack_into("<d", data, off["ratio"], 0.25)
    struct.pack_into("<6H", data, off["grid"], 1, 2, 3, 4, 5, 6)
    struct.pack_into("<q", data, 40, -5)
    struct.pack_into("<ii", data, off["nested"], 10, -20)
    struct.pack_into("<HB", data, off["flow"], 8080, 6)
    data[off["tag"]:off["tag"] + 5] = b"abcde"                # no NUL: whole array
    d = rec.decode(bytes(data))
    assert d["sc"] == -2 and d["flag"] is True
    assert d["lo4"] == 9 and d["neg3"] == -2
    assert d["c"] == "NEG"
    assert d["ptr"] == "0x7fff1234"
    assert d["ratio"] == 0.25
    assert d["grid"] == [[1, 2, 3], [4, 5, 6]]
    assert d["big"] == -5 and d["halves"] == [0xFFFFFFFB, 0xFFFFFFFF]   # anonymous union merged
    assert d["nested"] == {"a": 10, "b": -20}
    assert d["flow"] == {"port": 8080, "proto": 6}
    assert d["tag"] == "abcde"
    assert rec.text(bytes(data)).startswith("{ .sc = -2, .flag = true, .lo4 = 9, .neg3 = -2, .c = NEG, "
                                            ".ptr = 0x7fff1234, ")


def test_ambiguous_size_and_typedef(custom_objects: tuple[Path, Path]) -> None:
    obj, _ = custom_objects
    assert find_struct_by_size(obj, 8) is None               # pair8 and other8
    flow = find_struct_by_size(obj, 4)
    assert flow is not None and flow.name == "flow_t"


def test_without_dwarf_and_bad_input(custom_objects: tuple[Path, Path], tmp_path: Path) -> None:
    _, nog = custom_objects
    assert struct_layouts(nog) == {}
    assert find_struct_by_size(nog, 8) is None
    bad = tmp_path / "bad.o"
    bad.write_bytes(b"\x7fELF garbage")
    with pytest.raises(ObjectLoadError, match="malformed"):
        struct_layouts(bad)
    with pytest.raises(ObjectLoadError, match="cannot read BPF object"):
        struct_layouts(tmp_path / "missing.o")
