"""Runtime addresses -> ``func+0xoff (binary) file:line``, for stack-trace maps.

A :class:`Symbolizer` is built from one snapshot of the target's memory map
(taken while the target is alive, or at its exit) because a stack id outlives
the frames it names: the map dump happens at exit, when ``/proc/PID/maps`` may
be gone.  Addresses go address -> mapping -> file offset -> link-time address
(through the PT_LOAD segments), so PIE executables, shared libraries and
non-PIE binaries are handled alike.

Function names come from the ELF symbol tables that :mod:`ubpf_py.probe.symbols`
already parses (``.dynsym`` + ``.symtab``), indexed here by address so a lookup
is one bisect instead of the linear scan of ``function_at``.  Names are
demangled (Rust, C++) with :mod:`ubpf_py.probe.demangle`.  Source lines come
from the binary's DWARF line table through pyelftools, decoded one compile unit
at a time (found through ``.debug_aranges`` or the CUs' address ranges), so a
Rust binary with the whole standard library's line tables costs only the CUs a
stack actually touches.  Everything is cached per binary (module-wide) and per
address (per symbolizer): a stack map with thousands of frames repeats the same
few hundred return addresses.

Frames after the first are *return addresses*: the call is the instruction
before them, and a call to a ``noreturn`` function may be the last instruction
of its function.  Like gdb and perf, :meth:`Symbolizer.format_stack` looks those
up at ``addr - 1`` (the printed offset is still from ``addr``, like bpftrace).
"""

from __future__ import annotations

import bisect
import os
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from ubpf_py.errors import UbpfError
from ubpf_py.probe import demangle as dm
from ubpf_py.probe.procmaps import Mapping
from ubpf_py.probe.symbols import STB_GLOBAL, STB_LOCAL, STB_WEAK, ElfInfo, Symbol, load_elf

#: symbol preference at one address: global, then weak, then local names
_BIND_RANK = {STB_GLOBAL: 0, STB_WEAK: 1, STB_LOCAL: 2}


@dataclass(frozen=True, slots=True)
class Frame:
    """One symbolized address."""

    addr: int
    binary: str | None = None       # mapped file ("[vdso]" and the like for pseudo mappings)
    file_offset: int | None = None  # offset of ``addr`` in ``binary`` (files only)
    symbol: str | None = None       # raw ELF symbol name (``@VER`` stripped)
    function: str | None = None     # demangled display name
    offset: int = 0                 # addr - function start
    source: str | None = None       # source file from DWARF
    line: int | None = None

    def __str__(self) -> str:
        return format_frame(self)


def format_frame(f: Frame) -> str:
    """``func+0xoff (binary) file:line``; unknown parts degrade to addresses."""
    if f.function is not None:
        text = f"{f.function}+{f.offset:#x}"
        if f.binary:
            text += f" ({f.binary})"
    elif f.binary and f.file_offset is not None:
        text = f"{f.addr:#x} ({f.binary}+{f.file_offset:#x})"
    elif f.binary:
        text = f"{f.addr:#x} ({f.binary})"
    else:
        text = f"{f.addr:#x}"
    if f.source is not None and f.line:
        text += f" {f.source}:{f.line}"
    return text


# ---------------------------------------------------------------------------
# per-binary function index


@dataclass(slots=True)
class _FunctionIndex:
    """Defined function symbols of one ELF, sorted by link-time address."""

    starts: list[int]
    ends: list[int]
    syms: list[Symbol]

    @classmethod
    def build(cls, *infos: ElfInfo) -> _FunctionIndex:
        """From the binary's symbols plus those of its separate debug file (same addresses)."""
        syms = [s for info in infos for s in info.functions()]
        best: dict[int, Symbol] = {}
        for s in syms:
            if s.value == 0:
                continue
            cur = best.get(s.value)
            if cur is None or _sym_rank(s) < _sym_rank(cur):
                best[s.value] = s
        # the largest size among aliases wins the extent (aliases share an address)
        extent: dict[int, int] = {}
        for s in syms:
            if s.value in best:
                extent[s.value] = max(extent.get(s.value, 0), s.size)
        order = sorted(best)
        return cls(order, [a + max(extent[a], 1) for a in order], [best[a] for a in order])

    def find(self, vaddr: int) -> Symbol | None:
        i = bisect.bisect_right(self.starts, vaddr) - 1
        # nested/overlapping symbols are rare; look back a little for a container
        for j in range(i, max(i - 4, -1), -1):
            if self.starts[j] <= vaddr < self.ends[j]:
                return self.syms[j]
        return None


