"""Struct layouts from a BPF object's DWARF, for decoding ring/perf buffer records.

BTF only describes types that a map, global or function signature reaches.
The struct a program sends through ``bpf_ringbuf_output`` or
``bpf_perf_event_output`` usually reaches none of them, so BTF omits it, but
``clang -g`` still writes it to ``.debug_info``.  This module reads those
DWARF types (pyelftools; it applies the object's ``R_BPF_64_ABS32/64``
relocations to the debug sections of a relocatable object itself) and turns
them into :class:`StructLayout` objects that decode record bytes.

Decoded values follow :mod:`ubpf_py.obj.btf_format` so the output writers treat
both sources alike: structs/unions -> dict (anonymous members merged into the
parent), arrays -> list, char arrays -> str up to the first NUL, integers signed
or unsigned by their DWARF base-type encoding, bool -> bool, enums -> enumerator
name, pointers -> ``HexStr`` ("0x..."), floats -> float, bitfields extracted.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Any

from ubpf_py.errors import ObjectLoadError
from ubpf_py.obj.btf_format import EnumName, HexStr, render

# DW_ATE_* base type encodings
_ATE_BOOLEAN, _ATE_FLOAT, _ATE_SIGNED, _ATE_SIGNED_CHAR, _ATE_UNSIGNED, _ATE_UNSIGNED_CHAR = 2, 4, 5, 6, 7, 8
_SIGNED = {_ATE_SIGNED, _ATE_SIGNED_CHAR}
_QUALIFIERS = {"DW_TAG_typedef", "DW_TAG_const_type", "DW_TAG_volatile_type", "DW_TAG_restrict_type",
               "DW_TAG_atomic_type", "DW_TAG_immutable_type"}
_MAX_DEPTH = 32


# ---------------------------------------------------------------------------
# the type model (inert, built once per object)


@dataclass(slots=True)
class IntType:
    name: str
    size: int
    signed: bool
    char: bool = False
    boolean: bool = False


@dataclass(slots=True)
class FloatType:
    name: str
    size: int


@dataclass(slots=True)
class PointerType:
    size: int


@dataclass(slots=True)
class EnumType:
    name: str
    size: int
    signed: bool
    values: dict[int, str]


@dataclass(slots=True)
class ArrayType:
    elem: Any
    dims: list[int]  # outermost first; 0 for a flexible array member

    @property
    def size(self) -> int:
        n = 1
        for d in self.dims:
            n *= d
        return n * type_size(self.elem)


@dataclass(slots=True)
class Member:
    name: str            # "" for an anonymous struct/union member
    offset: int          # bytes from the start of the parent
    type: Any
    bit_size: int = 0    # bitfield width, 0 if not a bitfield
    bit_offset: int = 0  # bits from ``offset`` (little-endian numbering) for bitfields


@dataclass(slots=True)
class StructLayout:
    """A struct or union: its members and how to decode bytes into a dict."""

    name: str          # "" when anonymous
    size: int
    is_union: bool
    members: list[Member]

    @property
    def kind(self) -> str:
        return "union" if self.is_union else "struct"

    def decode(self, data: bytes) -> dict[str, Any]:
        """``data`` (at least ``size`` bytes; a padded perf sample is fine) as a dict."""
        if len(data) < self.size:
            raise ObjectLoadError(f"record of {len(data)} bytes is shorter than {self.kind} {self.name} "
                                  f"({self.size} bytes): decode it with the right type")
        return _struct_value(self, bytes(data), 0, 0)

    def text(self, data: bytes) -> str:
        """C-initialiser-like text, as the BTF printer renders it."""
        return render(self.decode(data))


class _Unknown:
    """A type DWARF names but this decoder has no value rule for (functions, void)."""

    size = 0


UNKNOWN = _Unknown()


def type_size(t: Any) -> int:
    return t.size


# ---------------------------------------------------------------------------
# decoding


def _bits(data: bytes, bit_off: int, nbits: int, signed: bool) -> int:
    start = bit_off // 8
    end = (bit_off + nbits + 7) // 8
    v = (int.from_bytes(data[start:end], "little") >> (bit_off % 8)) & ((1 << nbits) - 1)
    if signed and v >> (nbits - 1):
        v -= 1 << nbits
    return v


def _value(t: Any, data: bytes, off: int, depth: int) -> Any:
    if depth > _MAX_DEPTH:
        return "..."
    if isinstance(t, IntType):
        v = int.from_bytes(data[off:off + t.size], "little", signed=t.signed)
        return bool(v) if t.boolean else v
    if isinstance(t, StructLayout):
        return _struct_value(t, data, off, depth)
    if isinstance(t, ArrayType):
        return _array_value(t, data, off, 0, depth)
    if isinstance(t, PointerType):
        return HexStr(hex(int.from_bytes(data[off:off + t.size], "little")))
    if isinstance(t, EnumType):
        v = int.from_bytes(data[off:off + t.size], "little", signed=t.signed)
        name = t.values.get(v)
        return EnumName(name) if name is not None else v
    if isinstance(t, FloatType):
        fmt = {2: "<e", 4: "<f", 8: "<d"}.get(t.size)
        return struct.unpack_from(fmt, data, off)[0] if fmt else data[off:off + t.size].hex()
    return None


def _array_value(t: ArrayType, data: bytes, off: int, dim: int, depth: int) -> Any:
    n = t.dims[dim]
    if dim + 1 < len(t.dims):
        stride = type_size(t.elem)
        for d in t.dims[dim + 1:]:
            stride *= d
        return [_array_value(t, data, off + i * stride, dim + 1, depth + 1) for i in range(n)]
    if isinstance(t.elem, IntType) and t.elem.char:
        return data[off:off + n].split(b"\0", 1)[0].decode("utf-8", "backslashreplace")
    esz = type_size(t.elem)
    return [_value(t.elem, data, off + i * esz, depth + 1) for i in range(n)]


def _struct_value(s: StructLayout, data: bytes, off: int, depth: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for i, m in enumerate(s.members):
        if m.bit_size:
            t = m.type
            signed = isinstance(t, (IntType, EnumType)) and t.signed
            v: Any = _bits(data, 8 * (off + m.offset) + m.bit_offset, m.bit_size, signed)
            if isinstance(t, EnumType) and v in t.values:
                v = EnumName(t.values[v])
            elif isinstance(t, IntType) and t.boolean:
                v = bool(v)
        else:
            v = _value(m.type, data, off + m.offset, depth + 1)
        if not m.name and isinstance(v, dict):
            out.update(v)
        else:
            out[m.name or f"__anon{i}"] = v
    return out


# ---------------------------------------------------------------------------
# DWARF -> model


class _Builder:
    """Turns DIEs into model types, memoised by DIE offset (types refer to each other)."""

    def __init__(self) -> None:
        self.by_offset: dict[int, Any] = {}

    def type_of(self, die: Any) -> Any:
        """The model type of the DIE that ``die``'s DW_AT_type names (void -> UNKNOWN)."""
        if "DW_AT_type" not in die.attributes:
            return UNKNOWN
        return self.build(die.get_DIE_from_attribute("DW_AT_type"))

    def build(self, die: Any) -> Any:
        key = die.offset
        if key in self.by_offset:
            return self.by_offset[key]
        tag = die.tag
        if tag in _QUALIFIERS:
            t = self.type_of(die)
        elif tag == "DW_TAG_base_type":
            t = self._base(die)
        elif tag in ("DW_TAG_pointer_type", "DW_TAG_reference_type", "DW_TAG_rvalue_reference_type"):
            t = PointerType(_int_attr(die, "DW_AT_byte_size", 8))
        elif tag == "DW_TAG_enumeration_type":
            t = self._enum(die)
        elif tag == "DW_TAG_array_type":
            t = self._array(die)
        elif tag in ("DW_TAG_structure_type", "DW_TAG_union_type", "DW_TAG_class_type"):
            t = StructLayout(_name(die), _int_attr(die, "DW_AT_byte_size", 0), tag == "DW_TAG_union_type", [])
            self.by_offset[key] = t  # before the members: a struct may point to itself
            t.members = self._members(die)
            return t
        else:
            t = UNKNOWN
        self.by_offset[key] = t
        return t

    def _base(self, die: Any) -> Any:
        size = _int_attr(die, "DW_AT_byte_size", 0)
        enc = _int_attr(die, "DW_AT_encoding", _ATE_UNSIGNED)
        name = _name(die)
        if enc == _ATE_FLOAT:
            return FloatType(name, size)
        char = size == 1 and (enc in (_ATE_SIGNED_CHAR, _ATE_UNSIGNED_CHAR) or "char" in name)
        return IntType(name, size, enc in _SIGNED, char, enc == _ATE_BOOLEAN)

    def _enum(self, die: Any) -> EnumType:
        size = _int_attr(die, "DW_AT_byte_size", 4)
        base = self.type_of(die)
        values: dict[int, str] = {}
        signed = isinstance(base, IntType) and base.signed
        for c in die.iter_children():
            if c.tag == "DW_TAG_enumerator":
                values.setdefault(int(c.attributes["DW_AT_const_value"].value), _name(c))
        if any(v < 0 for v in values):
            signed = True
        return EnumType(_name(die), size, signed, values)

    def _array(self, die: Any) -> ArrayType:
        dims: list[int] = []
        for c in die.iter_children():
            if c.tag != "DW_TAG_subrange_type":
                continue
            if "DW_AT_count" in c.attributes:
                dims.append(_const(c.attributes["DW_AT_count"].value))
            elif "DW_AT_upper_bound" in c.attributes:
                lower = _const(c.attributes["DW_AT_lower_bound"].value) if "DW_AT_lower_bound" in c.attributes else 0
                dims.append(_const(c.attributes["DW_AT_upper_bound"].value) - lower + 1)
            else:
                dims.append(0)  # flexible array member
        return ArrayType(self.type_of(die), dims or [0])

    def _members(self, die: Any) -> list[Member]:
        out: list[Member] = []
        for c in die.iter_children():
            if c.tag != "DW_TAG_member" or "DW_AT_external" in c.attributes:  # static C++ members
                continue
            t = self.type_of(c)
            off = _member_offset(c)
            bit_size = _int_attr(c, "DW_AT_bit_size", 0)
            bit_off = 0
            if bit_size:
                if "DW_AT_data_bit_offset" in c.attributes:
                    total = _int_attr(c, "DW_AT_data_bit_offset", 0)
                    off, bit_off = total // 8, total % 8
                elif "DW_AT_bit_offset" in c.attributes:
                    # DWARF 2/3: bits from the most significant bit of the storage unit
                    unit = _int_attr(c, "DW_AT_byte_size", 0) or type_size(t)
                    bit_off = unit * 8 - _int_attr(c, "DW_AT_bit_offset", 0) - bit_size
            out.append(Member(_name(c), off, t, bit_size, bit_off))
        return out


