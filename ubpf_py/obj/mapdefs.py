"""Maps of an object: BTF ``.maps``, legacy ``maps``, global data and ``.kconfig``.

Follows libbpf (src/libbpf.c: parse_btf_map_def, bpf_object__init_internal_map,
bpf_object__collect_externs, bpf_object__collect_map_relos):

* order of ``ObjectSpec.maps``: legacy ``maps`` definitions, BTF ``.maps`` in
  DATASEC order, global data sections in ELF section order, then ``.kconfig``;
* internal maps are ARRAYs with one element named like libbpf names them
  (``internal_map_name``: object-name prefix + section name, 15 chars max);
* clang leaves DATASEC sizes/offsets at 0, so offsets come from ELF symbols;
* ``.kconfig`` externs are laid out sorted by alignment (desc), size (asc), name.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

from ubpf_py.errors import MapError, ObjectLoadError
from ubpf_py.obj import btf as B
from ubpf_py.obj import kconfig as K
from ubpf_py.obj.elffile import (
    SHN_UNDEF,
    SHT_NOBITS,
    SHT_PROGBITS,
    STB_GLOBAL,
    STB_WEAK,
    STT_NOTYPE,
    STT_SECTION,
    RawElf,
    Section,
)
from ubpf_py.obj.spec import GlobalVar, MapSpec
from ubpf_py.sysinfo import possible_cpus

BPF_OBJ_NAME_LEN = 16
BPF_F_RDONLY_PROG = 1 << 7
BPF_F_WRONLY_PROG = 1 << 8
BPF_F_MMAPABLE = 1 << 10

T_PROG_ARRAY, T_PERF_EVENT_ARRAY = 3, 4
T_ARRAY_OF_MAPS, T_HASH_OF_MAPS = 12, 13
T_RINGBUF, T_USER_RINGBUF = 27, 31
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

_INT_FIELDS = ("type", "max_entries", "map_flags", "numa_node", "key_size", "value_size", "pinning")


def object_name(path: str) -> str:
    """libbpf's bpf_object name: basename truncated to 15 chars, cut at the first '.'."""
    base = os.path.basename(path)[:BPF_OBJ_NAME_LEN - 1]
    return base.split(".", 1)[0]


def internal_map_name(obj_name: str, sec_name: str) -> str:
    sfx_len = min(max(7, len(sec_name)), BPF_OBJ_NAME_LEN - 1)
    pfx_len = 0 if "." in sec_name[1:] else min(BPF_OBJ_NAME_LEN - sfx_len - 1, len(obj_name))
    name = obj_name[:pfx_len] + sec_name[:sfx_len]
    return "".join(c if (c.isalnum() or c in "_.") else "_" for c in name)


