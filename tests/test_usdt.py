"""USDT: .note.stapsdt parsing (against readelf -n), argument specs, semaphores,
the prelink adjustment, and the exact spec bytes libbpf writes (kernel oracle)."""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from paths import CORPUS

from ubpf_py.errors import NotSupportedError, SymbolError
from ubpf_py.probe.symbols import load_elf
from ubpf_py.probe.usdt import (
    SPEC_SIZE,
    UsdtSpecIds,
    encode_ip_to_spec_id,
    encode_usdt_spec,
    find_usdt,
    parse_usdt_args,
    read_usdt_notes,
)


def readelf_notes(path: str) -> list[dict]:
    text = subprocess.run(["readelf", "-nW", path], capture_output=True, text=True, check=True).stdout
    out = []
    for m in re.finditer(r"Provider: (\S+)\s+Name: (\S+)\s+Location: (0x[0-9a-f]+), Base: (0x[0-9a-f]+), "
                         r"Semaphore: (0x[0-9a-f]+)\s+Arguments: ?([^\n]*)", text):
        out.append({"provider": m.group(1), "name": m.group(2), "loc": int(m.group(3), 16),
                    "base": int(m.group(4), 16), "sema": int(m.group(5), 16), "args": m.group(6).strip()})
    return out


def readelf_load_segments(path: str) -> list[tuple[int, int, int, str]]:
    text = subprocess.run(["readelf", "-lW", path], capture_output=True, text=True, check=True).stdout
    segs = []
    for m in re.finditer(r"LOAD\s+(0x[0-9a-f]+)\s+(0x[0-9a-f]+)\s+0x[0-9a-f]+\s+0x[0-9a-f]+\s+(0x[0-9a-f]+)"
                         r"\s+([RWE ]+?)\s+0x", text):
        segs.append((int(m.group(1), 16), int(m.group(2), 16), int(m.group(3), 16), m.group(4)))
    return segs


def file_offset_via_readelf(path: str, vaddr: int) -> tuple[int, str]:
    for off, va, memsz, flags in readelf_load_segments(path):
        if va <= vaddr < va + memsz:
            return vaddr - va + off, flags
    raise AssertionError(f"{vaddr:#x} not in a segment of {path}")


pytestmark = pytest.mark.skipif(shutil.which("readelf") is None, reason="binutils readelf missing")


def test_corpus_usdt_notes_match_readelf(corpus_build: Path) -> None:
    for name in ("usdt", "usdt_cet"):
        path = str(corpus_build / name)
        notes = read_usdt_notes(path)
        ref = readelf_notes(path)
        assert [(n.provider, n.name, n.loc_addr, n.base_addr, n.sema_addr, n.args) for n in notes] == \
            [(r["provider"], r["name"], r["loc"], r["base"], r["sema"], r["args"]) for r in ref]
        for n in notes:
            off, flags = file_offset_via_readelf(path, n.loc_addr)
            assert n.file_offset == off and "E" in flags and n.sema_offset == 0 and n.problem is None
    tick = find_usdt(str(corpus_build / "usdt"), "corpus", "tick")
    assert len(tick) == 1
    assert [(a.kind, a.reg, a.size, a.signed) for a in tick[0].arguments()] == \
        [("reg", "eax", 4, True), ("reg", "rdx", 8, True)]


def test_spec_bytes_layout(corpus_build: Path) -> None:
    """struct __bpf_usdt_spec as usdt.bpf.h lays it out (checked against BTF of
    the corpus object: 208 bytes, args at 0 (16 each), cookie at 192, cnt at 200)."""
    (label,) = find_usdt(str(corpus_build / "usdt"), "corpus", "label")
    raw = encode_usdt_spec(label, cookie=0x1122334455667788)
    assert len(raw) == SPEC_SIZE == 208
    # 8@%rcx -4@%r8d -4@%r9d
    want = [(0, 1, 88, 0, 0), (0, 1, 72, 1, 32), (0, 1, 64, 1, 32)]
    for i, w in enumerate(want):
        assert struct.unpack_from("<QIhBb", raw, 16 * i) == w
    assert raw[48:192] == bytes(144)
    assert struct.unpack_from("<Qh", raw, 192) == (0x1122334455667788, 3)
    assert raw[202:] == bytes(6)
    # the BTF of the object agrees on the sizes we rely on
    btf = subprocess.run(["bpftool", "btf", "dump", "file", str(corpus_build / "usdt.bpf.o")],
                         capture_output=True, text=True)
    if btf.returncode == 0:
        assert "STRUCT '__bpf_usdt_spec' size=208" in btf.stdout
        assert "STRUCT '__bpf_usdt_arg_spec' size=16" in btf.stdout
        assert "'usdt_cookie' type_id=11 bits_offset=1536" in btf.stdout


