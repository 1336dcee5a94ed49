"""ELF loader: every corpus object, section rules, relocations, globals, errors.

Expected values were checked by hand against ``bpftool btf dump file X``,
``llvm-objdump -dr X`` and the kernel oracle's JSON (map names/sizes).
"""

from __future__ import annotations

import struct
import warnings
from pathlib import Path

import pytest
from bpf_build import compile_bpf

from ubpf_py.errors import ObjectLoadError, RelocationError
from ubpf_py.isa.opcodes import (
    BPF_PSEUDO_CALL,
    BPF_PSEUDO_FUNC,
    BPF_PSEUDO_MAP_IDX,
    BPF_PSEUDO_MAP_IDX_VALUE,
    LDDW,
)
from ubpf_py.obj.elf import load_object
from ubpf_py.obj.globals import freeze, get_global, set_global
from ubpf_py.obj.kconfig import kernel_version_code
from ubpf_py.obj.mapdefs import internal_map_name, object_name, possible_cpus
from ubpf_py.obj.sections import SkippedProgramWarning, classify_section
from ubpf_py.obj.spec import AttachPoint

# object -> (programs {name: (kind, section)}, maps [(name, type, key, value, max_entries)], globals)
CORPUS = {
    "calls": ({"tail_even": ("uprobe", "uprobe"), "tail_odd": ("uprobe", "uprobe"),
               "compute_entry": ("uprobe", "uprobe")},
              [("jmp_table", "prog_array", 4, 4, 2), ("results", "hash", 4, 40, 64)], []),
    "cookie_multi": ({"multi": ("uprobe", "uprobe")},
                     [("hits", "hash", 8, 8, 16), ("ips", "hash", 8, 8, 16)], []),
    "counters": ({"tick_entry": ("uprobe", "uprobe")},
                 [("pcpu_calls", "percpu_array", 4, 8, 1), ("per_thread", "hash", 4, 8, 64),
                  ("recent", "lru_hash", 4, 8, 8), ("counters.data", "array", 4, 8, 1),
                  ("counters.bss", "array", 4, 24, 1)],
                 ["data_calls", "total", "milestones", "init_flag", "init_winners"]),
    "forks": ({"probed_entry": ("uprobe", "uprobe")}, [("calls", "hash", 4, 8, 64)], []),
    "funclat": ({"work_entry": ("uprobe", "uprobe"), "work_exit": ("uretprobe", "uretprobe")},
                [("starts", "hash", 8, 8, 1024), ("hist_map", "array", 4, 8, 32),
                 ("funclat.rodata", "array", 4, 4, 1), ("funclat.bss", "array", 4, 264, 1)],
                ["targ_tgid", "hist", "total_calls"]),
    "go_args": ({"go_compute_e": ("uprobe", "uprobe")},
                [("args_seen", "hash", 8, 8, 64), ("go_args.rodata", "array", 4, 15, 1)],
                ["go_compute_e.____fmt"]),
    "hello": ({"add_entry": ("uprobe", "uprobe"), "add_exit": ("uretprobe", "uretprobe")},
              [("hello.rodata", "array", 4, 28, 1)], ["____add_entry.____fmt", "____add_exit.____fmt"]),
    "hello_auto": ({"add_entry": ("uprobe", "uprobe/./hello:add"), "add_exit": ("uretprobe", "uretprobe/./hello:add")},
                   [("hello_au.rodata", "array", 4, 28, 1)], ["____add_entry.____fmt", "____add_exit.____fmt"]),
    "mallocs": ({"malloc_enter": ("uprobe", "uprobe"), "free_enter": ("uprobe", "uprobe"),
                 "malloc_exit": ("uretprobe", "uretprobe")},
                [("sizes", "hash", 4, 8, 1024), ("allocs", "hash", 8, 16, 4096),
                 ("stacks", "stack_trace", 4, 1016, 1024), ("mallocs.bss", "array", 4, 16, 1)],
                ["n_malloc", "n_free_hits"]),
    "printk_formats": ({"fmt_entry": ("uprobe", "uprobe")}, [("printk_f.rodata", "array", 4, 193, 1)], None),
    "readline": ({"readline_ret": ("uretprobe", "uretprobe")},
                 [("events", "perf_event_array", 4, 4, possible_cpus())], []),
    "ringbuf": ({"submit_entry": ("uprobe", "uprobe")},
                [("rb", "ringbuf", 0, 0, 65536), ("ringbuf.bss", "array", 4, 24, 1)],
                ["discarded", "submitted", "output_calls"]),
    "rust_args": ({"hello_entry": ("uprobe", "uprobe"), "hello_exit": ("uretprobe", "uretprobe")},
                  [("rust_arg.rodata", "array", 4, 39, 1)], ["____hello_entry.____fmt", "____hello_exit.____fmt"]),
    "sharedlib": ({"mul_entry": ("uprobe", "uprobe"), "mul_exit": ("uretprobe", "uretprobe")},
                  [("sharedli.rodata", "array", 4, 32, 1)], ["____mul_entry.____fmt", "____mul_exit.____fmt"]),
    "usdt": ({"on_tick": ("usdt", "usdt"), "on_label": ("usdt", "usdt/./usdt:corpus:label")},
             [("__bpf_usdt_specs", "array", 4, 208, 256), ("__bpf_usdt_ip_to_spec_id", "hash", 8, 4, 1024),
              ("usdt.rodata", "array", 4, 50, 1), ("usdt.kconfig", "array", 4, 1, 1)],
             ["____on_tick.____fmt", "____on_label.____fmt"]),
}


