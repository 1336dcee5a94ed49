"""BTF (BPF Type Format) parser and type API.

Why hand-written: pyelftools does not know BTF, and the loader, CO-RE, the map
dumper and the event decoder all need the same small set of questions answered
("what is the size of this type", "where is member x", "which struct is called
y").  Parsing is lazy so that the kernel's BTF (``/sys/kernel/btf/vmlinux``,
several MB and 100k+ types) costs one quick scan of the type headers; a type is
decoded into a :class:`BtfType` only when somebody asks for it.

Type ids follow the kernel: id 0 is ``void``; ids of a split BTF continue after
its base's last id.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from ubpf_py.errors import BTFError

BTF_MAGIC = 0xEB9F

KIND_UNKN = 0
KIND_INT = 1
KIND_PTR = 2
KIND_ARRAY = 3
KIND_STRUCT = 4
KIND_UNION = 5
KIND_ENUM = 6
KIND_FWD = 7
KIND_TYPEDEF = 8
KIND_VOLATILE = 9
KIND_CONST = 10
KIND_RESTRICT = 11
KIND_FUNC = 12
KIND_FUNC_PROTO = 13
KIND_VAR = 14
KIND_DATASEC = 15
KIND_FLOAT = 16
KIND_DECL_TAG = 17
KIND_TYPE_TAG = 18
KIND_ENUM64 = 19

KIND_NAMES = {
    KIND_UNKN: "void", KIND_INT: "int", KIND_PTR: "ptr", KIND_ARRAY: "array",
    KIND_STRUCT: "struct", KIND_UNION: "union", KIND_ENUM: "enum", KIND_FWD: "fwd",
    KIND_TYPEDEF: "typedef", KIND_VOLATILE: "volatile", KIND_CONST: "const",
    KIND_RESTRICT: "restrict", KIND_FUNC: "func", KIND_FUNC_PROTO: "func_proto",
    KIND_VAR: "var", KIND_DATASEC: "datasec", KIND_FLOAT: "float",
    KIND_DECL_TAG: "decl_tag", KIND_TYPE_TAG: "type_tag", KIND_ENUM64: "enum64",
}

#: kinds that only qualify another type (skipped when resolving)
MODIFIER_KINDS = frozenset({KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_TYPE_TAG})

# INT encoding bits
INT_SIGNED = 1
INT_CHAR = 2
INT_BOOL = 4

# VAR / FUNC linkage
LINKAGE_NAMES = {0: "static", 1: "global", 2: "extern"}

_HDR = struct.Struct("<HBBIIIII")
_TYPE = struct.Struct("<III")
_U32 = struct.Struct("<I")
_3U32 = struct.Struct("<III")
_2U32 = struct.Struct("<II")

# bytes that follow the common 12-byte header, per kind: (fixed, per-vlen-entry)
_TRAILER = {
    KIND_INT: (4, 0), KIND_ARRAY: (12, 0), KIND_STRUCT: (0, 12), KIND_UNION: (0, 12),
    KIND_ENUM: (0, 8), KIND_FUNC_PROTO: (0, 8), KIND_VAR: (4, 0), KIND_DATASEC: (0, 12),
    KIND_DECL_TAG: (4, 0), KIND_ENUM64: (0, 12),
}


@dataclass(slots=True)
class Member:
    """A struct/union member; ``bit_offset`` from the start of the aggregate."""

    name: str
    type_id: int
    bit_offset: int
    #: 0 for a normal member, else the bitfield width
    bitfield_size: int = 0


@dataclass(slots=True)
class EnumValue:
    name: str
    value: int


@dataclass(slots=True)
class Param:
    name: str
    type_id: int


@dataclass(slots=True)
class VarSecinfo:
    type_id: int
    offset: int
    size: int


@dataclass(slots=True)
class BtfType:
    """One decoded BTF type.  Only the fields of its kind are meaningful."""

    id: int
    kind: int
    name: str = ""
    #: byte size for INT/STRUCT/UNION/ENUM/ENUM64/DATASEC/FLOAT
    size: int = 0
    #: referenced type for PTR/TYPEDEF/modifiers/FUNC/VAR/DECL_TAG/FUNC_PROTO (return type)
    type_id: int = 0
    kflag: bool = False
    vlen: int = 0
    # INT
    encoding: int = 0
    int_offset: int = 0
    bits: int = 0
    # ARRAY
    elem_type: int = 0
    index_type: int = 0
    nelems: int = 0
    members: list[Member] = field(default_factory=list)
    enums: list[EnumValue] = field(default_factory=list)
    params: list[Param] = field(default_factory=list)
    secinfos: list[VarSecinfo] = field(default_factory=list)
    #: VAR linkage / FUNC linkage (0 static, 1 global, 2 extern)
    linkage: int = 0
    #: DECL_TAG component index (-1 = the type itself)
    component_idx: int = -1

    @property
    def kind_name(self) -> str:
        return KIND_NAMES.get(self.kind, f"kind#{self.kind}")

    @property
    def is_signed(self) -> bool:
        if self.kind == KIND_INT:
            return bool(self.encoding & INT_SIGNED)
        if self.kind in (KIND_ENUM, KIND_ENUM64):
            return self.kflag
        return False

    @property
    def is_composite(self) -> bool:
        return self.kind in (KIND_STRUCT, KIND_UNION)


VOID = BtfType(0, KIND_UNKN, "void")


class Btf:
    """A parsed BTF blob (optionally split on top of a base BTF)."""

    def __init__(self, data: bytes, base: Btf | None = None, source: str = "BTF") -> None:
        self.source = source
        self.base = base
        self._data = bytes(data)
        if len(data) < _HDR.size:
            raise BTFError(f"{source}: BTF data is truncated ({len(data)} bytes); rebuild the object with -g")
        magic, version, _flags, hdr_len, type_off, type_len, str_off, str_len = _HDR.unpack_from(data)
        if magic != BTF_MAGIC:
            if magic == 0x9FEB:
                raise BTFError(f"{source}: big-endian BTF is not supported; build for the little-endian bpf target")
            raise BTFError(f"{source}: bad BTF magic {magic:#x}; the .BTF section is corrupt")
        if version != 1:
            raise BTFError(f"{source}: unsupported BTF version {version}")
        t0 = hdr_len + type_off
        s0 = hdr_len + str_off
        if t0 + type_len > len(data) or s0 + str_len > len(data):
            raise BTFError(f"{source}: BTF sections run past the end of the data; the BTF is truncated")
        self._types_start = t0
        self._types_end = t0 + type_len
        self._strings = self._data[s0:s0 + str_len]
        self._str_base = len(base._strings) if base is not None else 0
        self.first_id = (base.first_id + base.count_own) if base is not None else 1
        self._offsets: list[int] = []
        self._name_offs: list[int] = []
        self._kinds: list[int] = []
        self._scan()
        self._cache: dict[int, BtfType] = {}
        self._by_name: dict[str, list[int]] | None = None

    # ------------------------------------------------------------------ parse
    def _scan(self) -> None:
        """Record where each type starts, its name offset and kind (one cheap pass)."""
        data, pos, end = self._data, self._types_start, self._types_end
        offsets, names, kinds = self._offsets, self._name_offs, self._kinds
        unpack = _TYPE.unpack_from
        trailer = _TRAILER
        while pos < end:
            if pos + 12 > end:
                raise BTFError(f"{self.source}: truncated BTF type at byte {pos}")
            name_off, info, _ = unpack(data, pos)
            kind = (info >> 24) & 0x1F
            vlen = info & 0xFFFF
            if kind > KIND_ENUM64:
                raise BTFError(f"{self.source}: unknown BTF kind {kind} for type [{self.first_id + len(offsets)}]")
            offsets.append(pos)
            names.append(name_off)
            kinds.append(kind)
            fixed, per = trailer.get(kind, (0, 0))
            pos += 12 + fixed + per * vlen
        if pos != end:
            raise BTFError(f"{self.source}: BTF type data is malformed (ends at {pos}, expected {end})")

    @property
    def count_own(self) -> int:
        return len(self._offsets)

    @property
    def last_id(self) -> int:
        return self.first_id + len(self._offsets) - 1

    def __len__(self) -> int:
        """Number of type ids including void (so valid ids are 0..len-1)."""
        return self.last_id + 1

    def string(self, off: int) -> str:
        if off < self._str_base:
            assert self.base is not None
            return self.base.string(off)
        off -= self._str_base
        if off >= len(self._strings):
            raise BTFError(f"{self.source}: string offset {off} is outside the string section")
        end = self._strings.find(b"\0", off)
        if end < 0:
            end = len(self._strings)
        return self._strings[off:end].decode("utf-8", "replace")

    def kind_of(self, tid: int) -> int:
        if tid == 0:
            return KIND_UNKN
        if tid < self.first_id:
            assert self.base is not None
            return self.base.kind_of(tid)
        return self._kinds[tid - self.first_id]

    def name_of(self, tid: int) -> str:
        if tid == 0:
            return ""
        if tid < self.first_id:
            assert self.base is not None
            return self.base.name_of(tid)
        return self.string(self._name_offs[tid - self.first_id])

    def __getitem__(self, tid: int) -> BtfType:
        return self.type(tid)

    def type(self, tid: int) -> BtfType:
        if tid == 0:
            return VOID
        if tid < self.first_id:
            if self.base is None:
                raise BTFError(f"{self.source}: no BTF type [{tid}]")
            return self.base.type(tid)
        t = self._cache.get(tid)
        if t is None:
            idx = tid - self.first_id
            if idx >= len(self._offsets) or tid < 0:
                raise BTFError(f"{self.source}: no BTF type [{tid}] (last id is {self.last_id})")
            t = self._decode(tid, self._offsets[idx])
            self._cache[tid] = t
        return t

    def _decode(self, tid: int, pos: int) -> BtfType:
        d = self._data
        name_off, info, size_type = _TYPE.unpack_from(d, pos)
        kind = (info >> 24) & 0x1F
        vlen = info & 0xFFFF
        kflag = bool(info >> 31)
        s = self.string
        t = BtfType(tid, kind, s(name_off), kflag=kflag, vlen=vlen)
        p = pos + 12
        if kind in (KIND_INT, KIND_STRUCT, KIND_UNION, KIND_ENUM, KIND_ENUM64, KIND_DATASEC, KIND_FLOAT):
            t.size = size_type
        else:
            t.type_id = size_type
        if kind == KIND_INT:
            (v,) = _U32.unpack_from(d, p)
            t.encoding = (v >> 24) & 0x0F
            t.int_offset = (v >> 16) & 0xFF
            t.bits = v & 0xFF
        elif kind == KIND_ARRAY:
            t.elem_type, t.index_type, t.nelems = _3U32.unpack_from(d, p)
        elif kind in (KIND_STRUCT, KIND_UNION):
            for i in range(vlen):
                mn, mt, moff = _3U32.unpack_from(d, p + 12 * i)
                if kflag:
                    t.members.append(Member(s(mn), mt, moff & 0xFFFFFF, moff >> 24))
                else:
                    t.members.append(Member(s(mn), mt, moff, 0))
        elif kind == KIND_ENUM:
            for i in range(vlen):
                en, ev = struct.unpack_from("<Ii" if kflag else "<II", d, p + 8 * i)
                t.enums.append(EnumValue(s(en), ev))
        elif kind == KIND_ENUM64:
            for i in range(vlen):
                en, lo, hi = _3U32.unpack_from(d, p + 12 * i)
                v = lo | (hi << 32)
                if kflag and v >= 1 << 63:
                    v -= 1 << 64
                t.enums.append(EnumValue(s(en), v))
        elif kind == KIND_FUNC_PROTO:
            for i in range(vlen):
                pn, pt = _2U32.unpack_from(d, p + 8 * i)
                t.params.append(Param(s(pn), pt))
        elif kind == KIND_VAR:
            (t.linkage,) = _U32.unpack_from(d, p)
        elif kind == KIND_DATASEC:
            for i in range(vlen):
                t.secinfos.append(VarSecinfo(*_3U32.unpack_from(d, p + 12 * i)))
        elif kind == KIND_FUNC:
            t.linkage = vlen
        elif kind == KIND_DECL_TAG:
            (ci,) = struct.unpack_from("<i", d, p)
            t.component_idx = ci
        return t

    def __iter__(self):
        """All own types (not the base's), in id order."""
        for tid in range(self.first_id, self.last_id + 1):
            yield self.type(tid)

    # ------------------------------------------------------------ lookups
    def _name_index(self) -> dict[str, list[int]]:
        if self._by_name is None:
            idx: dict[str, list[int]] = {}
            s = self.string
            for i, off in enumerate(self._name_offs):
                if off:
                    idx.setdefault(s(off), []).append(self.first_id + i)
            self._by_name = idx
        return self._by_name

    def find_all(self, name: str, kind: int | None = None) -> list[int]:
        """Ids of types called ``name`` (optionally of one kind), base first."""
        out = self.base.find_all(name, kind) if self.base is not None else []
        for tid in self._name_index().get(name, ()):
            if kind is None or self._kinds[tid - self.first_id] == kind:
                out.append(tid)
        return out

    def find(self, name: str, kind: int | None = None) -> int:
        """The first type id called ``name`` (of ``kind``); BTFError when absent."""
        ids = self.find_all(name, kind)
        if not ids:
            what = f"{KIND_NAMES.get(kind, '')} {name}".strip() if kind is not None else name
            raise BTFError(f"{self.source}: no BTF type '{what}'")
        return ids[0]

    def names(self) -> list[str]:
        return list(self._name_index())

    # ------------------------------------------------------- type algebra
    def skip_modifiers(self, tid: int) -> int:
        """Follow const/volatile/restrict/type_tag (not typedefs)."""
        while self.kind_of(tid) in MODIFIER_KINDS:
            tid = self.type(tid).type_id
        return tid

    def resolve(self, tid: int) -> int:
        """Follow typedefs and modifiers down to the underlying type id."""
        for _ in range(64):
            k = self.kind_of(tid)
            if k in MODIFIER_KINDS or k == KIND_TYPEDEF:
                tid = self.type(tid).type_id
            else:
                return tid
        raise BTFError(f"{self.source}: typedef/modifier chain too long at type [{tid}]")

    def resolved(self, tid: int) -> BtfType:
        return self.type(self.resolve(tid))

    def size_of(self, tid: int) -> int:
        """Byte size of a type (like libbpf's btf__resolve_size)."""
        t = self.resolved(tid)
        k = t.kind
        if k in (KIND_INT, KIND_STRUCT, KIND_UNION, KIND_ENUM, KIND_ENUM64, KIND_DATASEC, KIND_FLOAT):
            return t.size
        if k == KIND_PTR:
            return 8
        if k == KIND_ARRAY:
            return t.nelems * self.size_of(t.elem_type)
        if k == KIND_VAR:
            return self.size_of(t.type_id)
        raise BTFError(f"{self.source}: type [{tid}] ({self.type_name(tid)}) has no size")

    def align_of(self, tid: int) -> int:
        t = self.resolved(tid)
        k = t.kind
        if k in (KIND_INT, KIND_ENUM, KIND_ENUM64, KIND_FLOAT):
            return max(1, min(8, t.size))
        if k == KIND_PTR:
            return 8
        if k == KIND_ARRAY:
            return self.align_of(t.elem_type)
        if k in (KIND_STRUCT, KIND_UNION):
            a = 1
            for m in t.members:
                a = max(a, self.align_of(m.type_id))
                # a packed struct has members at unaligned offsets
                if m.bitfield_size == 0 and m.bit_offset % (8 * self.align_of(m.type_id)):
                    return 1
            return a
        raise BTFError(f"{self.source}: type [{tid}] ({self.type_name(tid)}) has no alignment")

    def member(self, tid: int, name: str) -> tuple[Member, int]:
        """Find member ``name`` of a struct/union, looking into anonymous members.

        Returns the member and its absolute bit offset from the start of ``tid``.
        """
        t = self.resolved(tid)
        if not t.is_composite:
            raise BTFError(f"{self.source}: {self.type_name(tid)} is not a struct or union (looking for '{name}')")
        for m in t.members:
            if m.name == name:
                return m, m.bit_offset
        for m in t.members:
            if not m.name and self.resolved(m.type_id).is_composite:
                try:
                    inner, off = self.member(m.type_id, name)
                except BTFError:
                    continue
                return inner, m.bit_offset + off
        raise BTFError(f"{self.source}: {self.type_name(tid)} has no member '{name}'")

    def type_name(self, tid: int) -> str:
        """A C-like spelling of a type, for messages and dumps."""
        return self._type_name(tid, 0)

    def _type_name(self, tid: int, depth: int) -> str:
        if depth > 16:
            return "..."
        t = self.type(tid)
        k = t.kind
        if k == KIND_UNKN:
            return "void"
        if k in (KIND_STRUCT, KIND_UNION):
            return f"{'struct' if k == KIND_STRUCT else 'union'} {t.name or '(anon)'}"
        if k in (KIND_ENUM, KIND_ENUM64):
            return f"enum {t.name or '(anon)'}"
        if k == KIND_FWD:
            return f"{'union' if t.kflag else 'struct'} {t.name}"
        if k == KIND_PTR:
            return self._type_name(t.type_id, depth + 1) + " *"
        if k == KIND_ARRAY:
            return f"{self._type_name(t.elem_type, depth + 1)}[{t.nelems}]"
        if k in (KIND_CONST, KIND_VOLATILE, KIND_RESTRICT):
            return f"{KIND_NAMES[k]} {self._type_name(t.type_id, depth + 1)}"
        if k == KIND_TYPE_TAG:
            return self._type_name(t.type_id, depth + 1)
        if k == KIND_FUNC_PROTO:
            args = ", ".join(self._type_name(p.type_id, depth + 1) for p in t.params) or "void"
            return f"{self._type_name(t.type_id, depth + 1)} (*)({args})"
        return t.name or KIND_NAMES.get(k, "?")


def load_btf_file(path: str | Path, base: Btf | None = None) -> Btf:
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise BTFError(f"cannot read BTF file {p}: {e.strerror}") from None
    return Btf(data, base=base, source=str(p))


KERNEL_BTF_PATH = "/sys/kernel/btf/vmlinux"


@lru_cache(maxsize=4)
def _load_kernel_btf_cached(path: str) -> Btf:
    return load_btf_file(path)


def load_kernel_btf(path: str = KERNEL_BTF_PATH) -> Btf | None:
    """The running kernel's BTF, parsed once per process; None when unreadable."""
    try:
        return _load_kernel_btf_cached(path)
    except BTFError:
        if not Path(path).exists():
            return None
        try:
            Path(path).read_bytes()
        except OSError:
            return None
        raise
