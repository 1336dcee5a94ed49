"""Symbolizing runtime addresses of corpus targets, checked against addr2line."""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import capstone
import pytest

from ubpf_py.output import symbolize as S
from ubpf_py.output.symbolize import Frame, Symbolizer
from ubpf_py.probe import demangle as dm
from ubpf_py.probe.procmaps import Mapping, file_offset_to_addr, read_maps
from ubpf_py.probe.symbols import load_elf, lookup_function

PTRACE_TRACEME, PTRACE_CONT, PTRACE_SETOPTIONS = 0, 7, 0x4200
PTRACE_O_TRACEEXIT, PTRACE_O_EXITKILL, PTRACE_EVENT_EXIT = 0x40, 0x100000, 6
_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]


def _traceme() -> None:
    _libc.ptrace(PTRACE_TRACEME, 0, None, None)


@contextmanager
def stopped_at_exit(argv: list[str], cwd: Path, before_run=None) -> Iterator[tuple[int, list[Mapping]]]:
    """Run ``argv`` until it is about to exit (PTRACE_O_TRACEEXIT): every mapping is still there."""
    p = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.DEVNULL, preexec_fn=_traceme)
    pid = p.pid
    try:
        _pid, status = os.waitpid(pid, 0)  # SIGTRAP after exec
        if not os.WIFSTOPPED(status):
            pytest.skip("cannot ptrace a child process here")
        if _libc.ptrace(PTRACE_SETOPTIONS, pid, None, PTRACE_O_TRACEEXIT | PTRACE_O_EXITKILL) != 0:
            pytest.skip("PTRACE_SETOPTIONS refused")
        if before_run is not None:
            before_run(pid)
        sig = 0
        for _ in range(1000):
            _libc.ptrace(PTRACE_CONT, pid, None, sig)
            _pid, status = os.waitpid(pid, 0)
            assert os.WIFSTOPPED(status), f"{argv[0]} ended before its exit event (status {status:#x})"
            if status >> 16 == PTRACE_EVENT_EXIT:
                break
            sig = os.WSTOPSIG(status)  # a signal stop: deliver the signal and go on
        yield pid, read_maps(pid)
    finally:
        # never Popen.poll() a traced child: its waitpid would swallow a stop
        # SIGKILL alone does not end a tracee parked in its exit stop: continue it too
        os.kill(pid, signal.SIGKILL)
        _libc.ptrace(PTRACE_CONT, pid, None, None)
        os.waitpid(pid, 0)
        p.returncode = -signal.SIGKILL