def _name(die: Any) -> str:
    a = die.attributes.get("DW_AT_name")
    if a is None:
        return ""
    v = a.value
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


def _const(v: Any) -> int:
    return int(v) if not isinstance(v, list) else 0


def _int_attr(die: Any, name: str, default: int) -> int:
    a = die.attributes.get(name)
    return default if a is None else _const(a.value)


def _member_offset(die: Any) -> int:
    a = die.attributes.get("DW_AT_data_member_location")
    if a is None:
        return 0  # union members, and struct members of DWARF without it
    if isinstance(a.value, list):  # location expression: DW_OP_plus_uconst N (0x23, ULEB128)
        ops = bytes(a.value)
        if ops and ops[0] == 0x23:
            n = shift = 0
            for b in ops[1:]:
                n |= (b & 0x7F) << shift
                shift += 7
                if not b & 0x80:
                    break
            return n
        raise ObjectLoadError("DWARF member location is not a constant (DW_OP_plus_uconst): "
                              "cannot lay out this struct; give --event-type or a BTF type")
    return int(a.value)


# ---------------------------------------------------------------------------
# API

_cache: dict[tuple[str, int, int], dict[str, StructLayout]] = {}


def struct_layouts(obj_path: str | os.PathLike[str]) -> dict[str, StructLayout]:
    """Every named struct with a size in the object's DWARF, by name ({} without DWARF).

    ``typedef struct { ... } name_t`` is found under ``name_t``.  When several
    compile units define one name with different sizes, the first wins.
    """
    path = os.fspath(obj_path)
    try:
        st = os.stat(path)
    except OSError as e:
        raise ObjectLoadError(f"cannot read BPF object {path}: {e.strerror} (check the path)") from None
    key = (os.path.realpath(path), st.st_mtime_ns, st.st_size)
    hit = _cache.get(key)
    if hit is None:
        hit = _cache[key] = _load(path)
    return hit