def _sym_rank(s: Symbol) -> tuple[int, int, int, int, str]:
    """Which alias names an address: the exported, default-version, least-underscored one.

    libc has ``free``, ``cfree@GLIBC_2.2.5`` (an old version), ``__libc_free`` and
    ``__GI___libc_free`` at one address; people know it as ``free``.
    """
    name = s.base_name
    old_version = s.hidden or ("@" in s.name and "@@" not in s.name)
    return (_BIND_RANK.get(s.bind, 3), int(old_version), len(name) - len(name.lstrip("_")),
            0 if s.table == "dynsym" else 1, name)


# ---------------------------------------------------------------------------
# per-binary DWARF line tables


@dataclass(slots=True)
class _CuLines:
    """Decoded line rows of one compile unit, sorted by address."""

    addrs: list[int]
    rows: list[tuple[str | None, int, bool]]  # (file, line, end_sequence)

    def find(self, vaddr: int) -> tuple[str, int] | None:
        i = bisect.bisect_right(self.addrs, vaddr) - 1
        if i < 0:
            return None
        path, line, end = self.rows[i]
        if end or path is None or not line:
            return None
        return path, line


@dataclass(slots=True)
class _LineInfo:
    """Lazy DWARF line lookup for one binary (the file stays open while cached)."""

    stream: BinaryIO
    dwarf: Any
    aranges: Any
    cu_ranges: list[tuple[int, int, int]] | None = None  # (lo, hi, cu offset), sorted
    cus: dict[int, _CuLines | None] = field(default_factory=dict)

    def lookup(self, vaddr: int) -> tuple[str, int] | None:
        # .debug_aranges, when present, is trusted like binutils does: walking every
        # CU's ranges costs pyelftools seconds on a large library (2000 CUs in libc)
        if self.aranges is not None:
            cu_off = self.aranges.cu_offset_at_addr(vaddr)
        else:
            cu_off = self._cu_from_ranges(vaddr)
        if cu_off is None:
            return None
        lines = self.cus.get(cu_off, False)
        if lines is False:
            lines = self.cus[cu_off] = self._decode_cu(cu_off)
        return lines.find(vaddr) if lines is not None else None

    def _cu_from_ranges(self, vaddr: int) -> int | None:
        if self.cu_ranges is None:
            self.cu_ranges = _cu_address_ranges(self.dwarf)
        i = bisect.bisect_right(self.cu_ranges, (vaddr, float("inf"), 0)) - 1
        for j in range(i, max(i - 8, -1), -1):
            lo, hi, off = self.cu_ranges[j]
            if lo <= vaddr < hi:
                return off
        return None

    def _decode_cu(self, cu_off: int) -> _CuLines | None:
        try:
            cu = self.dwarf.get_CU_at(cu_off)
            prog = self.dwarf.line_program_for_CU(cu)
        except Exception:  # pyelftools raises many types on odd DWARF; lines are optional
            return None
        if prog is None:
            return None
        top = cu.get_top_DIE()
        comp_dir = _attr_str(top, "DW_AT_comp_dir") or ""
        files = _file_names(prog, comp_dir)
        try:
            raw = _run_line_program(prog, cu.header["address_size"], files)
        except (IndexError, ValueError):  # truncated program: no lines for this CU
            return None
        # end-of-sequence rows sort before a sequence starting at the same address;
        # sort is stable, so rows at one address keep their program order
        raw.sort(key=lambda r: (r[0], r[1]))
        return _CuLines([r[0] for r in raw], [(r[2], r[3], r[4]) for r in raw])


