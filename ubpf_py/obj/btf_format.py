"""BTF value printer: bytes + a BTF type -> Python values and readable text.

Used for map dumps and event decoding.  Conventions (like bpftool's pretty
printer, simplified): structs/unions -> dict (anonymous members are merged
into the parent), arrays -> list, char arrays -> str (up to the first NUL),
enums -> enumerator name (or the number when no name matches), bool -> bool,
pointers -> hex string, floats -> float, bitfields extracted.  ``format_value``
renders C-initialiser-like text: ``{ .pid = 1, .comm = "bash" }``.
"""

from __future__ import annotations

import struct
from typing import Any

from ubpf_py.errors import BTFError
from ubpf_py.obj import btf as B

_MAX_DEPTH = 32


class HexStr(str):
    """A pointer value ("0x...") - a str, rendered without quotes."""


class EnumName(str):
    """An enumerator name - a str, rendered without quotes."""


def to_python(btf: B.Btf, type_id: int, data: bytes, offset: int = 0) -> Any:
    """Decode ``data[offset:]`` as type ``type_id``."""
    need = btf.size_of(type_id) if btf.kind_of(btf.resolve(type_id)) not in (B.KIND_UNKN, B.KIND_FWD) else 0
    if offset + need > len(data):
        raise BTFError(f"{btf.type_name(type_id)} needs {need} bytes, only {len(data) - offset} given")
    return _value(btf, type_id, data, offset * 8, 0)


def _read_bits(data: bytes, bit_off: int, nbits: int, signed: bool) -> int:
    start = bit_off // 8
    end = (bit_off + nbits + 7) // 8
    v = int.from_bytes(data[start:end], "little") >> (bit_off % 8)
    v &= (1 << nbits) - 1
    if signed and nbits and v & (1 << (nbits - 1)):
        v -= 1 << nbits
    return v


def _is_char(t: B.BtfType) -> bool:
    return t.kind == B.KIND_INT and t.size == 1 and bool(t.encoding & B.INT_CHAR or t.name in ("char", "signed char",
                                                                                          "unsigned char"))


def _value(btf: B.Btf, tid: int, data: bytes, bit_off: int, depth: int, bitfield: int = 0) -> Any:
    if depth > _MAX_DEPTH:
        return "..."
    t = btf.resolved(tid)
    k = t.kind
    if k == B.KIND_INT:
        nbits = bitfield or t.bits
        if not bitfield and bit_off % 8 == 0 and t.int_offset == 0 and nbits == 8 * t.size:
            o = bit_off // 8
            v = int.from_bytes(data[o:o + t.size], "little", signed=bool(t.encoding & B.INT_SIGNED))
        else:
            v = _read_bits(data, bit_off + t.int_offset, nbits, bool(t.encoding & B.INT_SIGNED))
        if t.encoding & B.INT_BOOL:
            return bool(v)
        return v
    if k in (B.KIND_ENUM, B.KIND_ENUM64):
        v = _read_bits(data, bit_off, bitfield or 8 * t.size, t.kflag)
        for e in t.enums:
            if e.value == v or (e.value & ((1 << (8 * t.size)) - 1)) == (v & ((1 << (8 * t.size)) - 1)):
                return EnumName(e.name)
        return v
    if k == B.KIND_PTR:
        o = bit_off // 8
        return HexStr(hex(int.from_bytes(data[o:o + 8], "little")))
    if k == B.KIND_FLOAT:
        o = bit_off // 8
        fmt = {2: "<e", 4: "<f", 8: "<d"}.get(t.size)
        if fmt is None:
            return data[o:o + t.size].hex()
        return struct.unpack_from(fmt, data, o)[0]
    if k == B.KIND_ARRAY:
        elem = btf.resolved(t.elem_type)
        esz = btf.size_of(t.elem_type)
        if _is_char(elem):
            o = bit_off // 8
            raw = data[o:o + t.nelems]
            return raw.split(b"\0", 1)[0].decode("utf-8", "backslashreplace")
        return [_value(btf, t.elem_type, data, bit_off + 8 * esz * i, depth + 1) for i in range(t.nelems)]
    if k in (B.KIND_STRUCT, B.KIND_UNION):
        out: dict[str, Any] = {}
        for i, m in enumerate(t.members):
            v = _value(btf, m.type_id, data, bit_off + m.bit_offset, depth + 1, m.bitfield_size)
            if not m.name and isinstance(v, dict):
                out.update(v)
            else:
                out[m.name or f"__anon{i}"] = v
        return out
    if k == B.KIND_DATASEC:
        out2: dict[str, Any] = {}
        for vs in t.secinfos:
            var = btf.type(vs.type_id)
            out2[var.name] = _value(btf, var.type_id, data, bit_off + 8 * vs.offset, depth + 1)
        return out2
    if k == B.KIND_VAR:
        return _value(btf, t.type_id, data, bit_off, depth + 1)
    if k == B.KIND_UNKN:
        return None
    # FWD, FUNC, FUNC_PROTO: no value layout
    raise BTFError(f"cannot print a value of {btf.type_name(tid)} ({t.kind_name})")


def format_value(btf: B.Btf, type_id: int, data: bytes, offset: int = 0) -> str:
    """Readable C-like text for a value: ``{ .pid = 1, .comm = "bash" }``."""
    return render(to_python(btf, type_id, data, offset))


def render(v: Any) -> str:
    if isinstance(v, dict):
        if not v:
            return "{}"
        return "{ " + ", ".join(f".{k} = {render(x)}" for k, x in v.items()) + " }"
    if isinstance(v, list):
        return "[" + ", ".join(render(x) for x in v) + "]"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (HexStr, EnumName)):
        return str(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if v is None:
        return "(void)"
    return str(v)
