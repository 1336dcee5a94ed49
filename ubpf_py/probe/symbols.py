"""ELF function symbols and uprobe file offsets, computed the way libbpf does.

libbpf's ``elf_find_func_offset`` is the reference:

* search ``.dynsym`` first, then ``.symtab`` only if ``.dynsym`` gave nothing
  (a stripped library has only ``.dynsym``; a static Go binary only ``.symtab``);
* a name matches a symbol called exactly that, or that name followed by
  ``@VER``/``@@VER`` (``.symtab`` spells versions into names);
* ``name@VER`` / ``name@@VER`` asks for a version: in ``.dynsym`` the version
  comes from ``.gnu.version`` + ``.gnu.version_d``; in ``.symtab`` the whole
  text must be equal;
* several matches at one offset are fine; at different offsets, one non-weak
  symbol wins over weak ones, two non-weak ones are an error;
* the offset is ``st_value - sh_addr + sh_offset`` of the symbol's section.

Two deliberate differences, both where libbpf would fail: ``STT_GNU_IFUNC``
symbols are accepted too (the probe lands on the resolver, as with bpftrace),
and an unversioned name whose matches differ only by version prefers the
default (``@@``) version, as the dynamic linker binds it.  When no raw symbol
matches, demangled spellings are tried (see :mod:`ubpf_py.probe.demangle`).
"""

from __future__ import annotations

import difflib
import os
import struct
from dataclasses import dataclass, field

from elftools.elf.elffile import ELFFile

from ubpf_py.errors import NotSupportedError, SymbolError
from ubpf_py.probe import demangle as dm

STT_FUNC = 2
STT_GNU_IFUNC = 10
STB_LOCAL, STB_GLOBAL, STB_WEAK = 0, 1, 2
SHN_UNDEF = 0
SHN_LORESERVE = 0xFF00
PF_X = 1
VERSYM_HIDDEN = 0x8000
VERSYM_VERSION = 0x7FFF
ET_EXEC, ET_DYN = 2, 3

_SYM = struct.Struct("<IBBHQQ")   # Elf64_Sym
_VERDEF = struct.Struct("<HHHHIII")
_VERDAUX = struct.Struct("<II")
_VERNEED = struct.Struct("<HHIII")
_VERNAUX = struct.Struct("<IHHII")


@dataclass(frozen=True, slots=True)
class Symbol:
    """One function symbol (STT_FUNC or STT_GNU_IFUNC)."""

    name: str            # as stored (``.symtab`` names may carry ``@VER``)
    value: int           # st_value (link-time virtual address)
    size: int
    bind: int            # STB_*
    type: int            # STT_*
    shndx: int
    table: str           # "dynsym" | "symtab"
    version: str | None  # ``.dynsym`` version name (from versym), if any
    hidden: bool         # versym hidden bit: only reachable as name@VER
    file_offset: int | None  # None for undefined / absolute symbols

    @property
    def defined(self) -> bool:
        return self.file_offset is not None

    @property
    def base_name(self) -> str:
        """The name without any ``@VER`` part."""
        return self.name.split("@", 1)[0]

    @property
    def versioned_name(self) -> str:
        """``name@@VER`` / ``name@VER`` (as ``nm -D`` prints), or the bare name."""
        if self.version is None or "@" in self.name:
            return self.name
        return f"{self.name}{'@' if self.hidden else '@@'}{self.version}"


@dataclass(frozen=True, slots=True)
class Segment:
    """A PT_LOAD program header."""

    vaddr: int
    memsz: int
    offset: int
    filesz: int
    flags: int

    @property
    def executable(self) -> bool:
        return bool(self.flags & PF_X)


