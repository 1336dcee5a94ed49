"""Attach-point resolution: symbols -> file offsets (against binutils and the
dynamic linker), /proc/PID/maps, library search, globs and listings."""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from paths import CORPUS

from ubpf_py.errors import SymbolError, TargetError
from ubpf_py.probe import procmaps
from ubpf_py.probe.listing import format_listing, list_functions, parse_list_pattern
from ubpf_py.probe.resolve import find_function_in_process, is_library_name, resolve_binary
from ubpf_py.probe.symbols import (
    ET_DYN,
    ET_EXEC,
    function_at,
    load_elf,
    lookup_function,
    match_functions,
    resolve_function,
)

LIBC = resolve_binary("libc.so.6")
need_readelf = pytest.mark.skipif(shutil.which("readelf") is None, reason="binutils readelf missing")


# ---------------------------------------------------------------------------
# an independent oracle: binutils' view of symbols and sections

def _readelf(*args: str) -> str:
    return subprocess.run(["readelf", "-W", *args], capture_output=True, text=True, check=True).stdout


def binutils_offset(path: str, name: str) -> int:
    """File offset of function ``name`` from ``readelf -sW``/``-SW`` text, libbpf's
    way: .dynsym first, then .symtab; st_value - sh_addr + sh_offset."""
    sections: dict[int, tuple[int, int]] = {}
    for m in re.finditer(r"^\s*\[\s*(\d+)\]\s+\S*\s+\S+\s+([0-9a-f]{16})\s+([0-9a-f]+)",
                         _readelf("-S", path), re.M):
        sections[int(m.group(1))] = (int(m.group(2), 16), int(m.group(3), 16))
    text = _readelf("-s", path)
    tables = re.split(r"^Symbol table '", text, flags=re.M)[1:]
    for table in sorted(tables, key=lambda t: 0 if t.startswith(".dynsym") else 1):
        offs = set()
        for line in table.splitlines():
            f = line.split()
            if len(f) < 8 or f[3] not in ("FUNC", "IFUNC") or not f[6].isdigit():
                continue
            sym = f[7].split("@")[0]
            if sym != name:
                continue
            addr, off = sections[int(f[6])]
            offs.add(int(f[1], 16) - addr + off)
        if offs:
            assert len(offs) == 1, f"{name} ambiguous in {path}: {offs}"
            return offs.pop()
    raise AssertionError(f"{name} not in {path}")


def _manifest() -> list[dict]:
    return json.loads((CORPUS / "manifest.json").read_text())["cases"]


def _auto_sections(obj: Path) -> list[str]:
    names = re.findall(r"\]\s+((?:uprobe|uretprobe)/\S+)", _readelf("-S", str(obj)))
    return sorted(set(names))


# ---------------------------------------------------------------------------
# the corpus

@need_readelf
def test_every_manifest_function_resolves_like_binutils(corpus_build: Path) -> None:
    checked = 0
    for case in _manifest():
        attach = case["attach"]
        entries = [attach] if attach == "auto" else attach
        for entry in entries:
            if entry == "auto":
                for sec in _auto_sections(corpus_build / case["bpf"]):
                    spec = sec.split("/", 1)[1]
                    binary, func = spec.rsplit(":", 1)
                    path = resolve_binary(binary, cwd=str(corpus_build))
                    assert resolve_function(path, func) == binutils_offset(path, func)
                    checked += 1
                continue
            if "function" not in entry:
                continue
            path = resolve_binary(entry["binary"], cwd=str(corpus_build))
            off = entry.get("offset", 0)
            want = binutils_offset(path, entry["function"]) + off
            assert resolve_function(path, entry["function"], off) == want, (case["name"], entry)
            if "function_demangled" in entry:
                assert resolve_function(path, entry["function_demangled"], off) == want
            checked += 1
    assert checked >= 25