def _lddw_refs(prog) -> list[tuple[int, int, int, int]]:
    return [(i, ins.src, ins.imm, ins.imm_hi) for i, ins in enumerate(prog.instructions)
            if ins.opcode == LDDW and ins.src in (BPF_PSEUDO_MAP_IDX, BPF_PSEUDO_MAP_IDX_VALUE)]


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_corpus_object(corpus_build: Path, name: str) -> None:
    progs, maps, globs = CORPUS[name]
    spec = load_object(corpus_build / f"{name}.bpf.o")
    assert spec.license == "GPL"
    assert spec.name == name[:15].split(".")[0]
    assert {p: (s.kind, s.section) for p, s in spec.programs.items()} == progs
    assert [(m.name, m.type_name, m.key_size, m.value_size, m.max_entries) for m in spec.maps] == maps
    if globs is not None:
        assert list(spec.globals) == globs
    assert not spec.skipped
    for prog in spec.programs.values():
        assert prog.functions[0] == prog.name
        assert prog.license == "GPL"
        # every map reference points at a map; value references stay inside the value
        for _i, src, idx, off in _lddw_refs(prog):
            assert 0 <= idx < len(spec.maps)
            if src == BPF_PSEUDO_MAP_IDX_VALUE:
                assert spec.maps[idx].internal and 0 <= off < spec.maps[idx].value_size
            else:
                assert not spec.maps[idx].internal
        # the lddw continuation slot mirrors imm_hi
        for i, ins in enumerate(prog.instructions):
            if ins.opcode == LDDW:
                assert prog.instructions[i + 1].opcode == 0 and prog.instructions[i + 1].imm == ins.imm_hi
        # line info is in range and carries source text
        assert prog.line_info and all(0 <= li.insn_index < len(prog.instructions) for li in prog.line_info)
        assert any(li.source for li in prog.line_info)
        assert prog.func_info and set(prog.func_info) <= set(prog.functions)


def test_every_invalid_object_loads(corpus_build: Path) -> None:
    objs = sorted((corpus_build / "invalid").glob("*.o"))
    assert len(objs) >= 20
    for o in objs:
        spec = load_object(o)
        assert list(spec.programs) == ["prog"], o.name
        assert spec.programs["prog"].kind == "uprobe"