def test_argument_forms() -> None:
    args = parse_usdt_args("-4@%edi 8@-8(%rbp) -4@$-9 8@$5 2@(%rsp) 1@%al -8@0x10(%r12) 8@(%r9,%rax,8)")
    assert [(a.kind, a.size, a.signed, a.val_off, a.reg_off) for a in args[:7]] == [
        ("reg", 4, True, 0, 112), ("deref", 8, False, -8, 32), ("const", 4, True, -9, 0),
        ("const", 8, False, 5, 0), ("deref", 2, False, 0, 152), ("reg", 1, False, 0, 80),
        ("deref", 8, True, 16, 24)]
    sib = args[7]
    assert (sib.kind, sib.reg, sib.index_reg, sib.scale, sib.reg_off, sib.index_reg_off) == \
        ("sib", "r9", "rax", 8, 64, 80)
    assert [a.bitshift for a in args[:3]] == [32, 0, 32]
    raw = encode_usdt_spec("-4@$-9")
    assert struct.unpack_from("<QIhBb", raw, 0) == ((1 << 64) - 9, 0, 0, 1, 32)
    with pytest.raises(NotSupportedError, match="scaled-index"):
        encode_usdt_spec("8@(%r9,%rax,8)")
    with pytest.raises(SymbolError, match="unrecognized register %ah"):
        parse_usdt_args("1@%ah")
    with pytest.raises(SymbolError, match="unsupported USDT argument size 3"):
        parse_usdt_args("3@%eax")
    with pytest.raises(SymbolError, match="unrecognized USDT argument #1"):
        parse_usdt_args("4@%eax 8@counter(%rip)")
    with pytest.raises(SymbolError, match="too many USDT arguments"):
        parse_usdt_args(" ".join(["8@%rax"] * 13))
    assert parse_usdt_args("") == []


SEMA_SRC = r"""
#define _SDT_HAS_SEMAPHORES 1
#include <sys/sdt.h>
#include <stdio.h>
unsigned short demo_ping_semaphore __attribute__((section(".probes")));
unsigned short demo_mem_semaphore __attribute__((section(".probes")));
int main(int argc, char **argv)
{
	volatile long x = argc * 7;
	long arr[4] = {1, 2, 3, 4};
	(void)argv;
	if (demo_ping_semaphore)
		printf("enabled\n");
	DTRACE_PROBE3(demo, ping, x, 5, arr[argc & 3]);
	long y = argc * 9;
	DTRACE_PROBE2(demo, mem, y, arr[1]);
	/* a scaled-index operand, written by hand as sdt.h would emit it */
	__asm__ volatile(
		"990: nop\n"
		".pushsection .note.stapsdt,\"?\",\"note\"\n"
		".balign 4\n"
		".4byte 992f-991f, 994f-993f, 3\n"
		"991: .asciz \"stapsdt\"\n"
		"992: .balign 4\n"
		"993: .8byte 990b\n"
		".8byte _.stapsdt.base\n"
		".8byte 0\n"
		".asciz \"demo\"\n"
		".asciz \"sib\"\n"
		".asciz \"8@(%r9,%rax,8) -4@$-9\"\n"
		"994: .balign 4\n"
		".popsection\n");
	return 0;
}
"""