def test_corpus_offsets_by_hand(corpus_build: Path) -> None:
    """Values read off `readelf -lsW` once by hand, as relations that survive rebuilds."""
    go = load_elf(str(corpus_build / "go_args"))
    assert go.e_type == ET_EXEC
    m = lookup_function(str(corpus_build / "go_args"), "main.computeE")
    # non-PIE: the symbol is a virtual address; the file offset is not
    assert m.symbol.value != m.file_offset
    assert go.vaddr_to_offset(m.symbol.value) == m.file_offset
    assert m.symbol.value - m.file_offset == 0x400000

    hello = str(corpus_build / "hello")
    assert load_elf(hello).e_type == ET_DYN
    cm = str(corpus_build / "cookie_multi")
    assert resolve_function(cm, "f_delta", 4) == resolve_function(cm, "f_delta") + 4
    fs = function_at(cm, resolve_function(cm, "f_delta", 4))
    assert fs is not None and fs.name == "f_delta"
    assert function_at(hello, 0) is None
    for name in ("cookie_multi", "cookie_multi_cet"):
        offs = {f: resolve_function(str(corpus_build / name), f)
                for f in ("f_alpha", "f_beta", "f_gamma", "f_delta")}
        assert len(set(offs.values())) == 4


def test_rust_mangled_and_demangled(corpus_build: Path) -> None:
    path = str(corpus_build / "rust_args")
    mangled = next(e["function"] for c in _manifest() if c["name"] == "rust_args" for e in c["attach"])
    off = resolve_function(path, mangled)
    hashed = mangled[mangled.index("17h") + 3: -1]
    for spelling in ("rust_args::hello", f"rust_args::hello::h{hashed}"):
        m = lookup_function(path, spelling)
        assert m.file_offset == off and m.symbol.name == mangled and m.demangled == "rust_args::hello"
    with pytest.raises(SymbolError, match="did you mean 'rust_args::hello'"):
        resolve_function(path, "rust_args::helo")


def test_libc_malloc_free_match_the_dynamic_linker() -> None:
    """Our file offsets, mapped through our own /proc/self/maps, land exactly
    where ld.so put malloc/free (ctypes asks the dynamic linker)."""
    libc = ctypes.CDLL(None)
    maps = procmaps.read_maps(os.getpid())
    for name in ("malloc", "free", "calloc"):
        off = resolve_function(LIBC, name)
        assert off == binutils_offset(LIBC, name)
        real = ctypes.cast(getattr(libc, name), ctypes.c_void_p).value
        assert procmaps.file_offset_to_addr(maps, LIBC, off) == [real]


def test_shared_library_offsets_match_dlopen(corpus_build: Path) -> None:
    lib = str(corpus_build / "libdemo.so")
    handle = ctypes.CDLL(lib)
    maps = procmaps.read_maps(os.getpid())
    off = resolve_function(lib, "demo_mul")
    assert procmaps.file_offset_to_addr(maps, lib, off) == [
        ctypes.cast(handle.demo_mul, ctypes.c_void_p).value]


def test_symbol_versions() -> None:
    nm = subprocess.run(["nm", "-D", LIBC], capture_output=True, text=True, check=True).stdout
    versions = {}
    for line in nm.splitlines():
        f = line.split()
        if len(f) == 3 and f[2].startswith("pthread_cond_wait@"):
            versions[f[2]] = int(f[0], 16)
    default = next(k for k in versions if "@@" in k)
    old = next(k for k in versions if "@@" not in k)
    assert versions[default] != versions[old]
    base = load_elf(LIBC).vaddr_to_offset
    assert resolve_function(LIBC, default) == base(versions[default])
    assert resolve_function(LIBC, old) == base(versions[old])
    # libbpf ignores @ vs @@ for .dynsym: the version name decides
    assert resolve_function(LIBC, old.replace("@", "@@")) == base(versions[old])
    # unversioned: the default version, as the dynamic linker binds it
    assert resolve_function(LIBC, "pthread_cond_wait") == base(versions[default])
    assert resolve_function(LIBC, "malloc@@GLIBC_2.2.5") == resolve_function(LIBC, "malloc")
    with pytest.raises(SymbolError, match="not found"):
        resolve_function(LIBC, "malloc@GLIBC_9.9")


def _cc(tmp: Path, name: str, sources: dict[str, str], *flags: str, cc: str = "gcc") -> str:
    if shutil.which(cc) is None:
        pytest.skip(f"{cc} not installed")
    files = []
    for fname, text in sources.items():
        (tmp / fname).write_text(text)
        if not fname.endswith((".map", ".h")):
            files.append(str(tmp / fname))
    out = tmp / name
    subprocess.run([cc, "-O1", "-fno-inline", "-o", str(out), *files, *flags], check=True,
                   capture_output=True)
    return str(out)