def test_calls_linking(corpus_build: Path) -> None:
    spec = load_object(corpus_build / "calls.bpf.o")
    p = spec.programs["compute_entry"]
    # llvm-objdump: compute_entry is 51 insns, then square (3), triangle (7), loop_cb (7) in order of first use
    assert p.functions == {0: "compute_entry", 51: "square", 54: "triangle", 61: "loop_cb"}
    assert len(p.instructions) == 68
    calls = {i: i + ins.imm + 1 for i, ins in enumerate(p.instructions)
             if ins.opcode == 0x85 and ins.src == BPF_PSEUDO_CALL}
    assert calls == {11: 51, 14: 54}
    fptr = [(i, i + ins.imm + 1) for i, ins in enumerate(p.instructions)
            if ins.opcode == LDDW and ins.src == BPF_PSEUDO_FUNC]
    assert fptr == [(29, 61)]
    # bpf_loop (181) takes the callback; bpf_tail_call (12) gets jmp_table (map 0)
    assert p.instructions[32].imm == 181
    refs = _lddw_refs(p)
    assert (46, BPF_PSEUDO_MAP_IDX, 0, 0) in refs and (39, BPF_PSEUDO_MAP_IDX, 1, 0) in refs
    assert spec.map_by_name("jmp_table").init_slots == {0: "tail_even", 1: "tail_odd"}
    assert set(p.func_info) == {0, 51, 54, 61}
    # line info of the appended subprogram points at its own source lines
    sq = [li for li in p.line_info if 51 <= li.insn_index < 54]
    assert sq and all("x * x" in li.source or "square" in li.source or li.line == 0 for li in sq)


def test_usdt_object(corpus_build: Path) -> None:
    spec = load_object(corpus_build / "usdt.bpf.o")
    on_label = spec.programs["on_label"]
    assert on_label.attach == AttachPoint(binary="./usdt", usdt_provider="corpus", usdt_name="label")
    assert spec.programs["on_tick"].attach is None
    assert set(on_label.functions.values()) == {"on_label", "bpf_usdt_arg"}
    assert set(spec.programs["on_tick"].functions.values()) == {"on_tick", "bpf_usdt_arg", "bpf_usdt_cookie"}
    kc = spec.map_by_name("usdt.kconfig")
    assert kc.section == ".kconfig" and kc.readonly and kc.internal
    assert spec.kconfig["LINUX_HAS_BPF_COOKIE"].offset == 0 and kc.data == b"\x01"
    kidx = spec.maps.index(kc)
    assert any(src == BPF_PSEUDO_MAP_IDX_VALUE and idx == kidx for _, src, idx, _ in _lddw_refs(on_label))


def test_rodata_string_offsets(corpus_build: Path) -> None:
    """printk format lddw -> .rodata map at the variable's offset (symbol value + insn addend)."""
    spec = load_object(corpus_build / "hello.bpf.o")
    ro = spec.map_by_name("hello.rodata")
    idx = spec.maps.index(ro)
    offs = {p: [off for _, src, i, off in _lddw_refs(s) if i == idx] for p, s in spec.programs.items()}
    assert offs == {"add_entry": [spec.globals["____add_entry.____fmt"].offset],
                    "add_exit": [spec.globals["____add_exit.____fmt"].offset]}
    assert ro.data[offs["add_exit"][0]:].startswith(b"add returned %d\0")
    assert ro.readonly and ro.flags & 0x80


def test_hello_auto_attach(corpus_build: Path) -> None:
    spec = load_object(corpus_build / "hello_auto.bpf.o")
    assert spec.programs["add_entry"].attach == AttachPoint(binary="./hello", function="add", offset=0)
    assert spec.programs["add_exit"].is_return_probe


def test_internal_map_names() -> None:
    assert object_name("/x/hello_auto.bpf.o") == "hello_auto"
    assert internal_map_name("hello_auto", ".rodata") == "hello_au.rodata"
    assert internal_map_name("my_object_name", ".bss") == "my_objec.bss"
    assert internal_map_name("my_object_name", ".kconfig") == "my_obje.kconfig"
    assert internal_map_name("x", ".rodata.str1.1") == ".rodata.str1.1"
    assert internal_map_name("x", ".rodata.abracadabra") == ".rodata.abracad"


