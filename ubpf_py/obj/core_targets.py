"""Where CO-RE finds the layout of a *userspace* type: the traced binaries themselves.

The kernel's BTF knows kernel types only.  A uprobe program that relocates a
field of the application's own struct (``BPF_CORE_READ(req, hdr.len)`` on a
``struct request`` of the target) needs the target's layout: its ``.BTF``
section when it was built with one (``pahole -J``), else its DWARF
(``gcc -g``), which is turned into BTF here so ``obj.core`` matches it with the
same rules as kernel BTF.  The lookup order is: each traced binary (in attach
order), then the kernel, then the built-in ``pt_regs`` layout; the first target
with a candidate of the root type's name decides (``obj.core``).  A relocation
no target can resolve fails the load, naming it, as libbpf's "failed to resolve
CO-RE relocation".
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ubpf_py.errors import ObjectLoadError
from ubpf_py.obj import btf as B
from ubpf_py.obj.btf_builder import BtfBuilder


def dwarf_btf(binary: str) -> B.Btf | None:
    """BTF for every named struct in ``binary``'s DWARF (None without DWARF)."""
    from ubpf_py.obj import dwarf_types as D

    try:
        layouts = D.struct_layouts(binary)
    except ObjectLoadError:
        return None
    if not layouts:
        return None
    conv = _Converter(BtfBuilder())
    for name, layout in layouts.items():
        conv.struct(layout, name)
    return conv.b.build(f"{binary} DWARF")


class _Converter:
    def __init__(self, b: BtfBuilder) -> None:
        self.b = b
        self.memo: dict[int, int] = {}
        self.index = b.int("int", 4, signed=True)

    def struct(self, s: Any, name: str | None = None) -> int:
        key = id(s)
        if key in self.memo:
            return self.memo[key]
        self.memo[key] = 0          # recursion through pointers only: those become void *
        members = []
        for m in s.members:
            tid = self.type(m.type)
            bit = m.offset * 8 + m.bit_offset
            members.append((m.name, tid, bit, m.bit_size) if m.bit_size else (m.name, tid, bit))
        tid = self.b.struct(name if name is not None else s.name, s.size, members, union=s.is_union)
        self.memo[key] = tid
        return tid

    def type(self, t: Any) -> int:
        from ubpf_py.obj import dwarf_types as D

        if isinstance(t, D.StructLayout):
            return self.struct(t)
        if isinstance(t, D.IntType):
            return self.b.int(t.name, t.size, signed=t.signed, char=t.char, bool_=t.boolean)
        if isinstance(t, D.FloatType):
            return self.b.float(t.name, t.size)
        if isinstance(t, D.PointerType):
            return self.b.ptr(0)
        if isinstance(t, D.EnumType):
            return self.b.enum(t.name, t.size, [(n, v) for v, n in t.values.items()], signed=t.signed)
        if isinstance(t, D.ArrayType):
            tid = self.type(t.elem)
            for d in reversed(t.dims):
                tid = self.b.array(tid, self.index, d)
            return tid
        return self.b.int("unknown", max(int(getattr(t, "size", 0) or 0), 1))


def binary_btf(binary: str) -> B.Btf | None:
    """The binary's ``.BTF`` section, else BTF made from its DWARF, else None."""
    from ubpf_py.obj.core import load_binary_btf

    try:
        own = load_binary_btf(binary)
    except ObjectLoadError:
        own = None
    return own if own is not None else dwarf_btf(binary)


def core_targets(binaries: Iterable[str]) -> list[B.Btf]:
    """CO-RE targets for programs attached to ``binaries``: their own types first, then the
    kernel's BTF and the built-in layouts (``obj.core.default_targets``)."""
    from ubpf_py.obj.core import default_targets

    out: list[B.Btf] = []
    seen: set[str] = set()
    for path in binaries:
        if path in seen:
            continue
        seen.add(path)
        bt = binary_btf(path)
        if bt is not None:
            out.append(bt)
    return out + default_targets()
