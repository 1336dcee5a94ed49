"""One BPF instruction slot, and (de)serialisation of whole programs.

Representation contract (every module relies on it):

* A program is a ``list[Instruction]`` with **one entry per 8-byte slot**, so list
  indices are the instruction indices the kernel, llvm-objdump and the verifier
  log use.
* ``lddw`` (opcode 0x18) occupies two slots.  The first slot carries the whole
  immediate: ``imm`` is the low 32 bits (signed, as encoded) and ``imm_hi`` the
  high 32 bits (the second slot's imm field).  The second slot is kept in the list
  as an ``Instruction`` with ``opcode == 0`` (its raw fields preserved) so that
  indices stay aligned; engines never execute it.
* ``off`` and ``imm`` are signed (int16 / int32) as in the encoding.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ubpf_py.isa.opcodes import LDDW

_SLOT = struct.Struct("<BBhi")


@dataclass(frozen=True, slots=True)
class Instruction:
    """A decoded instruction slot.  ``dst``/``src`` are register numbers 0..15."""

    opcode: int
    dst: int = 0
    src: int = 0
    off: int = 0
    imm: int = 0
    #: high 32 bits of a lddw immediate (signed int32 as encoded); 0 elsewhere
    imm_hi: int = 0

    @property
    def imm64(self) -> int:
        """The unsigned 64-bit immediate of a lddw (low | high << 32)."""
        return (self.imm & 0xFFFFFFFF) | ((self.imm_hi & 0xFFFFFFFF) << 32)

    @property
    def slots(self) -> int:
        """How many 8-byte slots the instruction occupies (2 for lddw)."""
        return 2 if self.opcode == LDDW else 1

    def replace(self, **changes: int) -> Instruction:
        """A copy with some fields changed (relocations use this)."""
        fields = {"opcode": self.opcode, "dst": self.dst, "src": self.src,
                  "off": self.off, "imm": self.imm, "imm_hi": self.imm_hi}
        fields.update(changes)
        return Instruction(**fields)


def decode(code: bytes) -> list[Instruction]:
    """Split raw bytecode into slots.  Structural only: it checks the length and
    that a lddw has its second slot; opcode validity is ``isa.validate``'s job."""
    from ubpf_py.errors import InvalidInstructionError

    if len(code) % 8:
        raise InvalidInstructionError(len(code) // 8, f"program size {len(code)} is not a multiple of 8 bytes")
    raw = [_SLOT.unpack_from(code, i) for i in range(0, len(code), 8)]
    out: list[Instruction] = []
    i = 0
    while i < len(raw):
        op, regs, off, imm = raw[i]
        dst, src = regs & 0x0F, regs >> 4
        if op == LDDW:
            if i + 1 >= len(raw):
                raise InvalidInstructionError(i, "lddw is missing its second slot")
            nop, nregs, noff, nimm = raw[i + 1]
            out.append(Instruction(op, dst, src, off, imm, nimm))
            out.append(Instruction(nop, nregs & 0x0F, nregs >> 4, noff, nimm))
            i += 2
            continue
        out.append(Instruction(op, dst, src, off, imm))
        i += 1
    return out


def encode(insns: list[Instruction]) -> bytes:
    """Serialise slots back to bytecode; the lddw continuation slot is rebuilt from
    the first slot's ``imm_hi`` so edits to a lddw only need to touch one entry."""
    buf = bytearray()
    i = 0
    while i < len(insns):
        ins = insns[i]
        buf += _SLOT.pack(ins.opcode, (ins.src << 4) | ins.dst, ins.off, ins.imm)
        if ins.opcode == LDDW:
            nxt = insns[i + 1] if i + 1 < len(insns) else Instruction(0)
            buf += _SLOT.pack(0, (nxt.src << 4) | nxt.dst if nxt.opcode == 0 else 0, 0, ins.imm_hi)
            i += 2
            continue
        i += 1
    return bytes(buf)