@pytest.mark.parametrize("sec,kind,attach,extra", [
    ("uprobe", "uprobe", None, {}),
    ("uretprobe", "uretprobe", None, {}),
    ("uprobe/./hello:add", "uprobe", AttachPoint("./hello", "add", 0), {}),
    ("uprobe//proc/self/exe:f", "uprobe", AttachPoint("/proc/self/exe", "f", 0), {}),
    ("uprobe/libc.so.6:malloc+0x10", "uprobe", AttachPoint("libc.so.6", "malloc", 16), {}),
    ("uprobe/libc.so.6:malloc+16", "uprobe", AttachPoint("libc.so.6", "malloc", 16), {}),
    ("uprobe/libc.so.6:malloc+010", "uprobe", AttachPoint("libc.so.6", "malloc", 8), {}),
    ("uprobe.s/./a:f", "uprobe", AttachPoint("./a", "f", 0), {"sleepable": True}),
    ("uretprobe.s", "uretprobe", None, {"sleepable": True}),
    ("uprobe.multi/./a:f*", "uprobe", AttachPoint("./a", "f*", 0), {"multi": True, "multi_pattern": "f*"}),
    ("uretprobe.multi/libc.so.6:mem?", "uretprobe", AttachPoint("libc.so.6", "mem?", 0),
     {"multi": True, "multi_pattern": "mem?"}),
    ("usdt", "usdt", None, {}),
    ("usdt/./usdt:corpus:label", "usdt", AttachPoint("./usdt", usdt_provider="corpus", usdt_name="label"), {}),
    ("kprobe/do_sys_open", "kprobe", AttachPoint("", "do_sys_open", 0), {}),
    ("kprobe/f+0x8", "kprobe", AttachPoint("", "f", 8), {}),
    ("kretprobe/f", "kretprobe", AttachPoint("", "f", 0), {}),
    ("?uprobe", "uprobe", None, {"autoload": False}),
])
def test_section_rules(sec, kind, attach, extra) -> None:
    info = classify_section(sec)
    assert not isinstance(info, str), info
    assert info.kind == kind and info.attach == attach
    for k, v in extra.items():
        assert getattr(info, k) == v


@pytest.mark.parametrize("sec", ["tracepoint/syscalls/sys_enter_open", "xdp", "fentry/do_unlinkat", "tc",
                                 "kprobe.multi/x*", "ksyscall/open", "socket", "my_custom_section",
                                 "uprobefoo", "raw_tp/sched_switch"])
def test_section_skipped(sec) -> None:
    assert isinstance(classify_section(sec), str)


@pytest.mark.parametrize("sec", ["uprobe/./a", "uprobe/:f", "uretprobe/./a:f+8", "usdt/./a:p",
                                 "kretprobe/f+4", "kprobe/bad name"])
def test_section_invalid(sec) -> None:
    with pytest.raises(ObjectLoadError, match="section"):
        classify_section(sec)


# --------------------------------------------------------------- globals

def test_set_global(corpus_build: Path) -> None:
    spec = load_object(corpus_build / "funclat.bpf.o")
    set_global(spec, "targ_tgid", 4242)
    assert get_global(spec, "targ_tgid") == struct.pack("<I", 4242)
    with pytest.raises(ObjectLoadError, match="does not fit"):
        set_global(spec, "targ_tgid", 1 << 40)
    with pytest.raises(ObjectLoadError, match="4 bytes"):
        set_global(spec, "targ_tgid", b"\x01\x02")
    with pytest.raises(ObjectLoadError, match="no global variable 'nope'"):
        set_global(spec, "nope", 1)
    set_global(spec, "targ_tgid", "0x10")
    assert get_global(spec, "targ_tgid") == struct.pack("<I", 16)
    freeze(spec)
    with pytest.raises(ObjectLoadError, match="frozen"):
        set_global(spec, "targ_tgid", 1)
    # .bss stays writable after freeze
    set_global(spec, "total_calls", 7)
    assert spec.map_by_name("funclat.bss").data[spec.globals["total_calls"].offset] == 7


def test_set_global_string(corpus_build: Path) -> None:
    spec = load_object(corpus_build / "hello.bpf.o")
    set_global(spec, "____add_entry.____fmt", "hi %d")
    assert get_global(spec, "____add_entry.____fmt") == b"hi %d" + bytes(7)
    with pytest.raises(ObjectLoadError, match="characters"):
        set_global(spec, "____add_entry.____fmt", "x" * 12)