def _load(path: str) -> dict[str, StructLayout]:
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    out: dict[str, StructLayout] = {}
    with open(path, "rb") as f:
        try:
            elf = ELFFile(f)
            if not elf.has_dwarf_info() or elf.get_section_by_name(".debug_info") is None:
                return out
            dwarf = elf.get_dwarf_info()  # applies R_BPF_64_ABS32/64 to the debug sections of a .o
        except (ELFError, ValueError, KeyError) as e:
            raise ObjectLoadError(f"malformed ELF/DWARF in {path}: {e} (rebuild it with clang -g)") from None
        b = _Builder()
        try:
            for cu in dwarf.iter_CUs():
                for die in cu.iter_DIEs():
                    tag = die.tag
                    if tag in ("DW_TAG_structure_type", "DW_TAG_class_type"):
                        if "DW_AT_declaration" in die.attributes or "DW_AT_byte_size" not in die.attributes:
                            continue
                        name = _name(die)
                        if name and name not in out:
                            layout = b.build(die)
                            if isinstance(layout, StructLayout):
                                out[name] = layout
                    elif tag == "DW_TAG_typedef" and "DW_AT_type" in die.attributes:
                        target = die.get_DIE_from_attribute("DW_AT_type")
                        if target.tag == "DW_TAG_structure_type" and not _name(target) \
                                and "DW_AT_byte_size" in target.attributes:
                            name = _name(die)
                            layout = b.build(target)
                            if name and name not in out and isinstance(layout, StructLayout):
                                out[name] = StructLayout(name, layout.size, False, layout.members)
        except (ELFError, ValueError, KeyError, IndexError) as e:
            raise ObjectLoadError(f"malformed DWARF in {path}: {e} (rebuild it with clang -g)") from None
    return out


def find_struct_by_size(obj_path: str | os.PathLike[str], size: int, *, slack: int = 0) -> StructLayout | None:
    """The only named struct of ``size`` bytes, else None (none, or ambiguous).

    ``slack`` accepts records up to that many bytes longer than the struct
    (perf samples are padded so that size + 4 is a multiple of 8: pass 7); an
    exact-size match is preferred over a padded one.
    """
    if size <= 0:
        return None
    layouts = struct_layouts(obj_path)
    exact = _distinct([s for s in layouts.values() if s.size == size])
    if len(exact) == 1:
        return exact[0]
    if exact or not slack:
        return None
    near = _distinct([s for s in layouts.values() if size - slack <= s.size < size])
    return near[0] if len(near) == 1 else None


def _distinct(found: list[StructLayout]) -> list[StructLayout]:
    """A typedef name of a struct also named as a struct is one type, not two."""
    out: list[StructLayout] = []
    for s in found:
        if not any(o.members is s.members for o in out):
            out.append(s)
    return out
