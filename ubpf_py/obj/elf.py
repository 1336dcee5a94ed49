"""``load_object``: a clang-built libbpf-style BPF ELF -> inert ``ObjectSpec``.

Steps (libbpf's order): read the ELF; BTF and .BTF.ext; license/version; maps
(legacy, BTF ``.maps``, global data, ``.kconfig``); programs = every global
STT_FUNC symbol of an executable section other than ``.text`` (functions in
``.text`` are subprograms); map/global relocations; subprogram linking; static
prog-array / map-in-map slots.  Program sections whose type ubpf-py does not
run are listed in ``ObjectSpec.skipped`` and reported with a
``SkippedProgramWarning`` (see ``obj.sections``).
"""

from __future__ import annotations

import struct
import warnings
from pathlib import Path

from ubpf_py.errors import InvalidInstructionError, ObjectLoadError, UbpfError
from ubpf_py.isa.instruction import decode
from ubpf_py.obj import mapdefs
from ubpf_py.obj.btf import Btf
from ubpf_py.obj.btf_ext import BtfExt, parse_btf_ext
from ubpf_py.obj.elffile import STB_GLOBAL, STB_WEAK, STT_FUNC, RawElf, Section, read_elf
from ubpf_py.obj.relocations import Function, Linker, apply_data_relocs, attach_btf_ext
from ubpf_py.obj.sections import SectionInfo, SkippedProgramWarning, classify_section
from ubpf_py.obj.spec import ObjectSpec, ProgramSpec


def load_object(path: str | Path, kconfig: dict[str, str] | None = None) -> ObjectSpec:
    """Parse a BPF object file.  ``kconfig`` overrides .kconfig extern values
    (kconfig syntax: ``{"CONFIG_X": "y", "LINUX_KERNEL_VERSION": "393216"}``)."""
    p = str(path)
    raw = read_elf(p)
    try:
        return _build(raw, kconfig)
    except UbpfError:
        raise
    except (struct.error, IndexError, ValueError, KeyError, AttributeError, OverflowError, TypeError,
            MemoryError, RecursionError) as e:
        raise ObjectLoadError(f"{p}: malformed BPF object ({type(e).__name__}: {e})") from None