@dataclass(slots=True)
class ElfInfo:
    """What the attach-point code needs from one ELF file, parsed once."""

    path: str
    e_type: int
    machine: str
    segments: list[Segment]
    sections: dict[str, tuple[int, int, int]]  # name -> (sh_addr, sh_offset, sh_size)
    dynsym: list[Symbol]
    symtab: list[Symbol]
    needed: list[str]
    runpath: list[str]
    rpath: list[str]
    notes_stapsdt: bytes | None
    _demangled: dict[str, list[Symbol]] | None = field(default=None, repr=False)

    def functions(self) -> list[Symbol]:
        """Defined function symbols of both tables (``.dynsym`` first)."""
        return [s for s in self.dynsym + self.symtab if s.defined]

    def vaddr_to_offset(self, vaddr: int) -> int | None:
        """File offset of a link-time address through its PT_LOAD segment."""
        for seg in self.segments:
            if seg.vaddr <= vaddr < seg.vaddr + seg.memsz:
                return vaddr - seg.vaddr + seg.offset
        return None

    def offset_to_vaddr(self, off: int) -> int | None:
        for seg in self.segments:
            if seg.offset <= off < seg.offset + seg.filesz:
                return off - seg.offset + seg.vaddr
        return None

    def segment_of(self, vaddr: int) -> Segment | None:
        for seg in self.segments:
            if seg.vaddr <= vaddr < seg.vaddr + seg.memsz:
                return seg
        return None

    def demangled_index(self) -> dict[str, list[Symbol]]:
        """Every demangled spelling -> defined symbols (built on first use)."""
        if self._demangled is None:
            idx: dict[str, list[Symbol]] = {}
            for s in self.functions():
                for v in dm.name_variants(s.base_name):
                    idx.setdefault(v, []).append(s)
            self._demangled = idx
        return self._demangled


# ---------------------------------------------------------------------------
# parsing

_cache: dict[str, tuple[tuple[int, int, int], ElfInfo]] = {}


def _cstr(blob: bytes, off: int) -> str:
    end = blob.find(b"\0", off)
    if end < 0:
        end = len(blob)
    return blob[off:end].decode("utf-8", "replace")


def _check_file(path: str) -> os.stat_result:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise SymbolError(f"binary not found: {path} (check the path, or give the full path)") from None
    except PermissionError:
        raise SymbolError(f"cannot read {path}: permission denied") from None
    if not os.path.isfile(path):
        raise SymbolError(f"not a regular file: {path} (name an executable or a shared library)")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except PermissionError:
        raise SymbolError(f"cannot read {path}: permission denied") from None
    if magic != b"\x7fELF":
        raise SymbolError(f"not an ELF file: {path} (name an executable or a shared library, "
                          "not a script or a linker script)")
    return st


def load_elf(path: str) -> ElfInfo:
    """Parse ``path`` (cached per file identity and mtime)."""
    st = _check_file(path)
    key = os.path.realpath(path)
    ident = (st.st_mtime_ns, st.st_size, st.st_ino)
    hit = _cache.get(key)
    if hit is not None and hit[0] == ident:
        return hit[1]
    info = _parse(path)
    _cache[key] = (ident, info)
    return info