def _uleb(b: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        c = b[i]
        i += 1
        n |= (c & 0x7F) << shift
        if c < 0x80:
            return n, i
        shift += 7


def _sleb(b: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        c = b[i]
        i += 1
        n |= (c & 0x7F) << shift
        shift += 7
        if c < 0x80:
            if c & 0x40:
                n -= 1 << shift
            return n, i


def _run_line_program(prog: Any, addr_size: int,
                      files: dict[int, str]) -> list[tuple[int, int, str | None, int, bool]]:
    """Rows ``(address, sort key, file, line, end_sequence)`` of a line program.

    pyelftools' own decoder builds a state copy per row through ``construct``
    (~30 us a row: seconds for the Rust standard library's CU); this runs the
    DWARF line state machine directly over the program bytes, using only the
    header pyelftools parsed.
    """
    h = prog.header
    prog.stream.seek(prog.program_start_offset)
    b = prog.stream.read(prog.program_end_offset - prog.program_start_offset)
    min_len = h["minimum_instruction_length"]
    line_base = h["line_base"]
    line_range = h["line_range"]
    op_base = h["opcode_base"]
    std_lens = list(h["standard_opcode_lengths"])
    const_add = ((255 - op_base) // line_range) * min_len
    rows: list[tuple[int, int, str | None, int, bool]] = []
    append = rows.append
    get = files.get
    address, file, line = 0, 1, 1
    i, n = 0, len(b)
    while i < n:
        op = b[i]
        i += 1
        if op >= op_base:
            adj = op - op_base
            address += (adj // line_range) * min_len
            line += line_base + adj % line_range
            append((address, 1, get(file), line, False))
        elif op == 0:
            ln, i = _uleb(b, i)
            if ln == 0:
                continue
            sub = b[i]
            if sub == 1:  # end_sequence
                append((address, 0, get(file), line, True))
                address, file, line = 0, 1, 1
            elif sub == 2:  # set_address
                address = int.from_bytes(b[i + 1:i + ln], "little") if ln - 1 <= addr_size else 0
            i += ln
        elif op == 1:  # copy
            append((address, 1, get(file), line, False))
        elif op == 2:  # advance_pc
            v, i = _uleb(b, i)
            address += v * min_len
        elif op == 3:  # advance_line
            v, i = _sleb(b, i)
            line += v
        elif op == 4:  # set_file
            file, i = _uleb(b, i)
        elif op == 8:  # const_add_pc
            address += const_add
        elif op == 9:  # fixed_advance_pc
            address += int.from_bytes(b[i:i + 2], "little")
            i += 2
        else:  # set_column, negate_stmt, basic_block, prologue_end, ... : operands only
            for _ in range(std_lens[op - 1] if op - 1 < len(std_lens) else 0):
                _v, i = _uleb(b, i)
    return rows


def _attr_str(die: Any, name: str) -> str | None:
    a = die.attributes.get(name)
    if a is None:
        return None
    v = a.value
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


def _file_names(prog: Any, comp_dir: str) -> dict[int, str]:
    """Line-program file index -> path (DWARF 5 counts from 0, earlier versions from 1)."""
    v5 = prog.header["version"] >= 5
    dirs = [d.decode("utf-8", "replace") if isinstance(d, bytes) else str(d)
            for d in prog.header["include_directory"]]
    out: dict[int, str] = {}
    for i, fe in enumerate(prog.header["file_entry"]):
        name = fe.name.decode("utf-8", "replace") if isinstance(fe.name, bytes) else str(fe.name)
        di = fe.dir_index
        # DWARF 5 directory 0 is the compile directory itself; before 5, index 0 meant it
        d = (dirs[di] if di < len(dirs) else "") if v5 else (dirs[di - 1] if 0 < di <= len(dirs) else comp_dir)
        path = name if os.path.isabs(name) else os.path.join(d, name) if d else name
        if not os.path.isabs(path) and comp_dir:
            path = os.path.join(comp_dir, path)
        out[i if v5 else i + 1] = os.path.normpath(path)
    return out


def _cu_address_ranges(dwarf: Any) -> list[tuple[int, int, int]]:
    """(lo, hi, CU offset) of every CU from its top DIE (when .debug_aranges is missing)."""
    out: list[tuple[int, int, int]] = []
    rl = None
    for cu in dwarf.iter_CUs():
        top = cu.get_top_DIE()
        attrs = top.attributes
        try:
            if "DW_AT_ranges" in attrs:
                if rl is None:
                    rl = dwarf.range_lists()
                if rl is None:
                    continue
                base = attrs["DW_AT_low_pc"].value if "DW_AT_low_pc" in attrs else 0
                for r in rl.get_range_list_at_offset(attrs["DW_AT_ranges"].value, cu=cu):
                    if hasattr(r, "begin_offset"):
                        if getattr(r, "is_absolute", False):
                            out.append((r.begin_offset, r.end_offset, cu.cu_offset))
                        else:
                            out.append((base + r.begin_offset, base + r.end_offset, cu.cu_offset))
                    elif hasattr(r, "base_address"):
                        base = r.base_address
            elif "DW_AT_low_pc" in attrs and "DW_AT_high_pc" in attrs:
                lo = attrs["DW_AT_low_pc"].value
                hi_attr = attrs["DW_AT_high_pc"]
                hi = hi_attr.value if hi_attr.form == "DW_FORM_addr" else lo + hi_attr.value
                out.append((lo, hi, cu.cu_offset))
        except Exception:  # one malformed CU must not cost the others their lines
            continue
    out.sort()
    return out


# ---------------------------------------------------------------------------
# module-wide caches (binaries do not change under a running tracer; keyed by identity)


@dataclass(slots=True)
class _Binary:
    info: ElfInfo
    funcs: _FunctionIndex
    debug_path: str | None = None  # separate debug file (build-id / .gnu_debuglink), if found
    lines: _LineInfo | bool | None = False  # False: not opened yet; None: no DWARF lines


#: where distributions install separate debug files (Debian's *-dbg / *-dbgsym packages)
DEBUG_DIRS: tuple[str, ...] = ("/usr/lib/debug",)

_binaries: dict[tuple, _Binary | None] = {}


def _binary(path: str, debug_dirs: tuple[str, ...] = DEBUG_DIRS) -> _Binary | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    key = (os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns, debug_dirs)
    if key in _binaries:
        return _binaries[key]
    try:
        info = load_elf(path)
    except UbpfError:
        _binaries[key] = None
        return None
    infos = [info]
    debug = find_debug_file(path, info, debug_dirs) if debug_dirs else None
    if debug is not None:
        try:
            infos.append(load_elf(debug))
        except UbpfError:
            debug = None
    b = _Binary(info, _FunctionIndex.build(*infos), debug)
    _binaries[key] = b
    return b


def _read_section(path: str, info: ElfInfo, name: str) -> bytes:
    sec = info.sections.get(name)
    if sec is None:
        return b""
    with open(path, "rb") as f:
        f.seek(sec[1])
        return f.read(sec[2])


def build_id(path: str, info: ElfInfo | None = None) -> str | None:
    """The GNU build id of an ELF file as hex (``.note.gnu.build-id``), or None."""
    info = info or load_elf(path)
    note = _read_section(path, info, ".note.gnu.build-id")
    if len(note) < 16:
        return None
    namesz, descsz, ntype = struct.unpack_from("<III", note)
    start = 12 + ((namesz + 3) & ~3)
    if ntype != 3 or start + descsz > len(note):
        return None
    return note[start:start + descsz].hex()


def find_debug_file(path: str, info: ElfInfo, debug_dirs: tuple[str, ...] = DEBUG_DIRS) -> str | None:
    """A separate debug file for ``path``, found the way gdb and addr2line look.

    By build id (``DIR/.build-id/xx/rest.debug``), then by ``.gnu_debuglink``
    name next to the binary, in its ``.debug/`` and under ``DIR/<its directory>``.
    A debuglink file must match the link's CRC32 (a stale debug file would name
    the wrong functions).
    """
    bid = build_id(path, info)
    if bid and len(bid) > 2:
        for d in debug_dirs:
            cand = os.path.join(d, ".build-id", bid[:2], bid[2:] + ".debug")
            if os.path.isfile(cand):
                return cand
    link = _read_section(path, info, ".gnu_debuglink")
    if not link or b"\0" not in link:
        return None
    name = link.split(b"\0", 1)[0].decode("utf-8", "replace")
    crc_off = (len(name) + 1 + 3) & ~3
    if crc_off + 4 > len(link):
        return None
    want = struct.unpack_from("<I", link, crc_off)[0]
    real_dir = os.path.dirname(os.path.realpath(path))
    cands = [os.path.join(real_dir, name), os.path.join(real_dir, ".debug", name)]
    cands += [os.path.join(d, real_dir.lstrip("/"), name) for d in debug_dirs]
    for cand in cands:
        if os.path.isfile(cand) and os.path.realpath(cand) != os.path.realpath(path) and _crc32(cand) == want:
            return cand
    return None


def _crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def _line_info(b: _Binary) -> _LineInfo | None:
    if b.lines is False:
        b.lines = _open_lines(b.debug_path) if b.debug_path else None
        if b.lines is None:
            b.lines = _open_lines(b.info.path)
    return b.lines  # type: ignore[return-value]


def _open_lines(path: str) -> _LineInfo | None:
    from elftools.elf.elffile import ELFFile

    if not any(n in load_elf(path).sections for n in (".debug_line", ".zdebug_line")):
        return None
    stream = open(path, "rb")  # noqa: SIM115 - kept open: pyelftools reads lazily
    try:
        elf = ELFFile(stream)
        dwarf = elf.get_dwarf_info(relocate_dwarf_sections=False)
        try:
            aranges = dwarf.get_aranges()
        except Exception:
            aranges = None
        return _LineInfo(stream, dwarf, aranges)
    except Exception:  # unreadable DWARF: symbols without lines beat failing the dump
        stream.close()
        return None


# ---------------------------------------------------------------------------


class Symbolizer:
    """Symbolize addresses of one process from a snapshot of its mappings.

    ``pid`` (optional) lets files be opened through ``/proc/PID/root`` and
    ``/proc/PID/map_files`` when the mapped path is not reachable from here
    (another mount namespace, a deleted or replaced file).  ``debug_dirs`` are
    searched for separate debug files (``libc6-dbg`` and friends) that give
    stripped libraries their local function names and source lines; pass ``()``
    to use only what the mapped files themselves hold.
    """

    def __init__(self, maps: list[Mapping], pid: int | None = None, *,
                 debug_dirs: tuple[str, ...] = DEBUG_DIRS) -> None:
        self.pid = pid
        self.debug_dirs = tuple(debug_dirs)
        self._cache: dict[tuple[int, bool], Frame] = {}
        self.update_maps(maps)

    def update_maps(self, maps: list[Mapping]) -> None:
        """Take a newer snapshot (after dlopen); already symbolized addresses are forgotten."""
        self._maps = sorted(maps, key=lambda m: m.start)
        self._starts = [m.start for m in self._maps]
        self._cache.clear()
        self._bins: dict[tuple[int, int], _Binary | None] = {}

    def _mapping(self, addr: int) -> Mapping | None:
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0 and addr < self._maps[i].end:
            return self._maps[i]
        return None

    def _binary_of(self, m: Mapping) -> _Binary | None:
        """The parsed file behind a mapping (once per mapping: stat/realpath cost more than a lookup)."""
        key = (m.start, m.end)
        if key not in self._bins:
            path = self._open_path(m)
            self._bins[key] = _binary(path, self.debug_dirs) if path is not None else None
        return self._bins[key]

    def _open_path(self, m: Mapping) -> str | None:
        cands = []
        if not m.deleted:
            cands.append(m.path)
        if self.pid is not None:
            if not m.deleted:
                cands.append(f"/proc/{self.pid}/root{m.path}")
            cands.append(f"/proc/{self.pid}/map_files/{m.start:x}-{m.end:x}")
        found = None
        for p in cands:
            try:
                st = os.stat(p)
            except OSError:
                continue
            if st.st_ino == m.inode or p == cands[-1]:
                found = p
                break
        return found

    def symbolize(self, addr: int, *, return_address: bool = False) -> Frame:
        """One address.  ``return_address``: look up ``addr - 1`` (a caller frame)."""
        key = (addr, return_address)
        f = self._cache.get(key)
        if f is None:
            f = self._cache[key] = self._symbolize(addr, return_address)
        return f

    def _symbolize(self, addr: int, return_address: bool) -> Frame:
        look = addr - 1 if return_address and addr > 0 else addr
        m = self._mapping(look)
        if m is None:
            return Frame(addr)
        if not m.is_file:
            return Frame(addr, m.path or None)
        file_off = m.offset + (addr - m.start)
        b = self._binary_of(m)
        if b is None:
            return Frame(addr, m.path, file_off)
        vaddr = b.info.offset_to_vaddr(m.offset + (look - m.start))
        if vaddr is None:
            return Frame(addr, m.path, file_off)
        sym = b.funcs.find(vaddr)
        source = line = None
        li = _line_info(b)
        if li is not None:
            found = li.lookup(vaddr)
            if found is not None:
                source, line = found
        if sym is None:
            return Frame(addr, m.path, file_off, source=source, line=line)
        raw = sym.base_name
        start_off = vaddr - sym.value + (addr - look)
        return Frame(addr, m.path, file_off, raw, dm.display_name(raw), start_off, source, line)

    def format(self, addr: int, *, return_address: bool = False) -> str:
        return format_frame(self.symbolize(addr, return_address=return_address))

    def symbolize_stack(self, addrs: list[int], *, first_is_return_address: bool = False) -> list[Frame]:
        """Frames of a user stack, innermost first; trailing zero slots are dropped."""
        n = len(addrs)
        while n and not addrs[n - 1]:
            n -= 1
        return [self.symbolize(a, return_address=(i > 0 or first_is_return_address))
                for i, a in enumerate(addrs[:n])]

    def format_stack(self, addrs: list[int], *, first_is_return_address: bool = False) -> list[str]:
        """One line per frame, innermost first (like bpftrace's ``ustack``); no indentation."""
        return [format_frame(f) for f in self.symbolize_stack(addrs, first_is_return_address=first_is_return_address)]