def test_weak_global_local_and_ambiguity(tmp_path: Path) -> None:
    exe = _cc(tmp_path, "binds", {
        "a.c": "__attribute__((weak, noinline)) int wfoo(int x) { return x + 1; }\n"
               "static __attribute__((noinline)) int dup(int x) { return x * 3; }\n"
               "int call_a(int x) { return dup(x) + wfoo(x); }\n",
        "b.c": "static __attribute__((noinline)) int wfoo(int x) { return x * 7; }\n"
               "static __attribute__((noinline)) int dup(int x) { return x * 5; }\n"
               "int call_b(int x) { return dup(x) + wfoo(x); }\n"
               "int call_a(int);\nint main(int c, char **v) { return call_a(c) + call_b(c); }\n",
    })
    info = load_elf(exe)
    wf = [s for s in info.symtab if s.name == "wfoo"]
    assert sorted(s.bind for s in wf) == [0, 2]  # LOCAL and WEAK at different places
    local = next(s for s in wf if s.bind == 0)
    # a non-weak symbol wins over a weak one at another address
    assert resolve_function(exe, "wfoo") == local.file_offset
    # two non-weak symbols at different addresses: libbpf's "ambiguous match"
    with pytest.raises(SymbolError, match="ambiguous function 'dup'"):
        resolve_function(exe, "dup")


def test_versioned_shared_library(tmp_path: Path) -> None:
    lib = _cc(tmp_path, "libver.so", {
        "v.c": "__attribute__((noinline)) int f_old(int x) { return x; }\n"
               "__attribute__((noinline)) int f_new(int x) { return x + 1; }\n"
               "__asm__(\".symver f_old, vf@VER_1\");\n"
               "__asm__(\".symver f_new, vf@@VER_2\");\n",
        "v.map": "VER_1 { global: vf; local: *; };\nVER_2 { global: vf; } VER_1;\n",
    }, "-shared", "-fPIC", f"-Wl,--version-script={tmp_path / 'v.map'}")
    old = lookup_function(lib, "vf@VER_1")
    new = lookup_function(lib, "vf@@VER_2")
    assert old.file_offset != new.file_offset
    assert (old.symbol.version, old.symbol.hidden) == ("VER_1", True)
    assert (new.symbol.version, new.symbol.hidden) == ("VER_2", False)
    assert resolve_function(lib, "vf") == new.file_offset
    assert new.symbol.versioned_name == "vf@@VER_2"


# ---------------------------------------------------------------------------
# errors

def test_errors_name_the_thing_and_the_fix(tmp_path: Path, corpus_build: Path) -> None:
    hello = str(corpus_build / "hello")
    with pytest.raises(SymbolError, match=r"function 'ad' not found in .*hello; did you mean 'add'"):
        resolve_function(hello, "ad")
    with pytest.raises(SymbolError, match="binary not found"):
        resolve_function(str(tmp_path / "nope"), "main")
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    with pytest.raises(SymbolError, match="not an ELF file"):
        resolve_function(str(script), "main")
    with pytest.raises(SymbolError, match="not a regular file"):
        resolve_function(str(tmp_path), "main")
    with pytest.raises(SymbolError, match=r"only referenced.*shared library"):
        resolve_function(str(corpus_build / "mallocs"), "malloc")
    with pytest.raises(SymbolError, match="binary not found"):
        resolve_binary("./nope", cwd=str(tmp_path))
    with pytest.raises(SymbolError, match=r"library 'libnope_ubpf\.so' not found"):
        resolve_binary("libnope_ubpf.so", cwd=str(tmp_path))
    with pytest.raises(SymbolError, match="/proc/self/exe needs a target"):
        resolve_binary("/proc/self/exe")
    assert str(SymbolError("x")).count("\n") == 0


