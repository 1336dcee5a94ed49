"""BPF instruction set (RFC 9669): opcodes, decoding/encoding, assembler, disassembler."""

from ubpf_py.isa.instruction import Instruction, decode, encode

__all__ = ["Instruction", "decode", "encode"]
