"""Opcode constants of the BPF instruction set (RFC 9669 plus Linux extensions).

Names follow <linux/bpf.h> / <linux/bpf_common.h> so that code reads like the
kernel and libbpf sources people already know.
"""

from __future__ import annotations

# instruction classes (low 3 bits)
BPF_LD = 0x00
BPF_LDX = 0x01
BPF_ST = 0x02
BPF_STX = 0x03
BPF_ALU = 0x04
BPF_JMP = 0x05
BPF_JMP32 = 0x06
BPF_ALU64 = 0x07

# size field of load/store (bits 3-4)
BPF_W = 0x00
BPF_H = 0x08
BPF_B = 0x10
BPF_DW = 0x18

# mode field of load/store (bits 5-7)
BPF_IMM = 0x00
BPF_ABS = 0x20
BPF_IND = 0x40
BPF_MEM = 0x60
BPF_MEMSX = 0x80
BPF_ATOMIC = 0xC0

# source field of alu/jmp (bit 3)
BPF_K = 0x00
BPF_X = 0x08

# ALU operations (bits 4-7)
BPF_ADD = 0x00
BPF_SUB = 0x10
BPF_MUL = 0x20
BPF_DIV = 0x30
BPF_OR = 0x40
BPF_AND = 0x50
BPF_LSH = 0x60
BPF_RSH = 0x70
BPF_NEG = 0x80
BPF_MOD = 0x90
BPF_XOR = 0xA0
BPF_MOV = 0xB0
BPF_ARSH = 0xC0
BPF_END = 0xD0

# byte swap source bit for BPF_END
BPF_TO_LE = 0x00
BPF_TO_BE = 0x08

# jump operations (bits 4-7)
BPF_JA = 0x00
BPF_JEQ = 0x10
BPF_JGT = 0x20
BPF_JGE = 0x30
BPF_JSET = 0x40
BPF_JNE = 0x50
BPF_JSGT = 0x60
BPF_JSGE = 0x70
BPF_CALL = 0x80
BPF_EXIT = 0x90
BPF_JLT = 0xA0
BPF_JLE = 0xB0
BPF_JSLT = 0xC0
BPF_JSLE = 0xD0
#: Linux's conditional pseudo-jump class (may_goto is its only member, src_reg 0)
BPF_JCOND = 0xE0
BPF_MAY_GOTO = 0
#: may_goto, the whole opcode: BPF_JMP | BPF_JCOND
MAY_GOTO = BPF_JMP | BPF_JCOND

# atomic operations (imm field of BPF_STX | BPF_ATOMIC)
BPF_FETCH = 0x01
BPF_XCHG = 0xE0 | BPF_FETCH
BPF_CMPXCHG = 0xF0 | BPF_FETCH
ATOMIC_ADD = BPF_ADD
ATOMIC_OR = BPF_OR
ATOMIC_AND = BPF_AND
ATOMIC_XOR = BPF_XOR

# lddw (BPF_LD | BPF_IMM | BPF_DW) pseudo sources (src_reg)
BPF_PSEUDO_MAP_FD = 1
BPF_PSEUDO_MAP_VALUE = 2
BPF_PSEUDO_BTF_ID = 3
BPF_PSEUDO_FUNC = 4
BPF_PSEUDO_MAP_IDX = 5
BPF_PSEUDO_MAP_IDX_VALUE = 6

# call pseudo sources (src_reg of BPF_JMP | BPF_CALL)
BPF_CALL_HELPER = 0
BPF_PSEUDO_CALL = 1
BPF_PSEUDO_KFUNC_CALL = 2

LDDW = BPF_LD | BPF_IMM | BPF_DW  # 0x18

# machine limits shared by the engines and the verifier
STACK_SIZE = 512       # bytes per frame
MAX_CALL_DEPTH = 8     # frames (main program + 7 nested calls)
MAX_TAIL_CALLS = 33    # MAX_TAIL_CALL_CNT
BPF_MAX_LOOPS = 1 << 23    # bpf_loop's limit on nr_loops


SIZE_BYTES = {BPF_B: 1, BPF_H: 2, BPF_W: 4, BPF_DW: 8}
