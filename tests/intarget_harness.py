"""Run in-target trampolines inside the test process itself (no ptrace).

A small C library (tests/intarget_tramp_lib.c) is loaded with ctypes; the runtime
header, thread table, SITE and PROBE blocks are plain anonymous mappings of this
process, the trampoline page is mapped within +-2 GiB of the library, and the
library's text is made writable so a site can be patched and restored.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

from ubpf_py.abi.runtime import (
    PROBE_BLOCK,
    RUNTIME_HEADER,
    RUNTIME_MAGIC,
    SITE,
    THREAD_BLOCK,
)
from ubpf_py.intarget.sites import SitePlan, plan_site
from ubpf_py.intarget.space import GATE_OFFSET
from ubpf_py.intarget.trampoline import (
    build_entry_trampoline,
    build_return_trampoline,
    entry_size,
    patch_bytes,
    site_block,
)

SRC = Path(__file__).resolve().parent / "intarget_tramp_lib.c"
RUNTIME_INCLUDE = Path(__file__).resolve().parents[1] / "runtime"
PROT_RW, PROT_RWX = 3, 7
MAP_PRIVATE, MAP_ANON, MAP_FIXED_NOREPLACE = 0x02, 0x20, 0x100000
PAGE = 4096

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def build_lib(out_dir: Path, cf: str) -> Path:
    """Compile the test library with -fcf-protection=``cf``."""
    cc = shutil.which("gcc") or shutil.which("cc")
    out = out_dir / f"intarget_tramp_{cf}.so"
    subprocess.run([cc, "-O2", "-shared", "-fPIC", "-mgeneral-regs-only", "-masm=intel",
                    f"-fcf-protection={cf}", "-I", str(RUNTIME_INCLUDE), "-Wl,-Bsymbolic", "-o", str(out), str(SRC), "-lpthread"],
                   check=True, capture_output=True)
    return out


def mmap(size: int, prot: int = PROT_RW, hint: int = 0, flags: int = 0) -> int:
    addr = _libc.mmap(hint or None, size, prot, MAP_PRIVATE | MAP_ANON | flags, -1, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "mmap")
    return addr


def u64(addr: int) -> int:
    return ctypes.c_uint64.from_address(addr).value


def set_u64(addr: int, value: int) -> None:
    ctypes.c_uint64.from_address(addr).value = value & (2**64 - 1)


@dataclass
class Site:
    plan: SitePlan
    block: int
    trampoline: int
    probes: list[int]
    original: bytes


@dataclass
class Harness:
    path: Path
    slots: int = 16
    slot_size: int = 64 * 1024
    lib: ctypes.CDLL = field(init=False)
    syms: dict[str, tuple[int, int]] = field(init=False)
    base: int = field(init=False)
    sites: list[Site] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self.lib = ctypes.CDLL(str(self.path))
        with open(self.path, "rb") as f:
            elf = ELFFile(f)
            self.syms = {}
            for sec in elf.iter_sections():
                if isinstance(sec, SymbolTableSection):
                    for s in sec.iter_symbols():
                        if s.name and s["st_value"]:
                            self.syms[s.name] = (s["st_value"], s["st_size"])
            text = elf.get_section_by_name(".text")
            text_lo, text_hi = text["sh_addr"], text["sh_addr"] + text["sh_size"]
        self.base = ctypes.cast(self.lib.asm_push, ctypes.c_void_p).value - self.syms["asm_push"][0]
        lo = (self.base + text_lo) & ~(PAGE - 1)
        hi = (self.base + text_hi + PAGE - 1) & ~(PAGE - 1)
        assert _libc.mprotect(lo, hi - lo, PROT_RWX) == 0
        # the header's page and, GATE_OFFSET further on, the gate (open); untouched pages cost nothing
        self.arena = mmap(GATE_OFFSET + PAGE)
        set_u64(self.arena + GATE_OFFSET, 1)
        self.table = mmap(self.slots * self.slot_size)
        self.code = self._near_code_page(1 << 20)
        self.code_used = 0
        self.arena_used = 4096
        h = self.arena
        for name, value in (("magic", RUNTIME_MAGIC), ("arena_base", self.arena), ("arena_size", 1 << 20),
                            ("flags", 1), ("thread_table", self.table), ("thread_slots", self.slots),
                            ("thread_slot_size", self.slot_size)):
            set_u64(h + RUNTIME_HEADER.off(name), value)
        self.ret_tramp = self._code(build_return_trampoline(self.code, self.arena))

    def _near_code_page(self, size: int) -> int:
        for delta in range(1 << 24, 1 << 31, 1 << 24):
            for hint in (self.base - delta, self.base + delta):
                try:
                    addr = mmap(size, PROT_RWX, hint, MAP_FIXED_NOREPLACE)
                except OSError:
                    continue
                if addr == hint:
                    return addr
                _libc.munmap(addr, size)
        raise OSError("no free page within 2 GiB of the library")

    def _code(self, code: bytes) -> int:
        addr = self.code + self.code_used
        ctypes.memmove(addr, code, len(code))
        self.code_used += (len(code) + 63) & ~63
        return addr

    def _alloc(self, size: int) -> int:
        addr = self.arena + self.arena_used
        self.arena_used += (size + 63) & ~63
        return addr

    def addr(self, name: str) -> int:
        return self.base + self.syms[name][0]

    def func(self, name: str) -> tuple[int, int]:
        v, size = self.syms[name]
        return self.base + v, self.base + v + size

    def fn(self, name: str, nargs: int | None = None):
        """The library function ``name`` returning u64 (taking ``nargs`` u64 arguments if given)."""
        f = getattr(self.lib, name)
        f.restype = ctypes.c_uint64
        if nargs is not None:
            f.argtypes = [ctypes.c_uint64] * nargs
        return f

    def read(self, addr: int, n: int) -> bytes:
        return ctypes.string_at(addr, n)

    def plan(self, func: str, site: str | None = None) -> SitePlan:
        start, end = self.func(func)
        return plan_site(self.read, start, end, self.addr(site) if site else start)

    def probe(self, func: str, progs: list[tuple[str | None, int]], site: str | None = None,
              red_zone: bool = True) -> Site:
        """Patch ``func`` (or label ``site`` inside it) with probes [(program symbol or None, PB flags)]."""
        plan = self.plan(func, site)
        block = self._alloc(SITE.size)
        probes = []
        for i, (prog, flags) in enumerate(progs):
            pb = self._alloc(PROBE_BLOCK.size)
            set_u64(pb + PROBE_BLOCK.off("func_ip"), plan.site)
            set_u64(pb + PROBE_BLOCK.off("entry"), self.addr(prog) if prog else 0)
            set_u64(pb + PROBE_BLOCK.off("enabled"), 1)
            set_u64(pb + PROBE_BLOCK.off("flags"), flags)
            set_u64(pb + PROBE_BLOCK.off("probe_id"), i)
            probes.append(pb)
        tramp_at = self.code + self.code_used
        code = build_entry_trampoline(plan, tramp_at, runtime_header=self.arena, site_block=block,
                                      return_trampoline=self.ret_tramp, red_zone=red_zone)
        assert len(code) == entry_size(plan, red_zone)
        assert self._code(code) == tramp_at
        ctypes.memmove(block, site_block(plan, tramp_at, probes), SITE.size)
        site = Site(plan, block, tramp_at, probes, self.read(plan.site, plan.length))
        ctypes.memmove(plan.site, patch_bytes(plan.site, tramp_at, plan.length), plan.length)
        self.sites.append(site)
        return site

    def unpatch_all(self) -> None:
        for s in self.sites:
            ctypes.memmove(s.plan.site, s.original, len(s.original))
        self.sites.clear()

    def counter(self, pb: int, name: str) -> int:
        return u64(pb + PROBE_BLOCK.off(name))

    def global_u64(self, name: str, index: int = 0) -> int:
        return u64(self.addr(name) + 8 * index)

    def set_global(self, name: str, value: int) -> None:
        set_u64(self.addr(name), value)

    def thread_blocks(self) -> list[int]:
        """Addresses of the claimed thread slots."""
        out = []
        for i in range(self.slots):
            slot = self.table + i * self.slot_size
            if u64(slot + THREAD_BLOCK.off("key")):
                out.append(slot)
        return out