def _parse(path: str) -> ElfInfo:
    with open(path, "rb") as f:
        try:
            elf = ELFFile(f)
        except Exception as e:  # pyelftools raises several types on garbage
            raise SymbolError(f"malformed ELF file {path}: {e}") from None
        if elf.elfclass != 64 or not elf.little_endian:
            raise NotSupportedError(f"{path}: only 64-bit little-endian ELF files (x86-64) are supported")
        e_type = {"ET_EXEC": ET_EXEC, "ET_DYN": ET_DYN}.get(elf["e_type"], 0)
        segments = [Segment(p["p_vaddr"], p["p_memsz"], p["p_offset"], p["p_filesz"], p["p_flags"])
                    for p in elf.iter_segments() if p["p_type"] == "PT_LOAD"]
        shdrs = [(s.name, s["sh_type"], s["sh_addr"], s["sh_offset"], s["sh_size"], s["sh_link"])
                 for s in elf.iter_sections()]
        sections = {name: (addr, off, size) for name, _t, addr, off, size, _l in shdrs}

        def raw(idx: int) -> bytes:
            _n, t, _a, off, size, _l = shdrs[idx]
            if t == "SHT_NOBITS" or size == 0:
                return b""
            f.seek(off)
            return f.read(size)

        idx_of = {t: i for i, (_n, t, *_r) in enumerate(shdrs)}
        versions: dict[int, str] = {}
        if "SHT_GNU_verdef" in idx_of:
            i = idx_of["SHT_GNU_verdef"]
            versions.update(_parse_verdef(raw(i), raw(shdrs[i][5])))
        if "SHT_GNU_verneed" in idx_of:
            i = idx_of["SHT_GNU_verneed"]
            versions.update(_parse_verneed(raw(i), raw(shdrs[i][5])))
        versym = raw(idx_of["SHT_GNU_versym"]) if "SHT_GNU_versym" in idx_of else b""

        tables: dict[str, list[Symbol]] = {"dynsym": [], "symtab": []}
        for i, (_n, t, *_r) in enumerate(shdrs):
            if t == "SHT_DYNSYM":
                tables["dynsym"] = _parse_symtab(raw(i), raw(shdrs[i][5]), shdrs, "dynsym",
                                                 versym, versions)
            elif t == "SHT_SYMTAB":
                tables["symtab"] = _parse_symtab(raw(i), raw(shdrs[i][5]), shdrs, "symtab", b"", {})

        needed: list[str] = []
        runpath: list[str] = []
        rpath: list[str] = []
        dyn = elf.get_section_by_name(".dynamic")
        if dyn is not None and hasattr(dyn, "iter_tags"):
            for tag in dyn.iter_tags():
                if tag.entry.d_tag == "DT_NEEDED":
                    needed.append(tag.needed)
                elif tag.entry.d_tag == "DT_RUNPATH":
                    runpath.extend(p for p in tag.runpath.split(":") if p)
                elif tag.entry.d_tag == "DT_RPATH":
                    rpath.extend(p for p in tag.rpath.split(":") if p)
        notes = None
        if ".note.stapsdt" in sections:
            notes = raw(next(i for i, s in enumerate(shdrs) if s[0] == ".note.stapsdt"))
        return ElfInfo(path, e_type, elf["e_machine"], segments, sections, tables["dynsym"],
                       tables["symtab"], needed, runpath, rpath, notes)


def _parse_symtab(data: bytes, strtab: bytes, shdrs: list, table: str,
                  versym: bytes, versions: dict[int, str]) -> list[Symbol]:
    out: list[Symbol] = []
    nshdr = len(shdrs)
    n = len(data) // _SYM.size
    for idx, (st_name, st_info, _other, shndx, value, size) in enumerate(
            _SYM.iter_unpack(data[: n * _SYM.size])):
        stt = st_info & 0xF
        if stt != STT_FUNC and stt != STT_GNU_IFUNC:
            continue
        name = _cstr(strtab, st_name)
        if not name:
            continue
        version = None
        hidden = False
        if versym and 2 * idx + 2 <= len(versym):
            vs = int.from_bytes(versym[2 * idx: 2 * idx + 2], "little")
            hidden = bool(vs & VERSYM_HIDDEN)
            version = versions.get(vs & VERSYM_VERSION)
        off = None
        if SHN_UNDEF < shndx < SHN_LORESERVE and shndx < nshdr:
            _n, _t, sh_addr, sh_offset, _s, _l = shdrs[shndx]
            off = value - sh_addr + sh_offset
        out.append(Symbol(name, value, size, st_info >> 4, stt, shndx, table, version, hidden, off))
    return out


def _parse_verdef(data: bytes, strtab: bytes) -> dict[int, str]:
    out: dict[int, str] = {}
    off = 0
    while off + _VERDEF.size <= len(data):
        _ver, flags, ndx, cnt, _hash, aux, nxt = _VERDEF.unpack_from(data, off)
        if cnt and off + aux + _VERDAUX.size <= len(data):
            name_off, _n = _VERDAUX.unpack_from(data, off + aux)
            if not flags & 1:  # VER_FLG_BASE names the file itself, not a version
                out[ndx] = _cstr(strtab, name_off)
        if not nxt:
            break
        off += nxt
    return out


