"""Raw ELF access for BPF objects (pyelftools underneath).

Reads sections, symbols and REL relocations once into plain dataclasses so the
rest of the loader never touches pyelftools and never sees its exceptions: any
parse failure becomes one ObjectLoadError naming the file and the problem.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

from elftools.common.exceptions import ELFError, ELFParseError
from elftools.elf.elffile import ELFFile

from ubpf_py.errors import ObjectLoadError

EM_BPF = 247
SHT_PROGBITS = 1
SHT_NOBITS = 8
SHT_REL = 9
SHF_WRITE = 0x1
SHF_EXECINSTR = 0x4
SHN_UNDEF = 0
SHN_LORESERVE = 0xFF00
SHN_ABS = 0xFFF1
SHN_COMMON = 0xFFF2

STT_NOTYPE, STT_FUNC, STT_SECTION = 0, 2, 3
STB_LOCAL, STB_GLOBAL, STB_WEAK = 0, 1, 2

_SHN_NAMES = {"SHN_UNDEF": SHN_UNDEF, "SHN_ABS": SHN_ABS, "SHN_COMMON": SHN_COMMON}
_STT = {"STT_NOTYPE": 0, "STT_OBJECT": 1, "STT_FUNC": 2, "STT_SECTION": 3, "STT_FILE": 4}
_STB = {"STB_LOCAL": 0, "STB_GLOBAL": 1, "STB_WEAK": 2}


@dataclass(slots=True)
class Section:
    index: int
    name: str
    type: int
    flags: int
    size: int
    data: bytes
    link: int
    info: int

    @property
    def is_exec(self) -> bool:
        return bool(self.flags & SHF_EXECINSTR) and self.type == SHT_PROGBITS


@dataclass(slots=True)
class Symbol:
    index: int
    name: str
    value: int
    size: int
    type: int
    bind: int
    shndx: int
    #: STV_* visibility (0 default, 2 hidden)
    visibility: int = 0


@dataclass(slots=True)
class Rel:
    offset: int
    sym: int
    type: int


@dataclass
class RawElf:
    path: str
    sections: list[Section]
    symbols: list[Symbol]
    #: target section index -> relocations applying to it
    rels: dict[int, list[Rel]] = field(default_factory=dict)

    def section(self, name: str) -> Section | None:
        for s in self.sections:
            if s.name == name:
                return s
        return None

    def section_name(self, index: int) -> str:
        if 0 <= index < len(self.sections):
            return self.sections[index].name
        return f"#{index}"


def read_elf(path: str | Path) -> RawElf:
    p = str(path)
    try:
        with open(p, "rb") as fh:
            head = fh.read(20)
            if len(head) < 4 or head[:4] != b"\x7fELF":
                raise ObjectLoadError(f"{p}: not an ELF file; pass a BPF object built with clang -target bpf")
            if len(head) < 20:
                raise ObjectLoadError(f"{p}: truncated ELF header; rebuild the object")
            if head[4] != 2:
                raise ObjectLoadError(f"{p}: 32-bit ELF; BPF objects are ELF64 (clang -target bpf)")
            big = head[5] == 2
            (machine,) = struct.unpack_from(">H" if big else "<H", head, 18)
            if machine != EM_BPF:
                raise ObjectLoadError(
                    f"{p}: not a BPF object (ELF machine {machine}, expected EM_BPF 247); "
                    "compile with clang -target bpf")
            if big:
                raise ObjectLoadError(f"{p}: big-endian BPF object (bpfeb) is not supported; compile with -target bpf")
            fh.seek(0, 2)
            file_size = fh.tell()
            fh.seek(0)
            return _read(p, ELFFile(fh), file_size)
    except ObjectLoadError:
        raise
    except FileNotFoundError:
        raise ObjectLoadError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise ObjectLoadError(f"{p}: is a directory, not a BPF object") from None
    except PermissionError:
        raise ObjectLoadError(f"{p}: permission denied") from None
    except (ELFError, ELFParseError, struct.error, ValueError, IndexError, KeyError, UnicodeDecodeError,
            OSError, AssertionError, TypeError, AttributeError, OverflowError, MemoryError) as e:
        raise ObjectLoadError(f"{p}: malformed or truncated ELF ({type(e).__name__}: {e}); rebuild the object") from None


def _read(path: str, elf: ELFFile, file_size: int) -> RawElf:
    secs: list[Section] = []
    for i, s in enumerate(elf.iter_sections()):
        h = s.header
        stype = h["sh_type"]
        stype_num = {"SHT_NULL": 0, "SHT_PROGBITS": 1, "SHT_SYMTAB": 2, "SHT_STRTAB": 3, "SHT_RELA": 4,
                     "SHT_NOBITS": 8, "SHT_REL": 9}.get(stype, stype if isinstance(stype, int) else -1)
        if stype_num == SHT_NOBITS:
            data = b""
        elif h["sh_offset"] + h["sh_size"] > file_size:
            raise ObjectLoadError(f"{path}: section {s.name!r} runs past the end of the file; "
                                  "the object is truncated or corrupt")
        else:
            data = s.data()
            if len(data) != h["sh_size"]:
                raise ObjectLoadError(f"{path}: section {s.name} is truncated ({len(data)} of {h['sh_size']} bytes)")
        secs.append(Section(i, s.name, stype_num, h["sh_flags"], h["sh_size"], data, h["sh_link"], h["sh_info"]))
    syms: list[Symbol] = []
    symtab = elf.get_section_by_name(".symtab")
    if symtab is None or not hasattr(symtab, "iter_symbols"):
        raise ObjectLoadError(f"{path}: no .symtab section; do not strip BPF objects")
    for i, sym in enumerate(symtab.iter_symbols()):
        e = sym.entry
        shndx = e["st_shndx"]
        if isinstance(shndx, str):
            shndx = _SHN_NAMES.get(shndx, SHN_LORESERVE)
        info = e["st_info"]
        other = e["st_other"]
        vis = other["visibility"] if isinstance(other, dict) or hasattr(other, "__getitem__") else 0
        vis_num = {"STV_DEFAULT": 0, "STV_INTERNAL": 1, "STV_HIDDEN": 2, "STV_PROTECTED": 3}.get(vis, 0) \
            if isinstance(vis, str) else int(vis)
        syms.append(Symbol(i, sym.name, e["st_value"], e["st_size"], _STT.get(info["type"], -1),
                           _STB.get(info["bind"], -1), shndx, vis_num))
    raw = RawElf(path, secs, syms)
    for s in secs:
        if s.type != SHT_REL:
            continue
        if s.info >= len(secs):
            raise ObjectLoadError(f"{path}: relocation section {s.name} points to missing section {s.info}")
        if len(s.data) % 16:
            raise ObjectLoadError(f"{path}: relocation section {s.name} has a bad size")
        rels = []
        for off in range(0, len(s.data), 16):
            r_offset, r_info = struct.unpack_from("<QQ", s.data, off)
            sym = r_info >> 32
            if sym >= len(syms):
                raise ObjectLoadError(f"{path}: relocation in {s.name} refers to missing symbol {sym}")
            rels.append(Rel(r_offset, sym, r_info & 0xFFFFFFFF))
        raw.rels.setdefault(s.info, []).extend(rels)
    return raw