def test_kconfig_values(tmp_path: Path) -> None:
    src = tmp_path / "k.bpf.c"
    src.write_text(r'''
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
extern unsigned int LINUX_KERNEL_VERSION __kconfig;
extern _Bool LINUX_HAS_BPF_COOKIE __kconfig;
extern int CONFIG_UBPF_SURELY_MISSING __kconfig __weak;
extern char CONFIG_BPF_SYSCALL __kconfig __weak;
unsigned long long out[4];
SEC("uprobe") int p(void *ctx) {
  out[0] = LINUX_KERNEL_VERSION; out[1] = LINUX_HAS_BPF_COOKIE;
  out[2] = CONFIG_UBPF_SURELY_MISSING; out[3] = CONFIG_BPF_SYSCALL; return 0; }
char LICENSE[] SEC("license") = "GPL";
''')
    obj = _clang(src)
    spec = load_object(obj, kconfig={"CONFIG_BPF_SYSCALL": "y"})
    kc = spec.maps[-1]
    assert kc.section == ".kconfig"
    # layout: 4-byte aligned first (ascending size, then name), then 1-byte ones
    offs = {n: g.offset for n, g in spec.kconfig.items()}
    assert offs == {"CONFIG_UBPF_SURELY_MISSING": 0, "LINUX_KERNEL_VERSION": 4,
                    "CONFIG_BPF_SYSCALL": 8, "LINUX_HAS_BPF_COOKIE": 9}
    assert kc.data == bytes(4) + struct.pack("<I", kernel_version_code()) + b"y\x01"
    # missing non-weak extern: error names it
    src.write_text(src.read_text().replace("__kconfig __weak;\nextern char", "__kconfig;\nextern char"))
    with pytest.raises(ObjectLoadError, match="CONFIG_UBPF_SURELY_MISSING"):
        load_object(_clang(src))


def test_skipped_sections_warn(tmp_path: Path) -> None:
    src = tmp_path / "m.bpf.c"
    src.write_text(r'''
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
SEC("tracepoint/syscalls/sys_enter_write") int tp(void *ctx) { return 0; }
SEC("xdp") int x(void *ctx) { return 2; }
static __noinline int helper(int a) { return a * 3; }
SEC("uprobe/./bin:f+0x4") int a(void *ctx) { return helper(1); }
SEC("uprobe/./bin:f+0x4") int b(void *ctx) { return helper(2) + 1; }
char LICENSE[] SEC("license") = "GPL";
''')
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        spec = load_object(_clang(src))
    assert sorted(s for s, _ in spec.skipped) == ["tracepoint/syscalls/sys_enter_write", "xdp"]
    assert sum(issubclass(x.category, SkippedProgramWarning) for x in w) == 2
    assert set(spec.programs) == {"a", "b"}
    for p in spec.programs.values():
        assert p.attach == AttachPoint("./bin", "f", 4)
        assert list(p.functions.values()) == [p.name, "helper"]


def test_legacy_maps_and_globals_in_custom_sections(tmp_path: Path) -> None:
    src = tmp_path / "l.bpf.c"
    src.write_text(r'''
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
struct bpf_map_def { unsigned int type, key_size, value_size, max_entries, map_flags; };
struct bpf_map_def SEC("maps") legacy = { .type = BPF_MAP_TYPE_HASH, .key_size = 4, .value_size = 16,
                                          .max_entries = 32 };
struct bpf_map_def SEC("maps") perf = { .type = BPF_MAP_TYPE_PERF_EVENT_ARRAY };
int custom_var SEC(".data.custom") = 5;
const volatile long ro_custom SEC(".rodata.cfg") = 9;
SEC("uprobe") int p(void *ctx) {
  int k = custom_var + ro_custom; bpf_map_lookup_elem(&legacy, &k);
  bpf_printk("k=%d", k); return 0; }
char LICENSE[] SEC("license") = "GPL";
''')
    spec = load_object(_clang(src))
    names = [m.name for m in spec.maps]
    assert names[:2] == ["legacy", "perf"]
    assert (spec.maps[0].key_size, spec.maps[0].value_size, spec.maps[0].max_entries) == (4, 16, 32)
    assert (spec.maps[1].key_size, spec.maps[1].value_size, spec.maps[1].max_entries) == (4, 4, possible_cpus())
    assert ".data.custom" in names and ".rodata.cfg" in names
    assert spec.globals["custom_var"].map_name == ".data.custom"
    assert spec.map_by_name(".rodata.cfg").readonly
    sections = {m.section for m in spec.maps if m.internal}
    assert ".rodata.cfg" in sections


# --------------------------------------------------------------- errors

def test_error_not_elf(tmp_path: Path) -> None:
    f = tmp_path / "x.o"
    f.write_bytes(b"hello world, not an ELF")
    with pytest.raises(ObjectLoadError, match="not an ELF"):
        load_object(f)


def test_error_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ObjectLoadError, match="no such file"):
        load_object(tmp_path / "missing.o")