def adjust_ringbuf_size(sz: int) -> int:
    """Round a ringbuf size up to a power-of-two multiple of the page size (libbpf)."""
    if sz == 0:
        return 0
    if sz % PAGE_SIZE == 0 and ((sz // PAGE_SIZE) & (sz // PAGE_SIZE - 1)) == 0:
        return sz
    mul = 1
    while mul * PAGE_SIZE <= 0xFFFFFFFF:
        if mul * PAGE_SIZE > sz:
            return mul * PAGE_SIZE
        mul <<= 1
    return sz


@dataclass
class MapTable:
    maps: list[MapSpec] = field(default_factory=list)
    #: (section index, symbol offset) -> map index for .maps / legacy maps
    by_symbol: dict[tuple[int, int], int] = field(default_factory=dict)
    #: data section index -> map index
    by_section: dict[int, int] = field(default_factory=dict)
    kconfig_index: int = -1
    #: kconfig extern name -> offset in the .kconfig map
    extern_offsets: dict[str, int] = field(default_factory=dict)
    globals: dict[str, GlobalVar] = field(default_factory=dict)
    kconfig: dict[str, GlobalVar] = field(default_factory=dict)
    #: BTF map var name -> (var offset in .maps, offset of the 'values' member or -1)
    btf_map_layout: dict[str, tuple[int, int, int]] = field(default_factory=dict)


def _err(raw: RawElf, msg: str) -> ObjectLoadError:
    return ObjectLoadError(f"{raw.path}: {msg}")


def _field_int(raw: RawElf, btf: B.Btf, map_name: str, m: B.Member) -> int:
    """Value of a ``__uint(name, val)`` (pointer to array[val]) or ``__ulong`` (enum) field."""
    t = btf.resolved(m.type_id)
    if t.kind == B.KIND_PTR:
        arr = btf.resolved(t.type_id)
        if arr.kind == B.KIND_ARRAY:
            return arr.nelems
    if t.kind in (B.KIND_ENUM, B.KIND_ENUM64) and len(t.enums) == 1:
        return t.enums[0].value & 0xFFFFFFFFFFFFFFFF
    raise _err(raw, f"map '{map_name}': field '{m.name}' is not an __uint/__ulong value "
                    f"({btf.type_name(m.type_id)})")


def _parse_def(raw: RawElf, btf: B.Btf, map_name: str, def_tid: int, inner_ok: bool,
               table: MapTable) -> tuple[MapSpec, int]:
    """One BTF map definition struct -> (MapSpec, byte offset of 'values' or -1)."""
    st = btf.resolved(def_tid)
    if st.kind != B.KIND_STRUCT:
        raise _err(raw, f"map '{map_name}': definition is a {st.kind_name}, expected a struct")
    vals: dict[str, int] = {}
    key_tid = value_tid = 0
    key_size = value_size = 0
    inner: MapSpec | None = None
    values_off = -1
    map_extra = 0
    for i, m in enumerate(st.members):
        name = m.name
        if name in _INT_FIELDS:
            v = _field_int(raw, btf, map_name, m)
            if name == "key_size":
                if key_size and key_size != v:
                    raise _err(raw, f"map '{map_name}': conflicting key size {key_size} != {v}")
                key_size = v
            elif name == "value_size":
                if value_size and value_size != v:
                    raise _err(raw, f"map '{map_name}': conflicting value size {value_size} != {v}")
                value_size = v
            else:
                vals[name] = v
        elif name == "map_extra":
            map_extra = _field_int(raw, btf, map_name, m)
        elif name in ("key", "value"):
            t = btf.type(m.type_id)
            if t.kind != B.KIND_PTR:
                raise _err(raw, f"map '{map_name}': {name} spec is not a pointer (use __type({name}, T))")
            sz = btf.size_of(t.type_id)
            if name == "key":
                if key_size and key_size != sz:
                    raise _err(raw, f"map '{map_name}': conflicting key size {key_size} != {sz}")
                key_size, key_tid = sz, t.type_id
            else:
                if value_size and value_size != sz:
                    raise _err(raw, f"map '{map_name}': conflicting value size {value_size} != {sz}")
                value_size, value_tid = sz, t.type_id
        elif name == "values":
            mtype = vals.get("type", 0)
            if not inner_ok:
                raise _err(raw, f"map '{map_name}': multi-level inner maps are not supported")
            if i != len(st.members) - 1:
                raise _err(raw, f"map '{map_name}': 'values' must be the last member")
            if mtype not in (T_PROG_ARRAY, T_ARRAY_OF_MAPS, T_HASH_OF_MAPS):
                raise _err(raw, f"map '{map_name}': __array(values, ...) needs a prog array or map-in-map type")
            if value_size and value_size != 4:
                raise _err(raw, f"map '{map_name}': conflicting value size {value_size} != 4")
            value_size = 4
            arr = btf.type(m.type_id)
            if arr.kind != B.KIND_ARRAY or arr.nelems:
                raise _err(raw, f"map '{map_name}': 'values' is not a zero-sized array")
            ptr = btf.resolved(arr.elem_type)
            if ptr.kind != B.KIND_PTR:
                raise _err(raw, f"map '{map_name}': 'values' element is a {ptr.kind_name}, expected a pointer")
            target = btf.resolved(ptr.type_id)
            if mtype == T_PROG_ARRAY:
                if target.kind != B.KIND_FUNC_PROTO:
                    raise _err(raw, f"map '{map_name}': prog-array values must be function pointers")
            else:
                if target.kind != B.KIND_STRUCT:
                    raise _err(raw, f"map '{map_name}': map-in-map inner definition is not a struct")
                inner, _ = _parse_def(raw, btf, f"{map_name}.inner", target.id, False, table)
            values_off = m.bit_offset // 8
        else:
            raise _err(raw, f"map '{map_name}': unknown field '{name}'")
    if "type" not in vals or vals["type"] == 0:
        raise _err(raw, f"map '{map_name}': map type isn't specified (add __uint(type, BPF_MAP_TYPE_...))")
    if vals.get("pinning", 0) not in (0, 1):
        raise _err(raw, f"map '{map_name}': invalid pinning value {vals['pinning']}")
    ms = MapSpec(name=map_name, type=vals["type"], key_size=key_size, value_size=value_size,
                 max_entries=vals.get("max_entries", 0), flags=vals.get("map_flags", 0),
                 key_type_id=key_tid, value_type_id=value_tid, inner=inner,
                 map_extra=map_extra, numa_node=vals.get("numa_node", 0), pinning=vals.get("pinning", 0))
    apply_map_defaults(ms)
    return ms, values_off


def apply_map_defaults(ms: MapSpec) -> None:
    """Fill what libbpf/the kernel fill when the object leaves it out."""
    if ms.type == T_PERF_EVENT_ARRAY:
        if ms.max_entries == 0:
            ms.max_entries = possible_cpus()
        # the kernel accepts only 4/4 (perf event fds); objects often omit them
        ms.key_size = ms.key_size or 4
        ms.value_size = ms.value_size or 4
    elif ms.type in (T_RINGBUF, T_USER_RINGBUF):
        ms.max_entries = adjust_ringbuf_size(ms.max_entries)


def _symbol(raw: RawElf, sec: Section, name: str):
    for s in raw.symbols:
        if s.shndx == sec.index and s.name == name and s.type != STT_SECTION:
            return s
    return None


def _symbol_offset(raw: RawElf, sec: Section, name: str) -> int | None:
    s = _symbol(raw, sec, name)
    return s.value if s is not None else None


def collect_btf_maps(raw: RawElf, btf: B.Btf | None, table: MapTable) -> None:
    sec = raw.section(".maps")
    if sec is None:
        return
    if btf is None:
        raise _err(raw, "BTF-defined maps (.maps) need BTF; compile with -g")
    try:
        ds_id = btf.find(".maps", B.KIND_DATASEC)
    except Exception:
        raise _err(raw, "DATASEC '.maps' not found in BTF") from None
    ds = btf.type(ds_id)
    for vs in ds.secinfos:
        var = btf.type(vs.type_id)
        if var.kind != B.KIND_VAR:
            raise _err(raw, f".maps DATASEC entry [{vs.type_id}] is a {var.kind_name}, not a variable")
        name = var.name
        sym = _symbol(raw, sec, name)
        if sym is None:
            raise _err(raw, f"map '{name}': no ELF symbol in .maps")
        off = sym.value
        # the 'values' array is zero-sized in BTF; the symbol/secinfo size covers the initialiser
        size = max(sym.size, vs.size, btf.size_of(var.type_id))
        ms, values_off = _parse_def(raw, btf, name, var.type_id, True, table)
        table.btf_map_layout[name] = (off, values_off, size)
        vs.offset, vs.size = off, size
        table.by_symbol[(sec.index, off)] = len(table.maps)
        table.maps.append(ms)


def collect_legacy_maps(raw: RawElf, table: MapTable) -> None:
    """``struct bpf_map_def SEC("maps")`` (type, key_size, value_size, max_entries, map_flags, ...)."""
    sec = raw.section("maps")
    if sec is None:
        return
    syms = sorted((s for s in raw.symbols if s.shndx == sec.index and s.type != STT_SECTION and s.name),
                  key=lambda s: s.value)
    if not syms:
        raise _err(raw, "legacy 'maps' section has no map symbols")
    def_size = sec.size // len(syms)
    if def_size < 20 or sec.size % len(syms):
        raise _err(raw, f"legacy 'maps' section: unrecognised struct bpf_map_def size {def_size}")
    for s in syms:
        if s.value + 20 > len(sec.data):
            raise _err(raw, f"legacy map '{s.name}' runs past the end of the 'maps' section")
        mtype, ks, vs_, me, fl = struct.unpack_from("<5I", sec.data, s.value)
        extra = sec.data[s.value + 20:s.value + def_size]
        if any(extra[8:]):  # id, pinning may follow; anything else set means an unknown layout
            raise _err(raw, f"legacy map '{s.name}': unsupported fields set in bpf_map_def")
        ms = MapSpec(name=s.name, type=mtype, key_size=ks, value_size=vs_, max_entries=me, flags=fl)
        if len(extra) >= 8:
            ms.pinning = struct.unpack_from("<I", extra, 4)[0]
        apply_map_defaults(ms)
        table.by_symbol[(sec.index, s.value)] = len(table.maps)
        table.maps.append(ms)


def _is_data_section(sec: Section) -> str | None:
    n = sec.name
    if sec.type == SHT_PROGBITS and not sec.is_exec and sec.size > 0:
        if n == ".data" or n.startswith(".data."):
            return "data"
        if n == ".rodata" or n.startswith(".rodata."):
            return "rodata"
    if sec.type == SHT_NOBITS and sec.size > 0 and (n == ".bss" or n.startswith(".bss.")):
        return "bss"
    return None


#: largest global data section (.bss has no bytes in the file: its size is only a number)
MAX_DATA_SECTION = 1 << 30


def collect_data_maps(raw: RawElf, btf: B.Btf | None, obj_name: str, table: MapTable) -> None:
    for sec in raw.sections:
        kind = _is_data_section(sec)
        if kind is None:
            continue
        if sec.size > MAX_DATA_SECTION:
            err = MapError(f"map '{internal_map_name(obj_name, sec.name)}' (global data section "
                           f"{sec.name!r}) is {sec.size} bytes; the limit for one data section is "
                           f"{MAX_DATA_SECTION} bytes (a corrupted object?)")
            err.errno = 7  # type: ignore[attr-defined]  # E2BIG, as BPF_MAP_CREATE would say
            raise err
        value_tid = 0
        if btf is not None:
            ids = btf.find_all(sec.name, B.KIND_DATASEC)
            value_tid = ids[0] if ids else 0
        ms = MapSpec(name=internal_map_name(obj_name, sec.name), type=2, key_size=4, value_size=sec.size,
                     max_entries=1, flags=BPF_F_MMAPABLE | (BPF_F_RDONLY_PROG if kind == "rodata" else 0),
                     value_type_id=value_tid,
                     data=sec.data if kind != "bss" else bytes(sec.size), section=sec.name,
                     internal=True, readonly=(kind == "rodata"))
        idx = len(table.maps)
        table.by_section[sec.index] = idx
        table.maps.append(ms)
        if value_tid:
            _collect_globals(raw, btf, sec, ms, value_tid, table)


def _collect_globals(raw: RawElf, btf: B.Btf, sec: Section, ms: MapSpec, ds_id: int, table: MapTable) -> None:
    ds = btf.type(ds_id)
    # clang leaves DATASEC sizes (and sometimes offsets) at 0: fix them up as libbpf does
    ds.size = sec.size
    for vs in ds.secinfos:
        var = btf.type(vs.type_id)
        if var.kind != B.KIND_VAR:
            continue
        off = _symbol_offset(raw, sec, var.name)
        if off is None:
            off = vs.offset
        size = btf.size_of(var.type_id)
        vs.offset, vs.size = off, size
        gv = GlobalVar(name=var.name, map_name=ms.name, offset=off, size=size, type_id=var.type_id,
                       linkage=B.LINKAGE_NAMES.get(var.linkage, str(var.linkage)))
        key = var.name if var.name not in table.globals else f"{sec.name}:{var.name}"
        table.globals[key] = gv


def _kcfg_kind(btf: B.Btf, tid: int) -> tuple[str, int, bool] | None:
    t = btf.resolved(tid)
    if t.kind == B.KIND_INT:
        if t.encoding & B.INT_BOOL and t.size == 1:
            return K.KCFG_BOOL, 1, False
        if t.size == 1:  # any 1-byte int is a char extern for libbpf
            return K.KCFG_CHAR, 1, bool(t.encoding & B.INT_SIGNED)
        if t.size in (1, 2, 4, 8):
            return K.KCFG_INT, t.size, bool(t.encoding & B.INT_SIGNED)
        return None
    if t.kind in (B.KIND_ENUM, B.KIND_ENUM64):
        if t.name == "libbpf_tristate":
            return K.KCFG_TRISTATE, t.size, False
        return K.KCFG_INT, t.size, t.kflag
    if t.kind == B.KIND_ARRAY:
        e = btf.resolved(t.elem_type)
        if e.kind == B.KIND_INT and e.size == 1 and t.nelems:
            return K.KCFG_CHAR_ARR, t.nelems, False
    return None


def collect_kconfig(raw: RawElf, btf: B.Btf | None, obj_name: str, table: MapTable,
                    values: dict[str, str] | None = None) -> None:
    """Lay out the .kconfig map from the object's extern symbols and fill their values."""
    externs = [s for s in raw.symbols
               if s.shndx == SHN_UNDEF and s.bind in (STB_GLOBAL, STB_WEAK) and s.type == STT_NOTYPE and s.name]
    if not externs:
        return
    if btf is None:
        raise _err(raw, f"extern '{externs[0].name}' needs BTF; compile with -g")
    kcfg_ids = btf.find_all(".kconfig", B.KIND_DATASEC)
    kcfg_vars: dict[str, int] = {}
    if kcfg_ids:
        for vs in btf.type(kcfg_ids[0]).secinfos:
            kcfg_vars[btf.type(vs.type_id).name] = btf.type(vs.type_id).type_id
    descs = []
    for s in externs:
        if s.name not in kcfg_vars:
            continue  # .ksyms externs: reported when a program uses them
        kk = _kcfg_kind(btf, kcfg_vars[s.name])
        if kk is None:
            raise _err(raw, f"kconfig extern {s.name} has unsupported type {btf.type_name(kcfg_vars[s.name])}")
        kind, size, signed = kk
        align = btf.align_of(kcfg_vars[s.name])
        descs.append((s, kind, size, signed, align, kcfg_vars[s.name]))
    if not descs:
        return
    descs.sort(key=lambda d: (-d[4], d[2], d[0].name))
    off = 0
    layout = []
    for d in descs:
        off = (off + d[4] - 1) // d[4] * d[4]
        layout.append((d, off))
        off += d[2]
    buf = bytearray(off)
    name = internal_map_name(obj_name, ".kconfig")
    for (s, kind, size, signed, _align, tid), o in layout:
        val = (values or {}).get(s.name) if values else None
        if val is None:
            val = K.runtime_kconfig_value(s.name)
        if val is None:
            if s.bind != STB_WEAK:
                raise _err(raw, f"kconfig extern {s.name} has no value in this runtime; declare it __weak "
                                "or remove it")
            enc = bytes(size)
        else:
            enc = K.encode_kconfig(s.name, kind, size, signed, val)
        buf[o:o + size] = enc
        table.extern_offsets[s.name] = o
        if kcfg_ids:
            for vs in btf.type(kcfg_ids[0]).secinfos:
                if btf.type(vs.type_id).name == s.name:
                    vs.offset, vs.size = o, size
        table.kconfig[s.name] = GlobalVar(name=s.name, map_name=name, offset=o, size=size, type_id=tid,
                                          linkage="extern")
    if kcfg_ids:
        btf.type(kcfg_ids[0]).size = len(buf)
    table.kconfig_index = len(table.maps)
    table.maps.append(MapSpec(name=name, type=2, key_size=4, value_size=len(buf), max_entries=1,
                              flags=BPF_F_RDONLY_PROG | BPF_F_MMAPABLE,
                              value_type_id=kcfg_ids[0] if kcfg_ids else 0, data=bytes(buf),
                              section=".kconfig", internal=True, readonly=True))


def collect_init_slots(raw: RawElf, btf: B.Btf | None, table: MapTable, program_names: set[str]) -> None:
    """Static initialisation of prog arrays / map-in-map from ``.rel.maps``."""
    sec = raw.section(".maps")
    if sec is None or btf is None:
        return
    by_off = {off: (name, voff, size) for name, (off, voff, size) in table.btf_map_layout.items()}
    for rel in raw.rels.get(sec.index, []):
        sym = raw.symbols[rel.sym]
        hit = None
        for off, (name, voff, size) in by_off.items():
            if off <= rel.offset and rel.offset + 8 <= off + size:
                hit = (off, name, voff)
                break
        if hit is None:
            raise _err(raw, f".maps relocation at offset {rel.offset} (symbol '{sym.name}') is outside every map")
        off, name, voff = hit
        ms = table.maps[table.by_symbol[(sec.index, off)]]
        if voff < 0 or rel.offset - off < voff:
            raise _err(raw, f"map '{name}': relocation for '{sym.name}' outside the 'values' array")
        slot = (rel.offset - off - voff) // 8
        if ms.type == T_PROG_ARRAY:
            if sym.name not in program_names:
                raise _err(raw, f"map '{name}': slot {slot} names '{sym.name}', which is not a program")
        else:
            if sym.shndx != sec.index:
                raise _err(raw, f"map '{name}': slot {slot} names '{sym.name}', which is not a map")
            if (sec.index, sym.value) not in table.by_symbol:
                raise _err(raw, f"map '{name}': slot {slot} names unknown map '{sym.name}'")
        ms.init_slots[slot] = sym.name
        if slot >= ms.max_entries:
            raise _err(raw, f"map '{name}': slot {slot} is beyond max_entries {ms.max_entries}")

