"""Struct layouts written once, rendered for Python (offsets) and C (a header).

A ``Layout`` is a list of named fields, each a u64 word or a byte array.  Offsets
are computed here; Python code reads ``LAYOUT.off("name")`` (or the generated
``*_OFF`` constants of the defining module) and C code includes the header this
module renders, so the two sides cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Field:
    name: str
    size: int          # bytes; 8 for a u64 word
    count: int = 1     # array length (of ``size``-byte elements)
    doc: str = ""

    @property
    def nbytes(self) -> int:
        return self.size * self.count


@dataclass(slots=True)
class Layout:
    """A C struct of naturally aligned fields (u8 arrays, u32/u64 words and arrays)."""

    name: str
    fields: list[Field]
    doc: str = ""
    #: total size is rounded up to this
    align: int = 8
    offsets: dict[str, int] = field(default_factory=dict, init=False)
    size: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        off = 0
        for f in self.fields:
            a = min(f.size, 8)
            off = (off + a - 1) // a * a
            if f.name in self.offsets:
                raise ValueError(f"{self.name}: field {f.name} twice")
            self.offsets[f.name] = off
            off += f.nbytes
        self.size = (off + self.align - 1) // self.align * self.align

    def off(self, name: str) -> int:
        return self.offsets[name]

    def word(self, name: str) -> int:
        """Index of a u64 field in an array of u64 (the offset / 8)."""
        o = self.offsets[name]
        assert o % 8 == 0
        return o // 8

    def c_struct(self) -> str:
        ctype = {1: "uint8_t", 2: "uint16_t", 4: "uint32_t", 8: "uint64_t"}
        lines = []
        if self.doc:
            lines.append(f"/* {self.doc} */")
        lines.append(f"struct {self.name} {{")
        for f in self.fields:
            arr = f"[{f.count}]" if f.count != 1 else ""
            doc = f"  /* {f.doc} */" if f.doc else ""
            lines.append(f"\t{ctype[f.size]} {f.name}{arr};{doc}")
        lines.append(f"}} __attribute__((aligned({self.align})));")
        lines.append(f"_Static_assert(sizeof(struct {self.name}) == {self.size}, \"{self.name} size\");")
        for f in self.fields:
            lines.append(f"_Static_assert(__builtin_offsetof(struct {self.name}, {f.name}) == "
                         f"{self.offsets[f.name]}, \"{self.name}.{f.name}\");")
        return "\n".join(lines)


def u64(name: str, doc: str = "") -> Field:
    return Field(name, 8, 1, doc)


def u64s(name: str, count: int, doc: str = "") -> Field:
    return Field(name, 8, count, doc)


def u32(name: str, doc: str = "") -> Field:
    return Field(name, 4, 1, doc)


def u8s(name: str, count: int, doc: str = "") -> Field:
    return Field(name, 1, count, doc)