def _parse_verneed(data: bytes, strtab: bytes) -> dict[int, str]:
    out: dict[int, str] = {}
    off = 0
    while off + _VERNEED.size <= len(data):
        _ver, cnt, _file, aux, nxt = _VERNEED.unpack_from(data, off)
        a = off + aux
        for _ in range(cnt):
            if a + _VERNAUX.size > len(data):
                break
            _h, _fl, other, name_off, anext = _VERNAUX.unpack_from(data, a)
            out[other & VERSYM_VERSION] = _cstr(strtab, name_off)
            if not anext:
                break
            a += anext
        if not nxt:
            break
        off += nxt
    return out


# ---------------------------------------------------------------------------
# resolution

@dataclass(frozen=True, slots=True)
class FunctionMatch:
    """The result of resolving a function name in one binary."""

    binary: str
    requested: str
    symbol: Symbol
    file_offset: int      # symbol offset + requested offset
    demangled: str | None  # set when the match went through a demangled name

    @property
    def note(self) -> str:
        how = f" (demangled {self.requested!r})" if self.demangled else ""
        return f"{self.requested} -> {self.symbol.name} at file offset {self.file_offset:#x}{how}"


def _split_version(name: str) -> tuple[str, str | None]:
    at = name.find("@")
    if at < 0:
        return name, None
    ver = name[at + 1:]
    if ver.startswith("@"):
        ver = ver[1:]
    return name[:at], ver


def _libbpf_match(info: ElfInfo, name: str) -> tuple[Symbol | None, list[Symbol]]:
    """(chosen symbol, undefined matches seen) by libbpf's rules; raises on ambiguity."""
    base, lib_ver = _split_version(name)
    undefined: list[Symbol] = []
    for table in ("dynsym", "symtab"):
        matches: list[Symbol] = []
        for s in getattr(info, table):
            sname = s.name
            if not sname.startswith(base):
                continue
            if len(sname) > len(base) and sname[len(base)] != "@":
                continue
            if lib_ver is not None:
                if table == "dynsym":
                    if s.version != lib_ver:
                        continue
                elif sname != name:
                    continue
            if not s.defined or s.file_offset == 0:
                undefined.append(s)
                continue
            matches.append(s)
        if lib_ver is None and table == "dynsym":
            # unversioned: the default version wins over hidden (old) ones
            visible = [s for s in matches if not s.hidden]
            if visible:
                matches = visible
        chosen: Symbol | None = None
        for s in matches:
            if chosen is None:
                chosen = s
                continue
            if s.file_offset == chosen.file_offset:
                continue
            if chosen.bind != STB_WEAK and s.bind != STB_WEAK:
                raise SymbolError(
                    f"ambiguous function {name!r} in {info.path}: {chosen.versioned_name} at "
                    f"{chosen.file_offset:#x} and {s.versioned_name} at {s.file_offset:#x} "
                    "(name a version as func@@VER, or use an offset)")
            if s.bind == STB_WEAK:
                continue
            chosen = s
        if chosen is not None:
            return chosen, undefined
    return None, undefined


def _demangled_match(info: ElfInfo, name: str) -> list[Symbol]:
    idx = info.demangled_index()
    found = idx.get(name)
    if not found:
        return []
    # distinct offsets only: aliases at one address are one function
    by_off: dict[int | None, Symbol] = {}
    for s in found:
        by_off.setdefault(s.file_offset, s)
    return list(by_off.values())