def _build(raw: RawElf, kconfig: dict[str, str] | None) -> ObjectSpec:
    btf, ext = _load_btf(raw)
    license_, kver = _license_and_version(raw)
    obj_name = mapdefs.object_name(raw.path)
    table = mapdefs.MapTable()
    mapdefs.collect_legacy_maps(raw, table)
    mapdefs.collect_btf_maps(raw, btf, table)
    mapdefs.collect_data_maps(raw, btf, obj_name, table)
    mapdefs.collect_kconfig(raw, btf, obj_name, table, kconfig)

    text = raw.section(".text")
    text_shndx = text.index if text is not None else -1
    funcs_by_section: dict[int, list[Function]] = {}
    entries: list[tuple[Function, SectionInfo]] = []
    skipped: list[tuple[str, str]] = []
    sources: dict[str, list[str]] = {}
    for sec in raw.sections:
        if not sec.is_exec or sec.size == 0:
            continue
        info: SectionInfo | str | None = None
        if sec.index != text_shndx:
            info = classify_section(sec.name)
            if isinstance(info, str):
                skipped.append((sec.name, info))
                warnings.warn(f"{raw.path}: skipping section '{sec.name}': {info}", SkippedProgramWarning,
                              stacklevel=3)
                continue
        funcs = _split_functions(raw, sec)
        attach_btf_ext(funcs, ext, sec.name, sources)
        rels = [(r.offset // 8, r.sym) for r in raw.rels.get(sec.index, [])]
        for r in raw.rels.get(sec.index, []):
            if r.offset % 8:
                raise ObjectLoadError(f"{raw.path}: misaligned relocation at offset {r.offset} in '{sec.name}'")
        for f in funcs:
            mine = [(i - f.start, s) for i, s in rels if f.start <= i < f.start + len(f.insns)]
            apply_data_relocs(raw, f, mine, table, text_shndx)
        funcs_by_section[sec.index] = funcs
        if sec.index != text_shndx:
            assert isinstance(info, SectionInfo)
            for f in funcs:
                if not f.is_global:
                    raise ObjectLoadError(f"{raw.path}: program '{f.name}' in section '{sec.name}' is static; "
                                          "programs must be global functions")
                entries.append((f, info))

    linker = Linker(raw, funcs_by_section, text_shndx)
    programs: dict[str, ProgramSpec] = {}
    for f, info in entries:
        if f.name in programs:
            raise ObjectLoadError(f"{raw.path}: two programs are called '{f.name}'")
        linked = linker.link(f)
        programs[f.name] = ProgramSpec(
            name=f.name, section=f.section, kind=info.kind, instructions=linked.insns, license=license_,
            attach=info.attach, sleepable=info.sleepable, multi=info.multi, multi_pattern=info.multi_pattern,
            functions=linked.functions, func_info=linked.func_info, line_info=linked.line_info,
            core_relocs=linked.core, autoload=info.autoload,
            attach_error=info.attach_error, attach_label=info.label)
    mapdefs.collect_init_slots(raw, btf, table, set(programs))
    return ObjectSpec(path=raw.path, programs=programs, maps=table.maps, license=license_, kern_version=kver,
                      globals=table.globals, btf=btf, skipped=skipped, kconfig=table.kconfig, name=obj_name,
                      btf_ext=ext)


def _load_btf(raw: RawElf) -> tuple[Btf | None, BtfExt | None]:
    sec = raw.section(".BTF")
    if sec is None:
        return None, None
    btf = Btf(sec.data, source=f"{raw.path} .BTF")
    ext_sec = raw.section(".BTF.ext")
    ext = parse_btf_ext(ext_sec.data, btf, source=f"{raw.path} .BTF.ext") if ext_sec is not None else None
    return btf, ext


def _license_and_version(raw: RawElf) -> tuple[str, int]:
    lic = ""
    sec = raw.section("license")
    if sec is not None:
        lic = sec.data.split(b"\0", 1)[0].decode("utf-8", "replace")
    kver = 0
    ver = raw.section("version")
    if ver is not None:
        if len(ver.data) != 4:
            raise ObjectLoadError(f"{raw.path}: 'version' section must hold one u32, has {len(ver.data)} bytes")
        (kver,) = struct.unpack("<I", ver.data)
    return lic, kver


def _split_functions(raw: RawElf, sec: Section) -> list[Function]:
    """The function symbols of an executable section, with their instructions."""
    try:
        insns = decode(sec.data)
    except InvalidInstructionError as e:
        raise ObjectLoadError(f"{raw.path}: section '{sec.name}': {e}") from None
    syms = sorted((s for s in raw.symbols if s.shndx == sec.index and s.type == STT_FUNC),
                  key=lambda s: s.value)
    if not syms:
        raise ObjectLoadError(f"{raw.path}: executable section '{sec.name}' has no function symbols")
    funcs: list[Function] = []
    n = len(insns)
    for k, s in enumerate(syms):
        if s.value % 8:
            raise ObjectLoadError(f"{raw.path}: function '{s.name}' in '{sec.name}' is misaligned")
        start = s.value // 8
        end = start + s.size // 8 if s.size else (syms[k + 1].value // 8 if k + 1 < len(syms) else n)
        if start >= n or end > n or end <= start:
            raise ObjectLoadError(f"{raw.path}: function '{s.name}' lies outside section '{sec.name}'")
        funcs.append(Function(name=s.name, section=sec.name, shndx=sec.index, start=start,
                              insns=list(insns[start:end]), is_global=s.bind in (STB_GLOBAL, STB_WEAK)))
    return funcs


