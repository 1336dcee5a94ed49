"""``ubpf-run --list [PATTERN]``: the attach points of a binary or a process,
printed like ``bpftrace -l 'uprobe:BIN:*'`` (demangled names shown).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from ubpf_py.errors import SymbolError
from ubpf_py.probe import demangle as dm
from ubpf_py.probe import procmaps
from ubpf_py.probe.resolve import _is_elf, resolve_binary
from ubpf_py.probe.symbols import glob_to_regex, load_elf
from ubpf_py.probe.usdt import read_usdt_notes


@dataclass(frozen=True, slots=True)
class ListedProbe:
    """One attach point."""

    kind: str                # "uprobe" | "uretprobe" | "usdt"
    binary: str
    name: str                # raw symbol name, or "provider:name"
    display: str             # demangled name (or ``name``)
    file_offset: int | None

    def __str__(self) -> str:
        return f"{self.kind}:{self.binary}:{self.display}"


def _binaries(binary_or_pid: str | int, cwd: str | None) -> list[str]:
    if isinstance(binary_or_pid, int):
        exe = procmaps.exe_path(binary_or_pid)
        maps = procmaps.read_maps(binary_or_pid)
        exe_ident = procmaps.file_identity(exe)
        out = [exe]
        for path in procmaps.mapped_files(maps):
            if procmaps.file_identity(path) != exe_ident and _is_elf(path):
                out.append(path)
        return out
    return [resolve_binary(binary_or_pid, cwd=cwd)]


def _probes_of(binary: str) -> list[ListedProbe]:
    info = load_elf(binary)
    seen: dict[str, ListedProbe] = {}
    for s in info.functions():
        raw = s.base_name
        if raw in seen:
            continue
        seen[raw] = ListedProbe("uprobe", binary, raw, dm.display_name(raw), s.file_offset)
    out = sorted(seen.values(), key=lambda p: p.display)
    notes: dict[str, ListedProbe] = {}
    for n in read_usdt_notes(binary):
        notes.setdefault(n.label, ListedProbe("usdt", binary, n.label, n.label, n.file_offset))
    out.extend(sorted(notes.values(), key=lambda p: p.name))
    return out


def parse_list_pattern(pattern: str) -> tuple[str | None, str | None, str]:
    """Split bpftrace's ``uprobe:BIN:GLOB`` / ``usdt:BIN:PROV:NAME`` into
    (kind, binary, glob); a plain glob gives (None, None, glob).  The binary ends
    at the first ``:`` so demangled globs (``rust_args::*``) survive; a binary of
    ``*`` or ``""`` means every binary of the target."""
    kind, sep, rest = pattern.partition(":")
    if not sep or kind not in ("uprobe", "uretprobe", "usdt"):
        return None, None, pattern
    binary, sep, glob = rest.partition(":")
    if not sep:
        return kind, None, binary or "*"
    return kind, (binary if binary not in ("", "*") else None), glob or "*"


def list_functions(binary_or_pid: str | int, pattern: str | None = None,
                   cwd: str | None = None, kind: str | None = None) -> list[ListedProbe]:
    """Functions and USDT probes of a binary, or of a process's executable and its
    mapped libraries.  ``pattern`` is a libbpf-style glob (``*``, ``?``) matched
    against the raw name, the demangled name, or the whole ``kind:binary:name``;
    ``kind`` ("uprobe", "uretprobe" or "usdt") keeps one kind only; functions are listed as
    ``uretprobe:`` lines when that is what was asked for (bpftrace does the same)."""
    rx = re.compile(glob_to_regex(pattern), re.DOTALL) if pattern else None
    out: list[ListedProbe] = []
    for binary in _binaries(binary_or_pid, cwd):
        try:
            probes = _probes_of(binary)
        except SymbolError:
            if isinstance(binary_or_pid, int):
                continue  # a mapped non-library file (locale archive, ...)
            raise
        if kind == "uretprobe":
            probes = [replace(p, kind="uretprobe") for p in probes if p.kind == "uprobe"]
        elif kind is not None:
            probes = [p for p in probes if p.kind == kind]
        if rx is None:
            out.extend(probes)
        else:
            out.extend(p for p in probes
                       if rx.fullmatch(p.name) or rx.fullmatch(p.display) or rx.fullmatch(str(p)))
    return out


def format_listing(probes: list[ListedProbe]) -> str:
    """One line per attach point, as ``bpftrace -l`` prints them."""
    return "\n".join(str(p) for p in probes)