def test_error_wrong_machine() -> None:
    with pytest.raises(ObjectLoadError, match="not a BPF object"):
        load_object("/bin/true" if Path("/bin/true").exists() else "/usr/bin/true")


@pytest.mark.parametrize("cut", [64, 200, 1000, -100])
def test_error_truncated(corpus_build: Path, tmp_path: Path, cut: int) -> None:
    data = (corpus_build / "calls.bpf.o").read_bytes()
    f = tmp_path / "t.o"
    f.write_bytes(data[:cut])
    with pytest.raises(ObjectLoadError) as e:
        load_object(f)
    assert str(f) in str(e.value) and "\n" not in str(e.value)


def test_error_garbage_section_headers(corpus_build: Path, tmp_path: Path) -> None:
    data = bytearray((corpus_build / "hello.bpf.o").read_bytes())
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    data[shoff + 64 * 3 + 24:shoff + 64 * 3 + 32] = struct.pack("<Q", 1 << 40)  # section 3 offset
    f = tmp_path / "g.o"
    f.write_bytes(bytes(data))
    with pytest.raises(ObjectLoadError, match=r"g\.o"):
        load_object(f)


def test_error_unresolvable_relocations(tmp_path: Path) -> None:
    src = tmp_path / "e.bpf.c"
    src.write_text(r'''
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
extern int bpf_some_kfunc(int x) __ksym;
SEC("uprobe") int p(void *ctx) { return bpf_some_kfunc(1); }
char LICENSE[] SEC("license") = "GPL";
''')
    # the object loads (other programs of it may not call the kfunc); the call is refused where
    # a path reaches it, by the verifier, with the C line naming the function
    spec = load_object(_clang(src))
    from ubpf_py.verifier import verify_program
    report = verify_program(spec.programs["p"], spec.maps, mode="warn", btf=spec.btf)
    assert not report.ok and "kernel functions" in report.error and "bpf_some_kfunc" in report.source


def test_relocation_error_is_object_load_error() -> None:
    assert issubclass(RelocationError, ObjectLoadError)


def _clang(src: Path) -> Path:
    return compile_bpf(src.read_text(), src.parent, src.name.removesuffix(".bpf.c"))


def test_map_in_map_static_init(tmp_path: Path) -> None:
    src = tmp_path / "mim.bpf.c"
    src.write_text(r'''
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
struct inner { __uint(type, BPF_MAP_TYPE_ARRAY); __uint(max_entries, 4); __type(key, __u32); __type(value, __u64); };
struct inner in0 SEC(".maps"), in2 SEC(".maps");
struct {
    __uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
    __uint(max_entries, 3);
    __type(key, __u32);
    __array(values, struct inner);
} outer SEC(".maps") = { .values = { [0] = &in0, [2] = &in2 } };
struct { __uint(type, BPF_MAP_TYPE_RINGBUF); __uint(max_entries, 5000); } rb SEC(".maps");
SEC("uprobe") int p(void *ctx) { __u32 k = 0; return bpf_map_lookup_elem(&outer, &k) != 0; }
char LICENSE[] SEC("license") = "GPL";
''')
    spec = load_object(_clang(src))
    outer = spec.map_by_name("outer")
    assert outer.type_name == "array_of_maps" and outer.value_size == 4 and outer.key_size == 4
    assert outer.init_slots == {0: "in0", 2: "in2"}
    assert outer.inner is not None and outer.inner.name == "outer.inner"
    assert (outer.inner.type_name, outer.inner.key_size, outer.inner.value_size, outer.inner.max_entries) == \
        ("array", 4, 8, 4)
    # ringbuf size rounded up to a power-of-two number of pages, like libbpf
    assert spec.map_by_name("rb").max_entries == 8192


def test_corrupted_objects_give_one_line_errors(corpus_build: Path, tmp_path: Path) -> None:
    """Random byte flips never escape as anything but a one-line UbpfError."""
    import random

    from ubpf_py.errors import UbpfError
    rng = random.Random(7)
    data = (corpus_build / "usdt.bpf.o").read_bytes()
    f = tmp_path / "c.o"
    for _ in range(80):
        d = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            d[rng.randrange(len(d))] = rng.randrange(256)
        f.write_bytes(bytes(d))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                load_object(f)
            except UbpfError as e:
                assert "\n" not in str(e)
