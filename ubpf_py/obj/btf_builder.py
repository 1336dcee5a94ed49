"""Build raw BTF blobs in Python (built-in target layouts, tests).

The output is real BTF bytes parsed back by :class:`ubpf_py.obj.btf.Btf`, so a
built-in layout goes through exactly the code path of kernel BTF.
"""

from __future__ import annotations

import struct

from ubpf_py.obj import btf as B


class BtfBuilder:
    def __init__(self) -> None:
        self._types: list[bytes] = []
        self._strings = bytearray(b"\0")
        self._str_idx: dict[str, int] = {"": 0}

    def _str(self, s: str) -> int:
        off = self._str_idx.get(s)
        if off is None:
            off = len(self._strings)
            self._strings += s.encode() + b"\0"
            self._str_idx[s] = off
        return off

    def _add(self, name: str, kind: int, vlen: int, size_type: int, extra: bytes = b"", kflag: bool = False) -> int:
        info = (kind << 24) | (vlen & 0xFFFF) | (0x80000000 if kflag else 0)
        self._types.append(struct.pack("<III", self._str(name), info, size_type) + extra)
        return len(self._types)

    def int(self, name: str, size: int, signed: bool = False, char: bool = False, bool_: bool = False) -> int:
        enc = (B.INT_SIGNED if signed else 0) | (B.INT_CHAR if char else 0) | (B.INT_BOOL if bool_ else 0)
        return self._add(name, B.KIND_INT, 0, size, struct.pack("<I", (enc << 24) | (size * 8)))

    def ptr(self, target: int) -> int:
        return self._add("", B.KIND_PTR, 0, target)

    def array(self, elem: int, index: int, nelems: int) -> int:
        return self._add("", B.KIND_ARRAY, 0, 0, struct.pack("<III", elem, index, nelems))

    def typedef(self, name: str, target: int) -> int:
        return self._add(name, B.KIND_TYPEDEF, 0, target)

    def struct(self, name: str, size: int, members: list[tuple[str, int, int] | tuple[str, int, int, int]],
               union: bool = False) -> int:
        """members: (name, type id, bit offset[, bitfield size])."""
        kflag = any(len(m) == 4 and m[3] for m in members)
        body = b""
        for m in members:
            bits = m[3] if len(m) == 4 else 0
            off = (bits << 24 | m[2]) if kflag else m[2]
            body += struct.pack("<III", self._str(m[0]), m[1], off)
        return self._add(name, B.KIND_UNION if union else B.KIND_STRUCT, len(members), size, body, kflag)

    def enum(self, name: str, size: int, values: list[tuple[str, int]], signed: bool = False) -> int:
        body = b"".join(struct.pack("<Ii" if signed else "<II", self._str(n), v) for n, v in values)
        return self._add(name, B.KIND_ENUM, len(values), size, body, signed)

    def fwd(self, name: str, union: bool = False) -> int:
        return self._add(name, B.KIND_FWD, 0, 0, kflag=union)

    def const(self, target: int) -> int:
        return self._add("", B.KIND_CONST, 0, target)

    def func(self, name: str, proto: int, linkage: int = 1) -> int:
        return self._add(name, B.KIND_FUNC, linkage, proto)

    def var(self, name: str, type_id: int, linkage: int = 1) -> int:
        return self._add(name, B.KIND_VAR, 0, type_id, struct.pack("<I", linkage))

    def float(self, name: str, size: int) -> int:
        return self._add(name, B.KIND_FLOAT, 0, size)

    def encode(self) -> bytes:
        types = b"".join(self._types)
        hdr = struct.pack("<HBBIIIII", B.BTF_MAGIC, 1, 0, 24, 0, len(types), len(types), len(self._strings))
        return hdr + types + bytes(self._strings)

    def build(self, source: str = "built-in BTF") -> B.Btf:
        return B.Btf(self.encode(), source=source)


#: struct pt_regs of x86-64, in kernel order (also the start of user_regs_struct)
PT_REGS_X86_64 = ("r15", "r14", "r13", "r12", "bp", "bx", "r11", "r10", "r9", "r8", "ax", "cx", "dx",
                  "si", "di", "orig_ax", "ip", "cs", "flags", "sp", "ss")


def builtin_btf() -> B.Btf:
    """Layouts ubpf-py guarantees without kernel BTF: ``struct pt_regs`` (x86-64)."""
    b = BtfBuilder()
    ulong = b.int("long unsigned int", 8)
    b.struct("pt_regs", 8 * len(PT_REGS_X86_64), [(n, ulong, 64 * i) for i, n in enumerate(PT_REGS_X86_64)])
    return b.build("built-in pt_regs layout")
