"""BTF parsing (every kind), .BTF.ext, kernel BTF, and the BTF value printer."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from bpf_build import compile_bpf

from ubpf_py.errors import BTFError
from ubpf_py.obj import btf as B
from ubpf_py.obj.btf_builder import PT_REGS_X86_64, BtfBuilder, builtin_btf
from ubpf_py.obj.btf_format import format_value, to_python
from ubpf_py.obj.elf import load_object

KINDS_SRC = r'''
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#define __tag(x) __attribute__((btf_decl_tag(x)))
#define __ttag(x) __attribute__((btf_type_tag(x)))
enum color { RED = 1, GREEN = 2, BLUE = -1 };
union u { int i; float f; };
struct fwd_only;
typedef struct { char comm[16]; } name_t;
struct ev {
    int pid;
    unsigned int flag:1, level:3;
    int neg:4;
    enum color c;
    union u un;
    double d;
    name_t name;
    const volatile long cv;
    long * restrict rp;
    int __ttag("user") *tagged;
    struct fwd_only *fw;
    _Bool ok;
    struct { short x, y; } pt;
    unsigned long long arr[2];
} __tag("ev_tag");
struct ev events[1] SEC(".data.ev");
int handler(struct ev *e, int n) __tag("fn_tag");
__noinline int handler(struct ev *e, int n) { return e->pid + n; }
SEC("uprobe") int p(void *ctx) { return handler(&events[0], 1); }
char LICENSE[] SEC("license") = "GPL";
'''


@pytest.fixture(scope="module")
def kinds_obj(tmp_path_factory: pytest.TempPathFactory):
    return load_object(compile_bpf(KINDS_SRC, tmp_path_factory.mktemp("btf"), "k"))


def test_every_kind_parsed(kinds_obj) -> None:
    btf: B.Btf = kinds_obj.btf
    kinds = {t.kind for t in btf}
    for k in (B.KIND_INT, B.KIND_PTR, B.KIND_ARRAY, B.KIND_STRUCT, B.KIND_UNION, B.KIND_ENUM, B.KIND_FWD,
              B.KIND_TYPEDEF, B.KIND_VOLATILE, B.KIND_CONST, B.KIND_RESTRICT, B.KIND_FUNC, B.KIND_FUNC_PROTO,
              B.KIND_VAR, B.KIND_DATASEC, B.KIND_FLOAT, B.KIND_DECL_TAG, B.KIND_TYPE_TAG):
        assert k in kinds, B.KIND_NAMES[k]
    ev = btf.find("ev", B.KIND_STRUCT)
    assert btf.size_of(ev) == btf.type(ev).size
    assert kinds_obj.globals["events"].map_name == ".data.ev"


def test_member_lookup(kinds_obj) -> None:
    btf: B.Btf = kinds_obj.btf
    ev = btf.find("ev", B.KIND_STRUCT)
    m, off = btf.member(ev, "level")
    assert (m.bitfield_size, off) == (3, 33)
    m, off = btf.member(ev, "neg")
    assert (m.bitfield_size, off) == (4, 36)
    with pytest.raises(BTFError, match="no member 'zzz'"):
        btf.member(ev, "zzz")
    name_t = btf.find("name_t", B.KIND_TYPEDEF)
    assert btf.kind_of(btf.resolve(name_t)) == B.KIND_STRUCT and btf.size_of(name_t) == 16
    m, _ = btf.member(ev, "cv")
    assert btf.kind_of(m.type_id) in (B.KIND_CONST, B.KIND_VOLATILE)
    assert btf.type_name(m.type_id) in ("const volatile long", "volatile const long")
    en = btf.type(btf.find("color", B.KIND_ENUM))
    # clang 14 sets no kflag (signedness) on enums, so -1 reads back as an unsigned 32-bit value
    blue = -1 if en.kflag else 0xFFFFFFFF
    assert [(e.name, e.value) for e in en.enums] == [("RED", 1), ("GREEN", 2), ("BLUE", blue)]
    tags = [t for t in btf if t.kind == B.KIND_DECL_TAG]
    assert {t.name for t in tags} >= {"ev_tag", "fn_tag"}
    assert any(t.kind == B.KIND_TYPE_TAG and t.name == "user" for t in btf)
    fn = btf.type(btf.find("handler", B.KIND_FUNC))
    proto = btf.type(fn.type_id)
    assert [p.name for p in proto.params] == ["e", "n"] and fn.linkage == 1
    assert btf.align_of(ev) == 8


def test_format_struct(kinds_obj) -> None:
    btf: B.Btf = kinds_obj.btf
    ev = btf.find("ev", B.KIND_STRUCT)
    size = btf.size_of(ev)
    buf = bytearray(size)

    def put(name: str, fmt: str, v) -> None:
        _, off = btf.member(ev, name)
        struct.pack_into(fmt, buf, off // 8, v)
    put("pid", "<i", -7)
    # flag:1 = 1 at bit 32, level:3 = 5 at bit 33, neg:4 = -3 at bit 36
    struct.pack_into("<I", buf, 4, 1 | (5 << 1) | ((-3 & 0xF) << 4))
    put("c", "<i", -1)
    put("d", "<d", 2.5)
    _, off = btf.member(ev, "name")
    buf[off // 8:off // 8 + 5] = b"bash\0"
    put("rp", "<Q", 0xDEADBEEF)
    put("ok", "<B", 1)
    _, off = btf.member(ev, "pt")
    struct.pack_into("<hh", buf, off // 8, 3, -4)
    _, off = btf.member(ev, "arr")
    struct.pack_into("<QQ", buf, off // 8, 10, 20)
    v = to_python(btf, ev, bytes(buf))
    assert v["pid"] == -7 and v["flag"] == 1 and v["level"] == 5 and v["neg"] == -3
    assert v["c"] == "BLUE" and v["d"] == 2.5 and v["name"] == {"comm": "bash"}
    assert v["rp"] == "0xdeadbeef" and v["ok"] is True and v["pt"] == {"x": 3, "y": -4} and v["arr"] == [10, 20]
    text = format_value(btf, ev, bytes(buf))
    assert text.startswith("{ .pid = -7, .flag = 1, .level = 5, .neg = -3, .c = BLUE,")
    assert '.name = { .comm = "bash" }' in text and ".rp = 0xdeadbeef" in text and ".ok = true" in text
    with pytest.raises(BTFError, match="needs"):
        to_python(btf, ev, bytes(4))


def test_btf_ext_records(corpus_build: Path) -> None:
    spec = load_object(corpus_build / "calls.bpf.o")
    ext = spec.btf_ext
    assert [r.insn_off for r in ext.func_info["uprobe"]] == [0, 13 * 8, 26 * 8]
    assert len(ext.func_info[".text"]) == 3
    names = {spec.btf.type(r.type_id).name for r in ext.func_info[".text"]}
    assert names == {"square", "triangle", "loop_cb"}
    lines = ext.line_info["uprobe"]
    assert all(li.file_name.endswith("calls.bpf.c") for li in lines)
    assert any("bpf_tail_call" in li.line for li in lines)


@pytest.mark.parametrize("obj", ["calls", "cookie_multi", "counters", "forks", "funclat", "go_args", "hello",
                                 "hello_auto", "mallocs", "printk_formats", "readline", "ringbuf", "rust_args",
                                 "sharedlib", "usdt"])
def test_pretty_print_every_corpus_map(corpus_build: Path, obj: str) -> None:
    """Keys and values of every map with BTF types print; global data shows its variables."""
    spec = load_object(corpus_build / f"{obj}.bpf.o")
    btf = spec.btf
    for m in spec.maps:
        if m.key_type_id:
            key = bytes(range(1, m.key_size + 1))
            v = to_python(btf, m.key_type_id, key)
            assert v == int.from_bytes(key, "little", signed=btf.resolved(m.key_type_id).is_signed)
            assert format_value(btf, m.key_type_id, key) == str(v)
        if m.value_type_id:
            data = m.data if m.data is not None else bytes(m.value_size)
            v = to_python(btf, m.value_type_id, data)
            text = format_value(btf, m.value_type_id, data)
            assert text
            if m.internal:
                names = {g.name for g in spec.globals.values() if g.map_name == m.name}
                names |= {g.name for g in spec.kconfig.values() if g.map_name == m.name}
                assert set(v) == names
    if obj == "hello":
        ro = spec.map_by_name("hello.rodata")
        assert format_value(btf, ro.value_type_id, ro.data) == \
            '{ .____add_entry.____fmt = "add(%d, %d)", .____add_exit.____fmt = "add returned %d" }'
    if obj == "calls":
        res = spec.map_by_name("results")
        val = struct.pack("<5Q", 4, 10, 14, 30, 0xE0E4)
        assert format_value(btf, res.value_type_id, val) == \
            "{ .square = 4, .tri = 10, .loop_sq = 14, .bpf_loop_sum = 30, .tail_tag = 57572 }"
    if obj == "usdt":
        specs = spec.map_by_name("__bpf_usdt_specs")
        v = to_python(btf, specs.value_type_id, bytes(specs.value_size))
        assert v["args"][0]["arg_type"] == "BPF_USDT_ARG_CONST" and len(v["args"]) == 12


def test_builder_roundtrip_and_builtin() -> None:
    b = BtfBuilder()
    i32 = b.int("int", 4, signed=True)
    ch = b.int("char", 1, signed=True, char=True)
    arr = b.array(ch, i32, 4)
    st = b.struct("s", 8, [("a", i32, 0), ("name", arr, 32)])
    td = b.typedef("s_t", st)
    btf = b.build()
    assert len(btf) == 6 and btf.find("s_t") == td
    assert format_value(btf, td, struct.pack("<i", 5) + b"ab\0\0") == '{ .a = 5, .name = "ab" }'
    pr = builtin_btf()
    regs = pr.find("pt_regs", B.KIND_STRUCT)
    assert pr.size_of(regs) == 168
    assert [m.name for m in pr.type(regs).members] == list(PT_REGS_X86_64)
    assert pr.member(regs, "di")[1] == 14 * 64


def test_malformed_btf() -> None:
    good = BtfBuilder()
    good.int("int", 4)
    data = good.encode()
    with pytest.raises(BTFError, match="magic"):
        B.Btf(b"\x00\x00" + data[2:])
    with pytest.raises(BTFError, match=r"truncated|past the end"):
        B.Btf(data[:30])
    bad = bytearray(data)
    struct.pack_into("<I", bad, 24 + 4, 31 << 24)  # kind 31 does not exist
    with pytest.raises(BTFError, match="unknown BTF kind"):
        B.Btf(bytes(bad))
    btf = B.Btf(data)
    with pytest.raises(BTFError, match=r"no BTF type \[9\]"):
        btf.type(9)


def test_kernel_btf() -> None:
    kb = B.load_kernel_btf()
    if kb is None:
        pytest.skip("/sys/kernel/btf/vmlinux not readable")
    assert B.load_kernel_btf() is kb  # cached
    regs = kb.find("pt_regs", B.KIND_STRUCT)
    assert kb.size_of(regs) == 168
    assert kb.member(regs, "ip")[1] == 16 * 64 and kb.member(regs, "sp")[1] == 19 * 64
    ts = kb.find("task_struct", B.KIND_STRUCT)
    assert kb.size_of(ts) > 1000 and kb.member(ts, "pid")[0].name == "pid"