def _addr2line(binary: Path, vaddr: int) -> tuple[str, str | None, int | None]:
    """(outermost function, innermost file, innermost line) from ``addr2line -f -i``."""
    if shutil.which("addr2line") is None:
        pytest.skip("addr2line (binutils) not installed")
    out = subprocess.run(["addr2line", "-f", "-i", "-e", str(binary), hex(vaddr)],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    funcs, locs = out[0::2], out[1::2]
    m = re.match(r"(.*):(\d+)", locs[0].split(" (discriminator")[0])
    if m is None or m.group(1) == "??" or m.group(2) == "0":
        return funcs[-1], None, None
    return funcs[-1], os.path.normpath(m.group(1)), int(m.group(2))


def _instructions(binary: Path, name: str) -> list[capstone.CsInsn]:
    info = load_elf(str(binary))
    sym = lookup_function(str(binary), name).symbol
    with open(binary, "rb") as f:
        f.seek(sym.file_offset)
        code = f.read(sym.size)
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    assert info.offset_to_vaddr(sym.file_offset) == sym.value
    return list(md.disasm(code, sym.value))


def _runtime(maps: list[Mapping], binary: Path, vaddr: int) -> int:
    off = load_elf(str(binary)).vaddr_to_offset(vaddr)
    assert off is not None
    addrs = file_offset_to_addr(maps, str(binary), off)
    assert addrs, f"{binary} is not mapped"
    return addrs[0]


def _check_against_addr2line(frame: Frame, binary: Path, vaddr: int, sym_value: int) -> None:
    func, src, line = _addr2line(binary, vaddr)
    assert frame.symbol == func
    assert frame.offset == vaddr - sym_value
    assert frame.binary == str(binary)
    assert (frame.source, frame.line) == (src, line)


@pytest.fixture(scope="module")
def mallocs(corpus_build: Path) -> Iterator[tuple[Path, int, list[Mapping]]]:
    binary = corpus_build / "mallocs"
    with stopped_at_exit([str(binary)], corpus_build) as (pid, maps):
        yield binary, pid, maps


@pytest.mark.parametrize("func", ["alloc_small", "leaf_alloc", "middle", "outer", "main"])
def test_c_function_and_offsets_match_addr2line(mallocs, func: str) -> None:
    binary, pid, maps = mallocs
    sym = lookup_function(str(binary), func).symbol
    insns = _instructions(binary, func)
    sample = [*insns[:: max(1, len(insns) // 6)], insns[-1]]
    sz = Symbolizer(maps, pid)
    for insn in sample:
        frame = sz.symbolize(_runtime(maps, binary, insn.address))
        _check_against_addr2line(frame, binary, insn.address, sym.value)
        assert frame.function == func
        assert frame.source is not None and frame.source.endswith("targets/mallocs.c")
        assert str(frame) == f"{func}+{insn.address - sym.value:#x} ({binary}) {frame.source}:{frame.line}"


def test_stack_of_return_addresses(mallocs) -> None:
    """leaf_alloc <- middle <- outer <- main: caller frames are looked up at addr - 1."""
    binary, pid, maps = mallocs
    leaf = lookup_function(str(binary), "leaf_alloc").symbol
    stack = [_runtime(maps, binary, leaf.value + 4)]
    expect = [("leaf_alloc", leaf.value + 4, leaf.value)]
    for caller, callee in (("middle", "leaf_alloc"), ("outer", "middle"), ("main", "outer")):
        target = lookup_function(str(binary), callee).symbol.value
        calls = [i for i in _instructions(binary, caller) if i.mnemonic in ("call", "jmp") and i.op_str == hex(target)]
        assert calls, f"no call from {caller} to {callee}"
        ret = calls[0].address + calls[0].size
        stack.append(_runtime(maps, binary, ret))
        expect.append((caller, ret, lookup_function(str(binary), caller).symbol.value))
    sz = Symbolizer(maps, pid)
    frames = sz.symbolize_stack([*stack, 0, 0, 0])
    assert len(frames) == 4                                   # trailing zero slots dropped
    for frame, (name, vaddr, start) in zip(frames, expect, strict=True):
        assert frame.function == name
        assert frame.offset == vaddr - start                  # offset of the address itself
        looked_up = vaddr if frame is frames[0] else vaddr - 1
        _func, src, line = _addr2line(binary, looked_up)
        assert (frame.source, frame.line) == (src, line)
    lines = sz.format_stack([*stack, 0])
    assert [ln.split("+")[0] for ln in lines] == ["leaf_alloc", "middle", "outer", "main"]
    assert lines[1].startswith(f"middle+{expect[1][1] - expect[1][2]:#x} ({binary}) ")


def _libc_malloc(maps: list[Mapping], offset: int) -> tuple[str, int, int]:
    """(libc path, runtime address, link-time address) of malloc + offset."""
    libc = next(m.path for m in maps if re.search(r"/libc[.-].*so", m.path))
    match = lookup_function(libc, "malloc", offset)
    return libc, file_offset_to_addr(maps, libc, match.file_offset)[0], match.symbol.value + offset


def test_libc_without_dwarf(mallocs) -> None:
    """Only the library's own symbols (no debug file): function+offset, no line."""
    _binary, pid, maps = mallocs
    libc, addr, _vaddr = _libc_malloc(maps, 7)
    frame = Symbolizer(maps, pid, debug_dirs=()).symbolize(addr)
    assert frame.function == "malloc" and frame.offset == 7
    assert frame.source is None and frame.line is None
    assert str(frame) == f"malloc+0x7 ({libc})"


def test_libc_with_debug_file(mallocs) -> None:
    """libc6-dbg's build-id file gives libc source lines (what addr2line finds too)."""
    _binary, pid, maps = mallocs
    libc, addr, vaddr = _libc_malloc(maps, 7)
    if S.find_debug_file(libc, load_elf(libc)) is None:
        pytest.skip("no separate debug file for libc (install libc6-dbg)")
    frame = Symbolizer(maps, pid).symbolize(addr)
    assert frame.function == "malloc" and frame.offset == 7   # exported name, not __GI___libc_malloc
    _func, src, line = _addr2line(Path(libc), vaddr)
    assert src is not None and (frame.source, frame.line) == (src, line)
    free = lookup_function(libc, "free", 3)
    f2 = Symbolizer(maps, pid).symbolize(file_offset_to_addr(maps, libc, free.file_offset)[0])
    assert (f2.function, f2.offset) == ("free", 3)            # not cfree@GLIBC_2.2.5


def test_pseudo_and_unmapped_addresses(mallocs) -> None:
    _binary, pid, maps = mallocs
    sz = Symbolizer(maps, pid)
    stack = next(m for m in maps if m.path == "[stack]")
    assert str(sz.symbolize(stack.start + 16)) == f"{stack.start + 16:#x} ([stack])"
    assert str(sz.symbolize(0x10)) == "0x10"
    assert sz.format_stack([]) == []


def test_rust_demangled(corpus_build: Path) -> None:
    binary = corpus_build / "rust_args"
    if not binary.exists():
        pytest.skip("rust_args not built (no rustc)")
    with stopped_at_exit([str(binary), "a", "bb"], corpus_build) as (pid, maps):
        match = lookup_function(str(binary), "rust_args::hello")
        sym = match.symbol
        sz = Symbolizer(maps, pid)
        insns = _instructions(binary, "rust_args::hello")
        for insn in (insns[0], insns[-1]):
            frame = sz.symbolize(_runtime(maps, binary, insn.address))
            assert frame.function == "rust_args::hello"
            assert frame.symbol == sym.name and sym.name.startswith("_ZN9rust_args5hello17h")
            _check_against_addr2line(frame, binary, insn.address, sym.value)
            assert str(frame).startswith(f"rust_args::hello+{insn.address - sym.value:#x} ({binary})")
        # the standard library does carry line tables: a few std functions against addr2line
        info = load_elf(str(binary))
        std = sorted((s for s in info.symtab if s.defined and s.size > 64
                      and (dm.demangle(s.name) or "").startswith("std::")), key=lambda s: s.value)
        assert std
        checked = 0
        for s in std[:: max(1, len(std) // 5)]:
            vaddr = s.value + 16
            frame = sz.symbolize(_runtime(maps, binary, vaddr))
            _check_against_addr2line(frame, binary, vaddr, s.value)
            assert frame.function == dm.display_name(s.name)
            checked += frame.line is not None
        assert checked, "no std frame had a line: the line tables were not read"


def test_deleted_binary_through_map_files(corpus_build: Path, tmp_path: Path) -> None:
    copy = tmp_path / "mallocs"
    shutil.copy2(corpus_build / "mallocs", copy)
    with stopped_at_exit([str(copy)], corpus_build, before_run=lambda _pid: copy.unlink()) as (pid, maps):
        mine = [m for m in maps if m.path == str(copy)]
        assert mine and all(m.deleted for m in mine)
        if not os.access(f"/proc/{pid}/map_files/{mine[0].start:x}-{mine[0].end:x}", os.R_OK):
            pytest.skip("/proc/PID/map_files is not readable here")
        text = next(m for m in mine if m.executable)
        sym = lookup_function(str(corpus_build / "mallocs"), "alloc_big").symbol
        addr = text.start + (sym.file_offset - text.offset)
        frame = Symbolizer(maps, pid).symbolize(addr)
        assert (frame.function, frame.offset, frame.binary) == ("alloc_big", 0, str(copy))
        assert Symbolizer(maps).symbolize(addr).function is None   # no pid: the file is gone


def test_line_decoder_matches_pyelftools(corpus_build: Path) -> None:
    """The hand-run line state machine gives pyelftools' rows (small CUs only: pyelftools is slow)."""
    for name in ("mallocs", "rust_args"):
        path = corpus_build / name
        if not path.exists():
            continue
        b = S._binary(str(path))
        assert b is not None
        li = S._line_info(b)
        assert li is not None
        compared = 0
        for cu in li.dwarf.iter_CUs():
            prog = li.dwarf.line_program_for_CU(cu)
            if prog is None or prog.header["unit_length"] > 30000:
                continue
            files = S._file_names(prog, S._attr_str(cu.get_top_DIE(), "DW_AT_comp_dir") or "")
            mine = S._run_line_program(prog, cu.header["address_size"], files)
            ref = [(e.state.address, 0 if e.state.end_sequence else 1, files.get(e.state.file), e.state.line,
                    e.state.end_sequence) for e in prog.get_entries() if e.state is not None]
            assert mine == ref
            compared += len(ref)
        assert compared > 0


def test_cu_ranges_fallback_without_aranges(corpus_build: Path) -> None:
    """Binaries without .debug_aranges find their CU through the CUs' own address ranges."""
    b = S._binary(str(corpus_build / "mallocs"))
    assert b is not None
    li = S._line_info(b)
    assert li is not None and li.aranges is not None
    bare = S._LineInfo(li.stream, li.dwarf, None)
    main = lookup_function(str(corpus_build / "mallocs"), "main").symbol
    for vaddr in range(main.value, main.value + main.size, 3):
        assert bare.lookup(vaddr) == li.lookup(vaddr)
    assert bare.lookup(main.value) is not None