@pytest.fixture(scope="module")
def sema_bin(tmp_path_factory: pytest.TempPathFactory) -> str:
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed")
    d = tmp_path_factory.mktemp("sdt")
    (d / "s.c").write_text(SEMA_SRC)
    r = subprocess.run(["gcc", "-O0", "-o", str(d / "s"), str(d / "s.c")], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot build an sdt.h program (systemtap-sdt-dev missing?): {r.stderr[:200]}")
    return str(d / "s")


def test_semaphores_and_memory_arguments(sema_bin: str) -> None:
    notes = {n.name: n for n in read_usdt_notes(sema_bin)}
    ref = {r["name"]: r for r in readelf_notes(sema_bin)}
    assert set(notes) == set(ref) == {"ping", "mem", "sib"}
    for name in ("ping", "mem"):
        n = notes[name]
        assert n.sema_addr == ref[name]["sema"] != 0
        off, flags = file_offset_via_readelf(sema_bin, n.sema_addr)
        assert n.sema_offset == off and "E" not in flags and "W" in flags
        assert n.file_offset == file_offset_via_readelf(sema_bin, n.loc_addr)[0]
        assert n.args == ref[name]["args"]
    # the semaphore symbols sit where the notes say
    info = load_elf(sema_bin)
    probes = info.sections[".probes"]
    assert notes["ping"].sema_offset == probes[1] and notes["mem"].sema_offset == probes[1] + 2
    kinds = [a.kind for a in notes["ping"].arguments()] + [a.kind for a in notes["mem"].arguments()]
    assert "const" in kinds and "deref" in kinds and "reg" in kinds
    encode_usdt_spec(notes["mem"], 1)
    with pytest.raises(NotSupportedError, match="scaled-index"):
        encode_usdt_spec(find_usdt(sema_bin, "demo", "sib")[0])


def test_prelink_base_adjustment(corpus_build: Path, tmp_path: Path) -> None:
    """Moving .stapsdt.base (as prelink moves sections but not notes) moves the pc."""
    copy = tmp_path / "usdt_prelinked"
    shutil.copy(corpus_build / "usdt", copy)
    data = bytearray(copy.read_bytes())
    e_shoff, = struct.unpack_from("<Q", data, 0x28)
    e_shentsize, e_shnum, e_shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    strtab_off = struct.unpack_from("<Q", data, e_shoff + e_shstrndx * e_shentsize + 0x18)[0]
    for i in range(e_shnum):
        sh = e_shoff + i * e_shentsize
        name_off = struct.unpack_from("<I", data, sh)[0]
        name = bytes(data[strtab_off + name_off: data.index(b"\0", strtab_off + name_off)])
        if name == b".stapsdt.base":
            addr = struct.unpack_from("<Q", data, sh + 0x10)[0]
            struct.pack_into("<Q", data, sh + 0x10, addr + 0x10)
            break
    else:
        pytest.fail(".stapsdt.base not found")
    copy.write_bytes(bytes(data))
    orig = {n.name: n for n in read_usdt_notes(str(corpus_build / "usdt"))}
    moved = {n.name: n for n in read_usdt_notes(str(copy))}
    for name, n in orig.items():
        assert moved[name].abs_ip == n.abs_ip + 0x10
        assert moved[name].file_offset == n.file_offset + 0x10


def test_lookup_errors_and_ids(corpus_build: Path) -> None:
    usdt = str(corpus_build / "usdt")
    with pytest.raises(SymbolError, match=r"USDT probe corpus:nope not found in .*it has: corpus:label, corpus:tick"):
        find_usdt(usdt, "corpus", "nope")
    with pytest.raises(SymbolError, match=r"no USDT probes in .*hello"):
        find_usdt(str(corpus_build / "hello"), "corpus", "tick")
    assert read_usdt_notes(str(corpus_build / "hello")) == []
    ids = UsdtSpecIds(max_specs=2)
    tick, label = find_usdt(usdt, "corpus", "tick")[0], find_usdt(usdt, "corpus", "label")[0]
    assert ids.assign(tick, 77) == (0, True)
    assert ids.assign(tick, 77) == (0, False)
    assert ids.assign(label, 0) == (1, True)
    with pytest.raises(SymbolError, match="too many distinct USDT specs"):
        ids.assign(tick, 78)
    key, value = encode_ip_to_spec_id(0x7F0000001234, 5)
    assert struct.unpack("<q", key)[0] == 0x7F0000001234 and struct.unpack("<I", value)[0] == 5
    assert struct.unpack("<q", encode_ip_to_spec_id(0xFFFFFFFFFFFFFFF0, 1)[0])[0] == -16


@pytest.mark.kernel
def test_spec_bytes_equal_libbpf_via_oracle(corpus_build: Path) -> None:
    """The kernel oracle (libbpf 1.1.2) dumps __bpf_usdt_specs after a run: every
    spec it wrote must equal one of ours for the same note and cookie."""
    from ubpf_py.kernel.syscall import kernel_bpf_skip_reason

    reason = kernel_bpf_skip_reason()   # the environment cannot load BPF: the only reason to skip
    if reason:
        pytest.skip(reason)
    oracle = CORPUS / "oracle" / "check.py"
    if not (corpus_build / "kernel_oracle").exists():
        pytest.skip("kernel_oracle not built")
    r = subprocess.run([sys.executable, str(oracle), "--build", str(corpus_build), "--dump", "usdt"],
                       capture_output=True, text=True, timeout=120)
    start = r.stdout.find("{")
    assert r.returncode == 0 and start >= 0, f"kernel oracle failed: {(r.stdout + r.stderr)[-300:]}"
    dump, _ = json.JSONDecoder().raw_decode(r.stdout[start:])
    specs = dump["maps"]["__bpf_usdt_specs"]
    written = {bytes.fromhex(v) for _k, v in specs["entries"] if v and bytes.fromhex(v) != bytes(SPEC_SIZE)}
    usdt = str(corpus_build / "usdt")
    ours = {encode_usdt_spec(find_usdt(usdt, "corpus", "tick")[0], 77),
            encode_usdt_spec(find_usdt(usdt, "corpus", "label")[0], 0)}
    assert specs["value_size"] == SPEC_SIZE
    assert written == ours
