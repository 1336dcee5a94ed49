"""Shared helpers of the probe engine tests (tests/test_probe_*.py); no tests here.

Function offsets come from pyelftools directly (symbol value -> file offset
through its PT_LOAD segment), independent of ubpf_py.probe.symbols, so a bug
there cannot hide one here.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from elftools.elf.elffile import ELFFile

from ubpf_py.probe.engine import ProbeSession

REPO = Path(__file__).resolve().parents[1]
FLOOR_DIR = REPO / "benchmarks" / "ptrace_floor"


def func_offset(path: str | os.PathLike, name: str) -> int:
    with open(path, "rb") as f:
        elf = ELFFile(f)
        for secname in (".symtab", ".dynsym"):
            sec = elf.get_section_by_name(secname)
            if sec is None:
                continue
            syms = sec.get_symbol_by_name(name)
            if not syms:
                continue
            v = syms[0]["st_value"]
            for seg in elf.iter_segments():
                if seg["p_type"] == "PT_LOAD" and seg["p_vaddr"] <= v < seg["p_vaddr"] + seg["p_memsz"]:
                    return v - seg["p_vaddr"] + seg["p_offset"]
    raise KeyError(f"{name} not in {path}")


def build_c(src: Path, out: Path, *flags: str) -> Path:
    if not shutil.which("gcc"):
        import pytest
        pytest.skip("gcc not installed")
    subprocess.run(["gcc", "-O2", "-g", *flags, "-o", str(out), str(src)], check=True)
    return out


def regs(hit) -> ctypes.Array:
    """The pt_regs of a hit as 21 u64 (r15 r14 r13 r12 rbp rbx r11 r10 r9 r8 rax rcx rdx rsi rdi
    orig_rax rip cs eflags rsp ss)."""
    return (ctypes.c_uint64 * 21).from_address(hit.ctx_addr)


RAX, RDX, RSI, RDI, RIP, RSP = 10, 12, 13, 14, 16, 19


def s64(v: int) -> int:
    return v - (1 << 64) if v >> 63 else v


@dataclass
class Run:
    stdout: bytes
    status: int | None
    events: list[tuple] = field(default_factory=list)
    session: ProbeSession | None = None


def run_probed(argv, probes, cwd=None, native=None, follow_forks=False, record=None) -> Run:
    """Launch ``argv`` with ``probes`` = [(binary, function, is_return[, cookie])] (``native``: None =
    default loop, False = Python, True = C loop); every hit appends
    ``record(name, is_return, hit)`` (default: (name, is_return, rdi or rax)) to the events."""
    r, w = os.pipe()
    s = ProbeSession.launch(argv, cwd=cwd, stdout=w, native=bool(native) if native is not None else None,
                            follow_forks=follow_forks)
    os.close(w)
    events: list[tuple] = []

    def make(name, is_ret):
        def h(hit):
            if record is not None:
                events.append(record(name, is_ret, hit))
            else:
                rg = regs(hit)
                events.append((name, is_ret, s64(rg[RAX] if is_ret else rg[RDI])))
        return h

    try:
        for p in probes:
            binary, fn, is_ret = p[:3]
            cookie = p[3] if len(p) > 3 else 0
            s.add_probe(str(binary), func_offset(binary, fn), make(fn, is_ret), is_return=is_ret, cookie=cookie)
        status = s.run()
    finally:
        s.detach()
    out = b""
    while True:
        d = os.read(r, 65536)
        if not d:
            break
        out += d
    os.close(r)
    return Run(out, status, events, s)


def run_plain(argv, cwd=None) -> tuple[bytes, int]:
    p = subprocess.run(argv, cwd=cwd, capture_output=True)
    return p.stdout, p.returncode
