"""BPF instruction set (RFC 9669): opcodes, decoding/encoding, assembler, disassembler."""

from ubpf_py.isa.asm import assemble, to_asm
from ubpf_py.isa.disasm import disassemble, format_instruction
from ubpf_py.isa.instruction import Instruction, decode, encode
from ubpf_py.isa.validate import validate

__all__ = ["Instruction", "assemble", "decode", "disassemble", "encode", "format_instruction", "to_asm",
           "validate"]
