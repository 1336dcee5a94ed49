"""Runtime primitives the interpreter's generated code calls.

Kept out of the generated source so each one exists once, is unit-testable and
is easy to read: signed division/modulo with the kernel's edge cases, byte
swaps, and checked (or unchecked) memory accessors bound to one MemoryMap.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Callable

from ubpf_py.isa import opcodes as op
from ubpf_py.vm.memory import MemoryMap, Region

M64 = 0xFFFFFFFFFFFFFFFF
M32 = 0xFFFFFFFF
S64 = 1 << 63
S32 = 1 << 31


def sdiv64(a: int, b: int) -> int:
    """Signed 64-bit division truncating toward zero; x/0 = 0, INT_MIN/-1 = INT_MIN."""
    if b == 0:
        return 0
    a = (a ^ S64) - S64
    b = (b ^ S64) - S64
    q = abs(a) // abs(b)
    return (-q if (a < 0) != (b < 0) else q) & M64


def smod64(a: int, b: int) -> int:
    """Signed 64-bit remainder (sign of the dividend); x%0 leaves x."""
    if b == 0:
        return a
    sa = (a ^ S64) - S64
    sb = (b ^ S64) - S64
    r = abs(sa) % abs(sb)
    return (-r if sa < 0 else r) & M64


def sdiv32(a: int, b: int) -> int:
    """Signed 32-bit division of the low halves, result zero-extended."""
    b &= M32
    if b == 0:
        return 0
    a = ((a & M32) ^ S32) - S32
    b = (b ^ S32) - S32
    q = abs(a) // abs(b)
    return (-q if (a < 0) != (b < 0) else q) & M32


def smod32(a: int, b: int) -> int:
    """Signed 32-bit remainder of the low halves; x%0 leaves (u32)x."""
    b &= M32
    if b == 0:
        return a & M32
    sa = ((a & M32) ^ S32) - S32
    sb = (b ^ S32) - S32
    r = abs(sa) % abs(sb)
    return (-r if sa < 0 else r) & M32


def bswap32(x: int) -> int:
    return int.from_bytes((x & M32).to_bytes(4, "little"), "big")


def bswap64(x: int) -> int:
    return int.from_bytes(x.to_bytes(8, "little"), "big")


STRUCTS = {1: struct.Struct("<B"), 2: struct.Struct("<H"), 4: struct.Struct("<I"), 8: struct.Struct("<Q")}
_CTYPES = {1: ctypes.c_uint8, 2: ctypes.c_uint16, 4: ctypes.c_uint32, 8: ctypes.c_uint64}


def _atomic_apply(code: int, old: int, val: int, mask: int) -> int:
    base = code & ~op.BPF_FETCH
    if base == op.ATOMIC_ADD:
        return (old + val) & mask
    if base == op.ATOMIC_OR:
        return old | (val & mask)
    if base == op.ATOMIC_AND:
        return old & val
    if base == op.ATOMIC_XOR:
        return old ^ (val & mask)
    return val & mask  # xchg


class MemoryAccess:
    """Loads, stores and atomics for one program, checked against ``memory``.

    The stack region gets an inline fast path (most accesses hit it); every
    other address goes through ``MemoryMap.check``, which raises VMFault with
    the pc.  With ``checked=False`` accesses go straight to host memory (only
    for programs the verifier proved safe -- a bad pointer crashes the process).
    """

    def __init__(self, memory: MemoryMap, stack: Region, checked: bool = True) -> None:
        self.memory = memory
        self.stack = stack
        self.checked = checked
        self.loads: dict[int, Callable[[int, int], int]] = {}
        self.stores: dict[int, Callable[[int, int, int], None]] = {}
        for size in (1, 2, 4, 8):
            if checked:
                self.loads[size] = self._checked_load(size)
                self.stores[size] = self._checked_store(size)
            else:
                self.loads[size] = self._raw_load(size)
                self.stores[size] = self._raw_store(size)

    def _checked_load(self, size: int) -> Callable[[int, int], int]:
        unpack_from = STRUCTS[size].unpack_from
        s0 = self.stack.start
        s1 = self.stack.end - size
        sview = self.stack.view
        check = self.memory.check

        def load(a: int, pc: int) -> int:
            if s0 <= a <= s1:
                return unpack_from(sview, a - s0)[0]
            a &= M64
            r = check(a, size, False, pc)
            return unpack_from(r.view, a - r.start)[0]

        return load

    def _checked_store(self, size: int) -> Callable[[int, int, int], None]:
        pack_into = STRUCTS[size].pack_into
        s0 = self.stack.start
        s1 = self.stack.end - size
        sview = self.stack.view
        check = self.memory.check

        def store(a: int, v: int, pc: int) -> None:
            if s0 <= a <= s1:
                pack_into(sview, a - s0, v)
                return
            a &= M64
            r = check(a, size, True, pc)
            pack_into(r.view, a - r.start, v)

        return store

    @staticmethod
    def _raw_load(size: int) -> Callable[[int, int], int]:
        ct = _CTYPES[size]

        def load(a: int, pc: int) -> int:
            return ct.from_address(a & M64).value

        return load

    @staticmethod
    def _raw_store(size: int) -> Callable[[int, int, int], None]:
        ct = _CTYPES[size]

        def store(a: int, v: int, pc: int) -> None:
            ct.from_address(a & M64).value = v

        return store

    def atomic(self, a: int, size: int, code: int, val: int, pc: int) -> int:
        """Read-modify-write; returns the old value (zero-extended).

        The VM is single-threaded per program run, so a plain load/store pair is
        atomic with respect to the program; helpers never run concurrently.
        """
        mask = M64 if size == 8 else M32
        old = self.loads[size](a, pc)
        if self.checked and not (self.stack.start <= a <= self.stack.end - size):
            self.memory.check(a & M64, size, True, pc)  # fault on read-only memory before writing
        self.stores[size](a, _atomic_apply(code, old, val, mask), pc)
        return old

    def cmpxchg(self, a: int, size: int, expected: int, new: int, pc: int) -> int:
        mask = M64 if size == 8 else M32
        old = self.loads[size](a, pc)
        if old == expected & mask:
            self.stores[size](a, new & mask, pc)
        elif self.checked and not (self.stack.start <= a <= self.stack.end - size):
            self.memory.check(a & M64, size, True, pc)  # cmpxchg needs write access even when it fails
        return old
