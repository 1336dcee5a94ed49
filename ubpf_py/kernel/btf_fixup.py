"""Make an object's .BTF acceptable to BPF_BTF_LOAD, as libbpf does before loading.

clang leaves DATASEC sizes and the offsets of their variables at 0 (the linker decides
them); the kernel checks that every variable lies inside its section, so libbpf fills
them in from the ELF (section sizes, symbol values).  ``.kconfig`` externs get the
offsets the loader gave them and become allocated globals.  ``__hidden`` global
functions become static (libbpf's ``mark_btf_static``).  The patch works on a copy
of the raw bytes: the parsed spec-level BTF is left alone.
"""

from __future__ import annotations

import struct

from ubpf_py.obj.spec import ObjectSpec

_HDR = struct.Struct("<HBBIIIII")
_TYPE = struct.Struct("<III")
# kind -> (fixed trailer bytes, bytes per vlen entry)
_TRAILER = {1: (4, 0), 3: (12, 0), 4: (0, 12), 5: (0, 12), 6: (0, 8), 13: (0, 8), 14: (4, 0),
            15: (0, 12), 17: (4, 0), 19: (0, 12)}
KIND_FUNC = 12
KIND_VAR = 14
KIND_DATASEC = 15


def _elf_btf_and_layout(path: str) -> tuple[bytes | None, dict[str, int], dict[tuple[str, str], int], set[str]]:
    """(.BTF bytes, section sizes, (section, symbol) -> value, hidden global functions)
    from the ELF file."""
    from elftools.elf.elffile import ELFFile
    from elftools.elf.sections import SymbolTableSection

    with open(path, "rb") as f:
        elf = ELFFile(f)
        sec = elf.get_section_by_name(".BTF")
        if sec is None:
            return None, {}, {}, set()
        raw = sec.data()
        sizes: dict[str, int] = {}
        names: dict[int, str] = {}
        for i, s in enumerate(elf.iter_sections()):
            sizes[s.name] = s["sh_size"]
            names[i] = s.name
        symvals: dict[tuple[str, str], int] = {}
        hidden: set[str] = set()
        for s in elf.iter_sections():
            if isinstance(s, SymbolTableSection):
                for sym in s.iter_symbols():
                    shndx = sym["st_shndx"]
                    if isinstance(shndx, int) and shndx in names and sym.name:
                        symvals.setdefault((names[shndx], sym.name), sym["st_value"])
                        if (sym["st_info"]["type"] == "STT_FUNC" and sym["st_info"]["bind"] != "STB_LOCAL"
                                and sym["st_other"]["visibility"] == "STV_HIDDEN"):
                            hidden.add(sym.name)
        return raw, sizes, symvals, hidden


def kernel_btf_bytes(spec: ObjectSpec) -> bytes | None:
    """The object's BTF with DATASEC sizes/offsets filled in, or None without BTF."""
    try:
        raw, sizes, symvals, hidden = _elf_btf_and_layout(spec.path)
    except (OSError, ValueError):
        return None
    if raw is None or len(raw) < _HDR.size:
        return None
    data = bytearray(raw)
    _magic, _ver, _flags, hdr_len, type_off, type_len, str_off, _str_len = _HDR.unpack_from(data)
    strings_at = hdr_len + str_off

    def string(off: int) -> str:
        end = data.index(0, strings_at + off)
        return data[strings_at + off: end].decode(errors="replace")

    map_sizes = {m.section or m.name: m.value_size for m in spec.maps if m.internal or m.section}
    kconfig_offsets = {name: g.offset for name, g in spec.kconfig.items()}
    # pass 1: where each type is, var names by id
    pos, end = hdr_len + type_off, hdr_len + type_off + type_len
    offsets: list[int] = [0]  # id 0 = void
    while pos < end:
        _name, info, _ = _TYPE.unpack_from(data, pos)
        kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
        offsets.append(pos)
        fixed, per = _TRAILER.get(kind, (0, 0))
        pos += 12 + fixed + per * vlen
    for pos in offsets[1:]:
        name_off, info, _size = _TYPE.unpack_from(data, pos)
        kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
        if kind == KIND_FUNC and vlen and string(name_off) in hidden:
            # __hidden global functions are linked statically: libbpf marks them static so
            # the verifier checks them in their caller's context, not as global functions
            struct.pack_into("<I", data, pos + 4, info & ~0xFFFF)
            continue
        if kind != KIND_DATASEC:
            continue
        sec_name = string(name_off)
        size = sizes.get(sec_name) or map_sizes.get(sec_name, 0)
        struct.pack_into("<I", data, pos + 8, size)
        for k in range(vlen):
            at = pos + 12 + 12 * k
            var_id, _off, _var_size = struct.unpack_from("<III", data, at)
            if not 0 < var_id < len(offsets):
                continue
            var_pos = offsets[var_id]
            var_name = string(_TYPE.unpack_from(data, var_pos)[0])
            if sec_name == ".kconfig":
                off = kconfig_offsets.get(var_name)
                # an allocated global now (libbpf does the same for kconfig externs)
                struct.pack_into("<I", data, var_pos + 12, 1)
            else:
                off = symvals.get((sec_name, var_name))
            if off is not None:
                struct.pack_into("<I", data, at + 4, off)
    return bytes(data)