def test_symbol_cache_follows_mtime(tmp_path: Path, corpus_build: Path) -> None:
    copy = tmp_path / "hello"
    shutil.copy(corpus_build / "hello", copy)
    first = load_elf(str(copy))
    assert load_elf(str(copy)) is first
    shutil.copy(corpus_build / "funclat", copy)
    os.utime(copy, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    assert load_elf(str(copy)) is not first
    assert resolve_function(str(copy), "work") == binutils_offset(str(copy), "work")


# ---------------------------------------------------------------------------
# globs

def test_match_functions_globs(corpus_build: Path) -> None:
    cm = str(corpus_build / "cookie_multi")
    got = dict(match_functions(cm, "f_*"))
    assert got == {f: resolve_function(cm, f) for f in ("f_alpha", "f_beta", "f_gamma", "f_delta")}
    assert dict(match_functions(cm, "f_?eta")) == {"f_beta": resolve_function(cm, "f_beta")}
    assert match_functions(cm, "no_such_*") == []
    # a stripped library: .dynsym only
    mallocs = dict(match_functions(LIBC, "malloc*"))
    assert mallocs["malloc"] == resolve_function(LIBC, "malloc") and "malloc_usable_size" in mallocs
    # brackets are literal in libbpf's glob
    assert match_functions(cm, "f_[ab]*") == []
    rust = match_functions(str(corpus_build / "rust_args"), "rust_args::h*")
    assert [off for _n, off in rust] == [resolve_function(str(corpus_build / "rust_args"), "rust_args::hello")]


# ---------------------------------------------------------------------------
# /proc/PID/maps

def test_parse_maps_text() -> None:
    text = ("55d0c0000000-55d0c0001000 r--p 00000000 fd:01 1234  /opt/my dir/app\n"
            "55d0c0001000-55d0c0002000 r-xp 00001000 fd:01 1234  /opt/my dir/app\n"
            "7f0000000000-7f0000021000 rw-p 00000000 00:00 0 \n"
            "7f0000100000-7f0000101000 r-xp 00002000 103:02 99 /tmp/old.so (deleted)\n"
            "7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0  [stack]\n")
    maps = procmaps.parse_maps(text)
    assert [m.path for m in maps] == ["/opt/my dir/app", "/opt/my dir/app", "", "/tmp/old.so", "[stack]"]
    assert maps[3].deleted and maps[3].dev == (0x103, 2)
    assert [m.is_file for m in maps] == [True, True, False, True, False]
    assert procmaps.file_offset_to_addr(maps, "/opt/my dir/app", 0x1234) == [0x55D0C0001234]
    assert procmaps.addr_to_file_offset(maps, 0x55D0C0001234) == ("/opt/my dir/app", 0x1234)
    assert procmaps.file_offset_to_addr(maps, "/opt/my dir/app", 0x5000) == []
    assert procmaps.mapped_files(maps) == ["/opt/my dir/app", "/tmp/old.so"]
    with pytest.raises(TargetError):
        procmaps.parse_maps("garbage\n")


def _spawn_python(code: str, env: dict | None = None) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", code + "\nimport sys; print('ready', flush=True); "
                          "sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         env=env, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    return p


def test_maps_of_a_running_target_and_its_memory(corpus_build: Path, tmp_path: Path) -> None:
    """A library copied elsewhere and loaded by a child: found through the child's
    maps before the build dir, and the bytes at our address equal the file's."""
    libdir = tmp_path / "elsewhere"
    libdir.mkdir()
    shutil.copy(corpus_build / "libdemo.so", libdir / "libdemo.so")
    p = _spawn_python(f"import ctypes; ctypes.CDLL({str(libdir / 'libdemo.so')!r})")
    try:
        chosen = resolve_binary("libdemo.so", pid=p.pid, cwd=str(corpus_build))
        assert chosen == str(libdir / "libdemo.so")
        assert resolve_binary("/proc/self/exe", pid=p.pid) == os.path.realpath(sys.executable)
        off = resolve_function(chosen, "demo_mul")
        maps = procmaps.read_maps(p.pid)
        (addr,) = procmaps.file_offset_to_addr(maps, chosen, off)
        with open(f"/proc/{p.pid}/mem", "rb") as mem:
            mem.seek(addr)
            live = mem.read(16)
        with open(chosen, "rb") as f:
            f.seek(off)
            assert live == f.read(16)
        # through a symlink: matched by (dev, inode), not by path text
        link = tmp_path / "link.so"
        link.symlink_to(libdir / "libdemo.so")
        assert procmaps.file_offset_to_addr(maps, str(link), off) == [addr]
        bin_, off2, note = find_function_in_process(p.pid, "demo_mul")
        assert (bin_, off2) == (chosen, off) and "mapped in pid" in note
    finally:
        p.kill()
        p.wait()
    with pytest.raises(TargetError, match="no such process"):
        procmaps.read_maps(p.pid)


# ---------------------------------------------------------------------------
# library and binary search

def test_resolve_binary_conventions(corpus_build: Path, tmp_path: Path) -> None:
    b = str(corpus_build)
    assert resolve_binary("./hello", cwd=b) == f"{b}/hello"
    assert resolve_binary("libdemo.so", cwd=b) == f"{b}/libdemo.so"
    assert os.path.samefile(resolve_binary("libc.so.6", cwd=str(tmp_path)), LIBC)
    assert resolve_binary("ls") == os.path.abspath(shutil.which("ls"))
    assert resolve_binary("/proc/self/exe", exe="./hello", cwd=b) == f"{b}/hello"
    assert is_library_name("libc.so.6") and is_library_name("libdemo.so") and not is_library_name("hello")


def test_find_function_without_binary(corpus_build: Path) -> None:
    b = str(corpus_build)
    path, off, note = find_function_in_process("./readline", "readline", cwd=b)
    assert path == f"{b}/readline" and off == resolve_function(path, "readline")
    assert "the executable" in note
    # demo_app needs libdemo.so through RUNPATH=$ORIGIN, then libc
    path, off, note = find_function_in_process(f"{b}/demo_app", "demo_mul", cwd="/")
    assert path == f"{b}/libdemo.so" and "library" in note
    path, off, _ = find_function_in_process("./mallocs", "malloc", cwd=b)
    assert os.path.samefile(path, LIBC) and off == resolve_function(LIBC, "malloc")
    with pytest.raises(SymbolError, match=r"not found in .*hello or its"):
        find_function_in_process("./hello", "no_such_function_xyz", cwd=b)


# ---------------------------------------------------------------------------
# listing

def test_list_functions(corpus_build: Path) -> None:
    b = str(corpus_build)
    usdt = list_functions("./usdt", cwd=b)
    assert {str(p) for p in usdt if p.kind == "usdt"} == {f"usdt:{b}/usdt:corpus:tick",
                                                         f"usdt:{b}/usdt:corpus:label"}
    assert "main" in {p.name for p in usdt if p.kind == "uprobe"}
    rust = list_functions("./rust_args", "rust_args::*", cwd=b)
    assert {p.display for p in rust} == {"rust_args::hello", "rust_args::main"}
    assert next(p for p in rust if p.display == "rust_args::hello").file_offset == \
        resolve_function(f"{b}/rust_args", "rust_args::hello")
    assert format_listing(list_functions("./hello", "uprobe:*:add", cwd=b)) == f"uprobe:{b}/hello:add"
    assert parse_list_pattern("uprobe:./rust_args:rust_args::*") == ("uprobe", "./rust_args", "rust_args::*")
    assert parse_list_pattern("usdt:./usdt:corpus:*") == ("usdt", "./usdt", "corpus:*")
    assert parse_list_pattern("uprobe:*:malloc") == ("uprobe", None, "malloc")
    assert parse_list_pattern("f_*") == (None, None, "f_*")
    only_usdt = list_functions("./usdt", "corpus:*", cwd=b, kind="usdt")
    assert sorted(p.name for p in only_usdt) == ["corpus:label", "corpus:tick"]
    p = _spawn_python("")
    try:
        frees = list_functions(p.pid, "free")
        assert any(os.path.samefile(x.binary, LIBC) for x in frees)
    finally:
        p.kill()
        p.wait()


# ---------------------------------------------------------------------------
# libbpf itself as the oracle (root + kernel BPF): attach with libbpf and read
# the uprobe offset back from the kernel's link info

LIBBPF_OFFSETS_C = r"""/* Print the uprobe file offset libbpf computes for BINARY FUNC pairs, read back
 * from the kernel's BPF link info (perf_event.uprobe.offset). */
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <bpf/libbpf.h>
#include <bpf/bpf.h>

static int quiet(enum libbpf_print_level l, const char *f, va_list a) { (void)l; (void)f; (void)a; return 0; }

int main(int argc, char **argv)
{
	if (argc < 3) return 2;
	libbpf_set_print(quiet);
	struct bpf_object *obj = bpf_object__open_file(argv[1], NULL);
	if (!obj || bpf_object__load(obj)) { printf("load-error\n"); return 1; }
	struct bpf_program *prog = bpf_object__find_program_by_name(obj, argv[2]);
	if (!prog) { printf("no-prog\n"); return 1; }
	for (int i = 3; i + 1 < argc; i += 2) {
		LIBBPF_OPTS(bpf_uprobe_opts, o, .func_name = argv[i + 1]);
		struct bpf_link *l = bpf_program__attach_uprobe_opts(prog, getpid(), argv[i], 0, &o);
		if (!l) { printf("error\n"); continue; }
		unsigned char info[256];
		__u32 len = sizeof(info);
		memset(info, 0, sizeof(info));
		if (bpf_obj_get_info_by_fd(bpf_link__fd(l), info, &len)) { printf("info-error\n"); }
		else { __u32 off; memcpy(&off, info + 36, 4); printf("%u\n", off); }
		bpf_link__destroy(l);
	}
	return 0;
}
"""


@pytest.fixture(scope="module")
def libbpf_offsets(tmp_path_factory: pytest.TempPathFactory, corpus_build: Path):
    from ubpf_py.kernel.syscall import kernel_bpf_skip_reason

    reason = kernel_bpf_skip_reason()   # the environment cannot load BPF: the only reason to skip
    if reason:
        pytest.skip(reason)
    if not Path("/usr/include/bpf/libbpf.h").exists() or shutil.which("gcc") is None:
        pytest.skip("libbpf-dev or gcc missing")
    d = tmp_path_factory.mktemp("libbpf")
    (d / "o.c").write_text(LIBBPF_OFFSETS_C)
    exe = d / "libbpf_offsets"
    subprocess.run(["gcc", "-O1", "-o", str(exe), str(d / "o.c"), "-lbpf"], check=True, capture_output=True)

    def query(pairs: list[tuple[str, str]]) -> list[int | None]:
        args = [x for pair in pairs for x in pair]
        out = subprocess.run([str(exe), str(corpus_build / "hello.bpf.o"), "add_entry", *args],
                             capture_output=True, text=True, timeout=60).stdout.split()
        # the kernel can load BPF here (checked above): a refused object is a failure, not a skip
        assert not out or out[0] not in ("load-error", "no-prog"), f"libbpf could not load the object: {out}"
        return [int(x) if x.isdigit() else None for x in out]
    return query


@pytest.mark.kernel
def test_offsets_equal_libbpf(libbpf_offsets, corpus_build: Path, tmp_path: Path) -> None:
    pairs: list[tuple[str, str]] = []
    for case in _manifest():
        if case["attach"] == "auto":
            continue
        for entry in case["attach"]:
            if isinstance(entry, dict) and "function" in entry:
                pairs.append((resolve_binary(entry["binary"], cwd=str(corpus_build)), entry["function"]))
    # (libbpf 1.1 matches versions only in .symtab names; newer libbpf's
    # .dynsym versions are covered by test_symbol_versions)
    pairs += [(LIBC, "malloc"), (LIBC, "free")]
    pairs = sorted(set(pairs))
    got = libbpf_offsets(pairs)
    assert len(got) == len(pairs)
    for (binary, func), want in zip(pairs, got, strict=True):
        assert want is not None, (binary, func)
        assert resolve_function(binary, func) == want, (binary, func)
    # weak vs local precedence and the ambiguity error agree with libbpf too
    exe = _cc(tmp_path, "binds", {
        "a.c": "__attribute__((weak, noinline)) int wfoo(int x) { return x + 1; }\n"
               "static __attribute__((noinline)) int dup(int x) { return x * 3; }\n"
               "int call_a(int x) { return dup(x) + wfoo(x); }\n",
        "b.c": "static __attribute__((noinline)) int wfoo(int x) { return x * 7; }\n"
               "static __attribute__((noinline)) int dup(int x) { return x * 5; }\n"
               "int call_b(int x) { return dup(x) + wfoo(x); }\n"
               "int call_a(int);\nint main(int c, char **v) { return call_a(c) + call_b(c); }\n",
    })
    wfoo, dup = libbpf_offsets([(exe, "wfoo"), (exe, "dup")])
    assert wfoo == resolve_function(exe, "wfoo")
    assert dup is None
    with pytest.raises(SymbolError, match="ambiguous"):
        resolve_function(exe, "dup")
