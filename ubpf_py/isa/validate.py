"""Reject invalid instruction encodings (RFC 9669 plus the Linux extensions).

This is the structural gate every engine and the verifier run first: it looks at
one slot at a time (plus jump targets) and knows nothing about types or values.
It is table driven -- one ``_Rule`` per valid opcode, built once at import -- so a
program of thousands of instructions validates in about a millisecond.

What it accepts is exactly the encoding space of RFC 9669 (all conformance
groups, CPU v1-v4) plus ``callx`` as bpf_conformance encodes it (target register
in ``dst``).  Kfunc calls (``call`` with src=2) are a valid *encoding*; the
engines refuse them at load with NotSupportedError.  Linux's load-acquire /
store-release atomics and the legacy packet loads (BPF_ABS/BPF_IND) are valid
Linux encodings that ubpf-py does not run: they raise NotSupportedError here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NoReturn

from ubpf_py.errors import InvalidInstructionError, NotSupportedError
from ubpf_py.isa import opcodes as op
from ubpf_py.isa.instruction import Instruction

# field constraints
ANY = None          # no constraint
ZERO = frozenset({0})

_READ_REGS = range(0, 11)    # r0..r10 may be read
_WRITE_REGS = range(0, 10)   # r10 is the read-only frame pointer


@dataclass(frozen=True, slots=True)
class _Rule:
    name: str
    dst: str            # "w" written, "r" read, "z" must be zero
    src: str            # "r" read, "w" read+written (fetch atomics), "z" must be zero, "p" pseudo (checked by set)
    off: frozenset[int] | None
    imm: frozenset[int] | None
    src_values: frozenset[int] | None = None   # for src == "p"


_ALU_NAMES = {op.BPF_ADD: "add", op.BPF_SUB: "sub", op.BPF_MUL: "mul", op.BPF_DIV: "div",
              op.BPF_OR: "or", op.BPF_AND: "and", op.BPF_LSH: "lsh", op.BPF_RSH: "rsh",
              op.BPF_MOD: "mod", op.BPF_XOR: "xor", op.BPF_MOV: "mov", op.BPF_ARSH: "arsh"}
_JMP_NAMES = {op.BPF_JEQ: "jeq", op.BPF_JGT: "jgt", op.BPF_JGE: "jge", op.BPF_JSET: "jset",
              op.BPF_JNE: "jne", op.BPF_JSGT: "jsgt", op.BPF_JSGE: "jsge", op.BPF_JLT: "jlt",
              op.BPF_JLE: "jle", op.BPF_JSLT: "jslt", op.BPF_JSLE: "jsle"}
_SIZE_NAMES = {op.BPF_B: "b", op.BPF_H: "h", op.BPF_W: "w", op.BPF_DW: "dw"}

ATOMIC_IMMS = frozenset({
    op.ATOMIC_ADD, op.ATOMIC_OR, op.ATOMIC_AND, op.ATOMIC_XOR,
    op.ATOMIC_ADD | op.BPF_FETCH, op.ATOMIC_OR | op.BPF_FETCH, op.ATOMIC_AND | op.BPF_FETCH,
    op.ATOMIC_XOR | op.BPF_FETCH, op.BPF_XCHG, op.BPF_CMPXCHG})
#: Linux 6.15+ BPF_LOAD_ACQ / BPF_STORE_REL atomics (not in RFC 9669)
_ACQ_REL_IMMS = frozenset({0x100, 0x110})
_LEGACY_PACKET = frozenset(
    op.BPF_LD | mode | size for mode in (op.BPF_ABS, op.BPF_IND) for size in (op.BPF_B, op.BPF_H, op.BPF_W, op.BPF_DW))


def _build_rules() -> dict[int, _Rule]:
    rules: dict[int, _Rule] = {}
    for cls, suffix in ((op.BPF_ALU64, ""), (op.BPF_ALU, "32")):
        for code, name in _ALU_NAMES.items():
            signed = code in (op.BPF_DIV, op.BPF_MOD)
            k_off = frozenset({0, 1}) if signed else ZERO
            if code == op.BPF_MOV:
                x_off = frozenset({0, 8, 16, 32}) if cls == op.BPF_ALU64 else frozenset({0, 8, 16})
            else:
                x_off = k_off
            rules[cls | op.BPF_K | code] = _Rule(name + suffix, "w", "z", k_off, ANY)
            rules[cls | op.BPF_X | code] = _Rule(name + suffix, "w", "r", x_off, ZERO)
        rules[cls | op.BPF_K | op.BPF_NEG] = _Rule("neg" + suffix, "w", "z", ZERO, ZERO)
    widths = frozenset({16, 32, 64})
    rules[op.BPF_ALU | op.BPF_END | op.BPF_TO_LE] = _Rule("le", "w", "z", ZERO, widths)
    rules[op.BPF_ALU | op.BPF_END | op.BPF_TO_BE] = _Rule("be", "w", "z", ZERO, widths)
    rules[op.BPF_ALU64 | op.BPF_END | op.BPF_TO_LE] = _Rule("bswap", "w", "z", ZERO, widths)

    for cls, suffix in ((op.BPF_JMP, ""), (op.BPF_JMP32, "32")):
        for code, name in _JMP_NAMES.items():
            rules[cls | op.BPF_K | code] = _Rule(name + suffix, "r", "z", ANY, ANY)
            rules[cls | op.BPF_X | code] = _Rule(name + suffix, "r", "r", ANY, ZERO)
    rules[op.BPF_JMP | op.BPF_JA] = _Rule("ja", "z", "z", ANY, ZERO)
    rules[op.BPF_JMP32 | op.BPF_JA] = _Rule("ja32", "z", "z", ZERO, ANY)
    rules[op.BPF_JMP | op.BPF_CALL] = _Rule("call", "z", "p", ZERO, ANY,
                                            frozenset({op.BPF_CALL_HELPER, op.BPF_PSEUDO_CALL,
                                                       op.BPF_PSEUDO_KFUNC_CALL}))
    rules[op.BPF_JMP | op.BPF_X | op.BPF_CALL] = _Rule("callx", "r", "z", ZERO, ZERO)
    rules[op.BPF_JMP | op.BPF_EXIT] = _Rule("exit", "z", "z", ZERO, ZERO)
    # Linux's may_goto (BPF_JCOND, src_reg BPF_MAY_GOTO): a jump taken once the frame's loop
    # budget is used up; registers and imm are reserved
    rules[op.MAY_GOTO] = _Rule("may_goto", "z", "z", ANY, ZERO)

    rules[op.LDDW] = _Rule("lddw", "w", "p", ZERO, ANY, frozenset(range(0, 7)))
    for size, sname in _SIZE_NAMES.items():
        rules[op.BPF_LDX | op.BPF_MEM | size] = _Rule("ldx" + sname, "w", "r", ANY, ZERO)
        rules[op.BPF_ST | op.BPF_MEM | size] = _Rule("st" + sname, "r", "z", ANY, ANY)
        rules[op.BPF_STX | op.BPF_MEM | size] = _Rule("stx" + sname, "r", "r", ANY, ZERO)
        if size != op.BPF_DW:
            rules[op.BPF_LDX | op.BPF_MEMSX | size] = _Rule("ldxs" + sname, "w", "r", ANY, ZERO)
    for size, sname in ((op.BPF_W, "w"), (op.BPF_DW, "dw")):
        rules[op.BPF_STX | op.BPF_ATOMIC | size] = _Rule("atomic" + sname, "r", "r", ANY, ATOMIC_IMMS)
    return rules


RULES: dict[int, _Rule] = _build_rules()


def _check_reg(i: int, rule: _Rule, which: str, kind: str, reg: int) -> None:
    if kind == "z":
        if reg:
            raise InvalidInstructionError(i, f"{which} register field of {rule.name} must be 0 (got {reg})")
        return
    if reg > 10:
        raise InvalidInstructionError(i, f"{which} register r{reg} of {rule.name} does not exist (r0-r10)")
    if kind == "w" and reg == 10:
        raise InvalidInstructionError(i, f"{rule.name} writes r10, the read-only frame pointer")


def _fail_field(i: int, rule: _Rule, field: str, value: int, allowed: frozenset[int]) -> NoReturn:
    if allowed == ZERO:
        raise InvalidInstructionError(i, f"{field} field of {rule.name} must be 0 (got {value})")
    choices = ", ".join(str(v) for v in sorted(allowed))
    raise InvalidInstructionError(i, f"{field} {value} is not valid for {rule.name} (allowed: {choices})")


def validate(insns: list[Instruction]) -> None:
    """Raise InvalidInstructionError(index, reason) for the first invalid slot.

    Also checks that every jump, local call and ``lddw src=4`` function
    reference lands on an instruction inside the program (not in the middle of
    a lddw), since the engines build their control flow from these targets.
    """
    n = len(insns)
    if n == 0:
        raise InvalidInstructionError(0, "program has no instructions")
    second_slots: set[int] = set()
    targets: list[tuple[int, int, str]] = []
    rules = RULES
    i = 0
    while i < n:
        ins = insns[i]
        code = ins.opcode
        rule = rules.get(code)
        if rule is None:
            _unknown(i, ins)
        dst, src = ins.dst, ins.src
        # register fields: the accepting cases inline (this runs for every slot of every
        # program loaded), ``_check_reg`` words the rejection
        kind = rule.dst
        if (dst if kind == "z" else dst > 10 or (dst == 10 and kind == "w")):
            _check_reg(i, rule, "dst", kind, dst)
        kind = rule.src
        if kind == "p":
            if rule.src_values is None or src not in rule.src_values:
                raise InvalidInstructionError(i, f"src field {src} of {rule.name} is not a valid pseudo source")
        elif (src if kind == "z" else src > 10 or (src == 10 and kind == "w")):
            _check_reg(i, rule, "src", kind, src)
        if rule.off is not None and ins.off not in rule.off:
            _fail_field(i, rule, "offset", ins.off, rule.off)
        if rule.imm is not None and ins.imm not in rule.imm:
            if code & 0xE7 == op.BPF_STX | op.BPF_ATOMIC and ins.imm in _ACQ_REL_IMMS:
                raise NotSupportedError(f"atomic load-acquire/store-release (instruction {i})")
            if code & 0xE7 == op.BPF_STX | op.BPF_ATOMIC:
                raise InvalidInstructionError(i, f"atomic operation 0x{ins.imm & 0xFFFFFFFF:x} is not valid")
            _fail_field(i, rule, "imm", ins.imm, rule.imm)
        cls = code & 0x07
        if cls == op.BPF_STX and code & 0xE0 == op.BPF_ATOMIC and ins.imm & op.BPF_FETCH and src == 10:
            raise InvalidInstructionError(i, "atomic fetch writes r10, the read-only frame pointer")
        if code == op.LDDW:
            if i + 1 >= n:
                raise InvalidInstructionError(i, "lddw is missing its second slot")
            nxt = insns[i + 1]
            if nxt.opcode or nxt.dst or nxt.src or nxt.off:
                raise InvalidInstructionError(i + 1, "second slot of lddw must have opcode, registers and offset 0")
            second_slots.add(i + 1)
            if src == op.BPF_PSEUDO_FUNC:
                targets.append((i, i + 1 + ins.imm, "function reference"))
            i += 2
            continue
        if cls in (op.BPF_JMP, op.BPF_JMP32):
            jop = code & 0xF0
            if code == op.BPF_JMP32 | op.BPF_JA:
                targets.append((i, i + 1 + ins.imm, "jump"))
            elif jop == op.BPF_CALL:
                if code == op.BPF_JMP | op.BPF_CALL and src == op.BPF_PSEUDO_CALL:
                    targets.append((i, i + 1 + ins.imm, "call"))
            elif jop != op.BPF_EXIT:
                targets.append((i, i + 1 + ins.off, "jump"))
        i += 1
    for i, t, what in targets:
        if t < 0 or t >= n:
            raise InvalidInstructionError(i, f"{what} target {t} is outside the program (0..{n - 1})")
        if t in second_slots:
            raise InvalidInstructionError(i, f"{what} target {t} is the second slot of a lddw")


def _unknown(i: int, ins: Instruction) -> NoReturn:
    code = ins.opcode
    if code in _LEGACY_PACKET:
        raise NotSupportedError(f"legacy packet access BPF_ABS/BPF_IND (opcode 0x{code:02x} at instruction {i})")
    cls = code & 0x07
    hint = ""
    if cls in (op.BPF_ALU, op.BPF_ALU64) and code & 0xF0 == op.BPF_NEG:
        hint = " (neg takes no source register: use BPF_K)"
    elif code == op.BPF_ALU64 | op.BPF_X | op.BPF_END:
        hint = " (bswap is BPF_ALU64|BPF_END|BPF_K)"
    elif cls == op.BPF_JMP32 and code & 0xF0 in (op.BPF_CALL, op.BPF_EXIT):
        hint = " (call/exit exist only in the JMP class)"
    elif cls == op.BPF_STX and code & 0xE0 == op.BPF_ATOMIC:
        hint = " (atomics are 32 or 64 bit only)"
    elif cls == op.BPF_LDX and code & 0xE0 == op.BPF_MEMSX:
        hint = " (sign-extending loads are 8, 16 or 32 bit)"
    raise InvalidInstructionError(i, f"unknown opcode 0x{code:02x}{hint}")
