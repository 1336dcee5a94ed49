"""Set global variables before load (libbpf skeleton ``skel->rodata->x = ...``).

Values are checked against the variable's BTF type: integers must fit (signed
or unsigned per BTF, bool 0/1, enums by value or by enumerator name), ``bytes``
must be exactly the variable's size, ``str`` fills a char array (NUL-padded,
room for the terminator required).  Once an object is loaded, ``freeze`` marks
``.rodata``/``.kconfig`` maps read-only and further ``set_global`` calls on them
fail, like writes to a frozen kernel map.
"""

from __future__ import annotations

from ubpf_py.errors import ObjectLoadError
from ubpf_py.obj import btf as B
from ubpf_py.obj.spec import GlobalVar, MapSpec, ObjectSpec

#: attribute set on ObjectSpec by ``freeze`` (kept off the shared dataclass)
_FROZEN_ATTR = "_ubpf_frozen"


def find_global(spec: ObjectSpec, name: str) -> GlobalVar:
    gv = spec.globals.get(name)
    if gv is None:
        known = ", ".join(sorted(spec.globals)) or "none"
        raise ObjectLoadError(f"no global variable '{name}' in {spec.path} (globals: {known})")
    return gv


def encode_global(spec: ObjectSpec, gv: GlobalVar, value: int | bytes | str | bool) -> bytes:
    """The bytes ``value`` stands for in variable ``gv`` (checked against BTF)."""
    btf: B.Btf | None = spec.btf
    name = gv.name
    if isinstance(value, (bytes, bytearray)):
        if len(value) != gv.size:
            raise ObjectLoadError(f"global '{name}' is {gv.size} bytes, got {len(value)} bytes")
        return bytes(value)
    t = btf.resolved(gv.type_id) if (btf is not None and gv.type_id) else None
    if isinstance(value, str):
        if t is not None and t.kind in (B.KIND_ENUM, B.KIND_ENUM64):
            for e in t.enums:
                if e.name == value:
                    return _int_bytes(name, e.value, gv.size, t.is_signed)
            raise ObjectLoadError(f"global '{name}' ({btf.type_name(gv.type_id)}) has no enumerator '{value}'")
        if t is not None and t.kind == B.KIND_ARRAY and btf.size_of(t.elem_type) == 1:
            raw = value.encode()
            if len(raw) >= gv.size:
                raise ObjectLoadError(f"global '{name}' holds {gv.size - 1} characters plus NUL; "
                                      f"'{value}' is {len(raw)} bytes")
            return raw + bytes(gv.size - len(raw))
        if t is not None and t.kind in (B.KIND_INT, B.KIND_PTR):
            try:
                value = int(value, 0)
            except ValueError:
                raise ObjectLoadError(f"global '{name}' is an integer; '{value}' is not a number") from None
        else:
            what = btf.type_name(gv.type_id) if t is not None and btf is not None else "unknown type"
            raise ObjectLoadError(f"global '{name}' ({what}) cannot be set from a string")
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, int):
        if t is not None:
            if t.kind == B.KIND_INT and t.encoding & B.INT_BOOL and value not in (0, 1):
                raise ObjectLoadError(f"global '{name}' is bool; use 0/1 or true/false")
            if t.kind not in (B.KIND_INT, B.KIND_ENUM, B.KIND_ENUM64, B.KIND_PTR):
                raise ObjectLoadError(f"global '{name}' is {btf.type_name(gv.type_id)}; "
                                      "set it from bytes of its size")
            return _int_bytes(name, value, gv.size, t.is_signed)
        if gv.size not in (1, 2, 4, 8):
            raise ObjectLoadError(f"global '{name}' is {gv.size} bytes; set it from bytes")
        return _int_bytes(name, value, gv.size, value < 0)
    raise ObjectLoadError(f"global '{name}': unsupported value type {type(value).__name__}")


def _int_bytes(name: str, value: int, size: int, signed: bool) -> bytes:
    lo = -(1 << (8 * size - 1)) if signed else 0
    hi = (1 << (8 * size - 1)) - 1 if signed else (1 << (8 * size)) - 1
    if not lo <= value <= hi:
        # allow negative values in unsigned slots and large values in signed slots with the same bits
        if -(1 << (8 * size - 1)) <= value <= (1 << (8 * size)) - 1:
            return (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        raise ObjectLoadError(f"global '{name}': value {value} does not fit in {size} bytes")
    return value.to_bytes(size, "little", signed=signed)


def _map_of(spec: ObjectSpec, gv: GlobalVar) -> MapSpec:
    try:
        return spec.map_by_name(gv.map_name)
    except KeyError:
        raise ObjectLoadError(f"global '{gv.name}' lives in unknown map '{gv.map_name}'") from None


def set_global(spec: ObjectSpec, name: str, value: int | bytes | str | bool) -> None:
    """Write a global's initial value into its data map (before the object is loaded)."""
    gv = find_global(spec, name)
    m = _map_of(spec, gv)
    if m.readonly and getattr(spec, _FROZEN_ATTR, False):
        raise ObjectLoadError(f"global '{name}' is in {m.section or m.name}, which is frozen after load; "
                              "set it before loading")
    enc = encode_global(spec, gv, value)
    data = bytearray(m.data if m.data is not None else bytes(m.value_size))
    if gv.offset + gv.size > len(data):
        raise ObjectLoadError(f"global '{name}' (offset {gv.offset}, size {gv.size}) lies outside {m.name}")
    data[gv.offset:gv.offset + gv.size] = enc
    m.data = bytes(data)


def get_global(spec: ObjectSpec, name: str) -> bytes:
    gv = find_global(spec, name)
    m = _map_of(spec, gv)
    data = m.data if m.data is not None else bytes(m.value_size)
    return data[gv.offset:gv.offset + gv.size]


def freeze(spec: ObjectSpec) -> None:
    """Mark the object loaded: ``.rodata``/``.kconfig`` maps stay read-only from now on."""
    for m in spec.maps:
        if m.internal and (m.section == ".kconfig" or m.section.startswith(".rodata")):
            m.readonly = True
    setattr(spec, _FROZEN_ATTR, True)