def _suggest(info: ElfInfo, name: str) -> str:
    names = {s.base_name for s in info.functions()}
    names |= set(info.demangled_index())
    close = difflib.get_close_matches(name, list(names), n=3, cutoff=0.6)
    if not close:
        low = name.lower()
        close = sorted(n for n in names if low in n.lower())[:3]
    return f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def try_lookup_function(binary_path: str, name: str, offset: int = 0) -> FunctionMatch | None:
    """Like :func:`lookup_function` but None when ``name`` is not defined there.

    Still raises for an ambiguous name and for a file that is not a readable ELF.
    """
    info = load_elf(binary_path)
    sym, _undefined = _libbpf_match(info, name)
    if sym is not None:
        assert sym.file_offset is not None
        return FunctionMatch(binary_path, name, sym, sym.file_offset + offset, None)
    cands = _demangled_match(info, name)
    if len(cands) == 1:
        s = cands[0]
        assert s.file_offset is not None
        return FunctionMatch(binary_path, name, s, s.file_offset + offset, dm.demangle(s.base_name))
    if len(cands) > 1:
        listed = ", ".join(f"{s.name} ({dm.display_name(s.base_name)}) at {s.file_offset:#x}"
                           for s in cands[:6])
        more = f" and {len(cands) - 6} more" if len(cands) > 6 else ""
        raise SymbolError(f"ambiguous function {name!r} in {binary_path}: {listed}{more} "
                          "(use the mangled name)")
    return None


def lookup_function(binary_path: str, name: str, offset: int = 0) -> FunctionMatch:
    """Resolve ``name`` in ``binary_path`` to a probe location; see the module docstring."""
    found = try_lookup_function(binary_path, name, offset)
    if found is not None:
        return found
    info = load_elf(binary_path)
    _sym, undefined = _libbpf_match(info, name)
    if undefined:
        raise SymbolError(f"function {name!r} is not defined in {binary_path}, only referenced "
                          "(it lives in a shared library: name that library, e.g. libc.so.6)")
    if not info.dynsym and not info.symtab:
        raise SymbolError(f"no symbols in {binary_path} (stripped): cannot find {name!r}; "
                          "give a file offset instead")
    raise SymbolError(f"function {name!r} not found in {binary_path}{_suggest(info, name)}")


def resolve_function(binary_path: str, name: str, offset: int = 0) -> int:
    """The uprobe file offset of ``name`` + ``offset`` in ``binary_path``.

    An empty name means ``offset`` is already a file offset (libbpf's rule).
    """
    if not name:
        return offset
    return lookup_function(binary_path, name, offset).file_offset


def function_at(binary_path: str, file_offset: int) -> Symbol | None:
    """The defined function containing ``file_offset`` (for listings and stacks)."""
    info = load_elf(binary_path)
    best: Symbol | None = None
    for s in info.functions():
        off = s.file_offset
        assert off is not None
        if off <= file_offset < off + max(s.size, 1) and (best is None or s.bind != STB_LOCAL):
            best = s
    return best


def glob_to_regex(pattern: str) -> str:
    """libbpf's ``glob_match``: only ``*`` and ``?`` are special."""
    out = []
    for c in pattern:
        if c == "*":
            out.append(".*")
        elif c == "?":
            out.append(".")
        else:
            out.append("\\" + c if not c.isalnum() and c != "_" else c)
    return "".join(out)


def match_functions(binary: str, pattern: str) -> list[tuple[str, int]]:
    """uprobe.multi-style glob: ``[(symbol name, file offset)]`` like libbpf.

    libbpf's ``elf_resolve_pattern_offsets`` searches ``.symtab`` then
    ``.dynsym`` and stops at the first table with a match.  A pattern matching no
    raw name is tried against demangled names (``rust_args::*``).
    """
    import re

    info = load_elf(binary)
    rx = re.compile(glob_to_regex(pattern), re.DOTALL)
    for table in (info.symtab, info.dynsym):
        out = [(s.name, s.file_offset) for s in table
               if s.defined and s.file_offset and rx.fullmatch(s.name)]
        if out:
            return out  # type: ignore[return-value]
    seen: set[tuple[str, int]] = set()
    out2: list[tuple[str, int]] = []
    for variant, syms in info.demangled_index().items():
        if rx.fullmatch(variant):
            for s in syms:
                key = (s.name, s.file_offset or 0)
                if key not in seen:
                    seen.add(key)
                    out2.append(key)
    out2.sort(key=lambda t: (t[1], t[0]))
    return out2
