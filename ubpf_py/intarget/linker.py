"""A small static linker: ELF64 x86-64 relocatable objects -> one image at a fixed base.

Why our own: the in-target code (the runtime from ``runtime/*.c`` and programs the
JIT emits as objects) must be placed at an address chosen in the *target* and
relocated by the tracer, with no dynamic loader involved (static, musl and Go
targets have none we could use).  The same linker places the runtime in the
tracer's own process, so Python map code calls the very C functions the target
runs.

Layout (sections of all objects, grouped by kind, each group page aligned so it
can get its own protection): ``.text*`` (read+exec), ``.rodata*`` plus the small
GOT (read-only once linked), then ``.data*`` and ``.bss*``/COMMON (read+write).
Unwind tables and other non-loadable sections are dropped: the runtime is built
without them and nothing in the target unwinds through it.

Relocations handled: R_X86_64_64, PC32, PLT32, 32, 32S, GOTPCREL, GOTPCRELX,
REX_GOTPCRELX (through GOT slots in the image; no relaxation).  Any other type is
refused with NotSupportedError naming it.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from elftools.elf.elffile import ELFFile

from ubpf_py.errors import NotSupportedError, UbpfError

PAGE = 4096
SHF_WRITE, SHF_ALLOC, SHF_EXECINSTR, SHF_TLS = 1, 2, 4, 0x400
SHN_UNDEF, SHN_ABS, SHN_COMMON = 0, 0xFFF1, 0xFFF2
R_NAMES = {0: "R_X86_64_NONE", 1: "R_X86_64_64", 2: "R_X86_64_PC32", 3: "R_X86_64_GOT32",
           4: "R_X86_64_PLT32", 5: "R_X86_64_COPY", 8: "R_X86_64_RELATIVE", 9: "R_X86_64_GOTPCREL",
           10: "R_X86_64_32", 11: "R_X86_64_32S", 12: "R_X86_64_16", 13: "R_X86_64_PC16",
           14: "R_X86_64_8", 15: "R_X86_64_PC8", 16: "R_X86_64_DTPMOD64", 17: "R_X86_64_DTPOFF64",
           18: "R_X86_64_TPOFF64", 19: "R_X86_64_TLSGD", 20: "R_X86_64_TLSLD", 21: "R_X86_64_DTPOFF32",
           22: "R_X86_64_GOTTPOFF", 23: "R_X86_64_TPOFF32", 24: "R_X86_64_PC64", 26: "R_X86_64_GOTPC32", 41: "R_X86_64_GOTPCRELX",
           42: "R_X86_64_REX_GOTPCRELX"}
R_64, R_PC32, R_PLT32, R_GOTPCREL, R_32, R_32S, R_GOTPCRELX, R_REX_GOTPCRELX = 1, 2, 4, 9, 10, 11, 41, 42
_GOT_TYPES = (R_GOTPCREL, R_GOTPCRELX, R_REX_GOTPCRELX)
_KINDS = ("text", "rodata", "data", "bss")


class LinkError(UbpfError):
    """Objects that cannot be linked (undefined or duplicate symbol, overflow)."""


@dataclass(slots=True)
class Image:
    """Linked bytes for ``base``: copy ``data`` to ``base``, then protect the ranges."""

    base: int
    data: bytearray
    symbols: dict[str, int]
    #: [start, end) ranges (absolute addresses, page aligned)
    exec_range: tuple[int, int]
    readonly_range: tuple[int, int]
    writable_range: tuple[int, int]
    sections: dict[str, int] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return len(self.data)

    def addr(self, name: str) -> int:
        try:
            return self.symbols[name]
        except KeyError:
            raise LinkError(f"symbol {name!r} is not defined by the linked objects") from None


def _kind(name: str, flags: int, sh_type: str) -> str | None:
    if not flags & SHF_ALLOC or name.startswith((".eh_frame", ".note", ".comment", ".llvm")):
        return None
    if flags & SHF_TLS:
        raise NotSupportedError(f"thread-local storage (section {name}) in code for the target; "
                                f"use a map or the runtime's thread block instead")
    if flags & SHF_EXECINSTR:
        return "text"
    if sh_type == "SHT_NOBITS":
        return "bss"
    if flags & SHF_WRITE:
        return "data"
    return "rodata"


def _align(v: int, a: int) -> int:
    return (v + a - 1) // a * a if a > 1 else v


class _Obj:
    def __init__(self, name: str, raw: bytes) -> None:
        self.name = name
        self.elf = ELFFile(io.BytesIO(raw))
        h = self.elf.header
        if h["e_machine"] != "EM_X86_64" or h["e_type"] != "ET_REL" or self.elf.elfclass != 64:
            raise LinkError(f"{name}: not an ELF64 x86-64 relocatable object "
                            f"({h['e_machine']}, {h['e_type']}); compile with -c for x86-64")
        self.sec_addr: dict[int, int] = {}
        self.symtab = self.elf.get_section_by_name(".symtab")
        self.syms = list(self.symtab.iter_symbols()) if self.symtab is not None else []


def link(objects: Iterable[tuple[str, bytes]], base: int, externs: Mapping[str, int] | None = None) -> Image:
    """Link ``(name, ELF bytes)`` objects for ``base`` (page aligned).  ``externs`` resolves
    symbols no object defines (absolute addresses)."""
    if base % PAGE:
        raise LinkError(f"link base 0x{base:x} is not page aligned")
    objs = [_Obj(n, raw) for n, raw in objects]
    externs = dict(externs or {})
    # ---- layout ------------------------------------------------------------------------------
    groups: dict[str, list[tuple[_Obj, int, object]]] = {k: [] for k in _KINDS}
    for o in objs:
        for idx, sec in enumerate(o.elf.iter_sections()):
            k = _kind(sec.name, sec["sh_flags"], sec["sh_type"])
            if k is not None and sec["sh_size"]:
                groups[k].append((o, idx, sec))
    commons: list[tuple[_Obj, int]] = [(o, i) for o in objs for i, s in enumerate(o.syms)
                                       if s["st_shndx"] == "SHN_COMMON"]
    off = 0
    starts: dict[str, int] = {}
    sections: dict[str, int] = {}

    def place(kind: str) -> None:
        nonlocal off
        starts[kind] = off
        for o, idx, sec in groups[kind]:
            off = _align(off, max(sec["sh_addralign"], 1))
            o.sec_addr[idx] = base + off
            sections.setdefault(f"{o.name}:{sec.name}", base + off)
            off += sec["sh_size"]

    place("text")
    off = _align(off, PAGE)
    ro_start = off
    place("rodata")
    off = _align(off, 8)
    got_off = off  # GOT slots go here; its size is known once relocations are scanned
    got_slots: dict[object, int] = {}
    for o in objs:
        for sec in o.elf.iter_sections():
            if sec["sh_type"] != "SHT_RELA" or sec["sh_info"] not in o.sec_addr:
                continue
            for r in sec.iter_relocations():
                if r["r_info_type"] in _GOT_TYPES:
                    key = _sym_key(o, r["r_info_sym"])
                    if key not in got_slots:
                        got_slots[key] = got_off + 8 * len(got_slots)
    off = got_off + 8 * len(got_slots)
    off = _align(off, PAGE)
    rw_start = off
    place("data")
    place("bss")
    common_addr: dict[tuple[int, int], int] = {}
    for o, i in commons:
        s = o.syms[i]
        off = _align(off, max(s["st_value"], 1))   # st_value of a COMMON symbol is its alignment
        common_addr[(id(o), i)] = base + off
        off += s["st_size"]
    end = _align(off, PAGE)
    # ---- symbols -----------------------------------------------------------------------------
    glob: dict[str, int] = {}
    owner: dict[str, str] = {}
    for o in objs:
        for i, s in enumerate(o.syms):
            bind = s["st_info"]["bind"]
            if bind == "STB_LOCAL" or s["st_shndx"] == "SHN_UNDEF" or not s.name:
                continue
            a = _sym_value(o, i, common_addr)
            if a is None:
                continue
            if s.name in glob and bind != "STB_WEAK" and owner[s.name] != "weak":
                raise LinkError(f"symbol {s.name!r} is defined twice ({owner[s.name]} and {o.name}); "
                                f"make one of them static")
            if s.name not in glob or owner[s.name] == "weak":
                glob[s.name] = a
                owner[s.name] = "weak" if bind == "STB_WEAK" else o.name

    def resolve(o: _Obj, i: int) -> int:
        s = o.syms[i]
        if s["st_shndx"] != "SHN_UNDEF":
            a = _sym_value(o, i, common_addr)
            if a is None:
                raise LinkError(f"{o.name}: symbol {s.name!r} is in a section that is not loaded")
            return a
        if s.name in glob:
            return glob[s.name]
        if s.name in externs:
            return externs[s.name]
        if s["st_info"]["bind"] == "STB_WEAK":
            return 0
        raise LinkError(f"undefined symbol {s.name!r} referenced by {o.name}; link the object that "
                        f"defines it or pass it as an extern")

    # ---- bytes and relocations -----------------------------------------------------------------
    data = bytearray(end)
    for kind in ("text", "rodata", "data"):
        for o, _idx, sec in groups[kind]:
            a = o.sec_addr[_idx] - base
            data[a:a + sec["sh_size"]] = sec.data()
    for key, slot in got_slots.items():
        o, i = key  # type: ignore[misc]
        struct.pack_into("<Q", data, slot, resolve(o, i) & 0xFFFFFFFFFFFFFFFF)
    for o in objs:
        for sec in o.elf.iter_sections():
            if sec["sh_type"] == "SHT_REL":
                raise NotSupportedError(f"REL relocations (without addends) in {o.name}:{sec.name}")
            if sec["sh_type"] != "SHT_RELA" or sec["sh_info"] not in o.sec_addr:
                continue
            target = o.sec_addr[sec["sh_info"]]
            for r in sec.iter_relocations():
                _apply(data, base, o, r, target, resolve, got_slots)
    return Image(base, data, glob, (base, base + ro_start), (base + ro_start, base + rw_start),
                 (base + rw_start, base + end), sections)


def _sym_key(o: _Obj, i: int) -> object:
    return (o, i)


def _sym_value(o: _Obj, i: int, common_addr: dict[tuple[int, int], int]) -> int | None:
    s = o.syms[i]
    shndx = s["st_shndx"]
    if shndx == "SHN_ABS":
        return s["st_value"]
    if shndx == "SHN_COMMON":
        return common_addr[(id(o), i)]
    if isinstance(shndx, int):
        sa = o.sec_addr.get(shndx)
        return None if sa is None else sa + s["st_value"]
    return None


def _apply(data: bytearray, base: int, o: _Obj, r, target: int, resolve, got_slots) -> None:
    t = r["r_info_type"]
    where = target + r["r_offset"]
    off = where - base
    a = r["r_addend"]
    sym = r["r_info_sym"]
    name = R_NAMES.get(t, f"relocation type {t}")
    if t == R_64:
        struct.pack_into("<Q", data, off, (resolve(o, sym) + a) & 0xFFFFFFFFFFFFFFFF)
        return
    if t in (R_PC32, R_PLT32):
        v = resolve(o, sym) + a - where
    elif t in _GOT_TYPES:
        v = base + got_slots[(o, sym)] + a - where
    elif t == R_32:
        v = resolve(o, sym) + a
        if not 0 <= v <= 0xFFFFFFFF:
            raise LinkError(f"{o.name}: {name} to {o.syms[sym].name!r} overflows (0x{v:x}); compile with -fPIC")
        struct.pack_into("<I", data, off, v)
        return
    elif t == R_32S:
        v = resolve(o, sym) + a
    else:
        raise NotSupportedError(f"{name} in {o.name} (the in-target linker handles 64, PC32, PLT32, 32, "
                                f"32S and GOTPCREL[X]); compile with -fPIC -mcmodel=small")
    if not -(1 << 31) <= v < (1 << 31):
        raise LinkError(f"{o.name}: {name} to {o.syms[sym].name!r} overflows ({v:#x}); the target is "
                        f"more than 2 GiB away")
    struct.pack_into("<i", data, off, v)
