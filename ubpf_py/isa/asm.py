"""Assembler for the bpf_conformance / ubpf ``.data`` assembly syntax.

The conformance suite (and ubpf's tests) write programs as::

    mov32 %r0, 0x1           # ALU32 with an immediate
    ldxdw %r0, [%r1+8]       # loads/stores take [reg+off]
    lock fetch add [%r10-8], %r1
    jne %r0, %r1, exit       # jumps take +off/-off or a label
    call local func1         # helper (default), local, runtime (kfunc) or call %rN (callx)
    func1:
    exit

so our tests can run the suite's files directly.  Error messages reuse the
suite's wording ("Invalid register: %r50", ...) prefixed with the line number,
so the suite's negative tests check us too.  The first ``exit`` instruction is
also the label ``exit`` (a convention of the suite).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from ubpf_py.errors import AssemblerError
from ubpf_py.isa import opcodes as op
from ubpf_py.isa.instruction import Instruction

_ALU_OPS = {"add": op.BPF_ADD, "sub": op.BPF_SUB, "mul": op.BPF_MUL, "div": op.BPF_DIV,
            "sdiv": op.BPF_DIV, "or": op.BPF_OR, "and": op.BPF_AND, "lsh": op.BPF_LSH,
            "rsh": op.BPF_RSH, "neg": op.BPF_NEG, "mod": op.BPF_MOD, "smod": op.BPF_MOD,
            "xor": op.BPF_XOR, "mov": op.BPF_MOV, "arsh": op.BPF_ARSH}
_JMP_OPS = {"jeq": op.BPF_JEQ, "jgt": op.BPF_JGT, "jge": op.BPF_JGE, "jset": op.BPF_JSET,
            "jne": op.BPF_JNE, "jsgt": op.BPF_JSGT, "jsge": op.BPF_JSGE, "jlt": op.BPF_JLT,
            "jle": op.BPF_JLE, "jslt": op.BPF_JSLT, "jsle": op.BPF_JSLE}
_SIZES = {"b": op.BPF_B, "h": op.BPF_H, "w": op.BPF_W, "dw": op.BPF_DW}
_ATOMIC_OPS = {"add": op.ATOMIC_ADD, "or": op.ATOMIC_OR, "and": op.ATOMIC_AND, "xor": op.ATOMIC_XOR,
               "xchg": op.BPF_XCHG, "cmpxchg": op.BPF_CMPXCHG}
_MOVSX = {"movsx864": (op.BPF_ALU64, 8), "movsx1664": (op.BPF_ALU64, 16), "movsx3264": (op.BPF_ALU64, 32),
          "movsx832": (op.BPF_ALU, 8), "movsx1632": (op.BPF_ALU, 16)}
_REG = re.compile(r"%r(\d+)")
_MEM = re.compile(r"\[([^\]+\-]*)([+\-][^\]]*)?\]")


class _Line:
    """One source line being encoded; knows its number for error messages."""

    __slots__ = ("lineno", "mnemonic", "operands", "text")

    def __init__(self, lineno: int, text: str, mnemonic: str, operands: list[str]) -> None:
        self.lineno = lineno
        self.text = text
        self.mnemonic = mnemonic
        self.operands = operands

    def error(self, message: str) -> AssemblerError:
        return AssemblerError(f"line {self.lineno}: {message} (in '{self.text.strip()}')")


def _reg(line: _Line, text: str) -> int:
    m = _REG.fullmatch(text)
    if m is None or int(m.group(1)) > 15:
        raise line.error(f"Invalid register: {text}")
    return int(m.group(1))


def _int(line: _Line, text: str, what: str) -> int:
    try:
        return int(text, 16) if "0x" in text.lower() else int(text, 10)
    except ValueError:
        raise line.error(f"Invalid {what}: {text}") from None


def _imm32(line: _Line, text: str) -> int:
    value = _int(line, text, "immediate")
    hexa = "0x" in text.lower()
    lo, hi = (-(1 << 31), (1 << 32) - 1) if hexa else (-(1 << 31), (1 << 31) - 1)
    if not lo <= value <= hi:
        raise line.error(f"Immediate out of 32-bit range: {text}")
    return value - (1 << 32) if value >= 1 << 31 else value


def _off16(line: _Line, text: str) -> int:
    value = _int(line, text, "offset")
    hexa = "0x" in text.lower()
    lo, hi = (-(1 << 15), (1 << 16) - 1) if hexa else (-(1 << 15), (1 << 15) - 1)
    if not lo <= value <= hi:
        raise line.error(f"Offset out of 16-bit range: {text}")
    return value - (1 << 16) if value >= 1 << 15 else value


def _imm64(line: _Line, text: str) -> int:
    value = _int(line, text, "immediate")
    if not -(1 << 63) <= value < 1 << 64:
        raise line.error(f"Immediate out of 64-bit range: {text}")
    return value & ((1 << 64) - 1)


def _mem(line: _Line, text: str) -> tuple[int, int]:
    m = _MEM.fullmatch(text)
    if m is None:
        raise line.error(f"Failed to decode register and offset: {text}")
    reg = _reg(line, m.group(1))
    off = _off16(line, m.group(2)) if m.group(2) else 0
    return reg, off


def _signed32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


class _Assembler:
    def __init__(self) -> None:
        self.out: list[Instruction] = []
        self.labels: dict[str, int] = {}
        # (instruction index, label, field "off"|"imm", line) fixed up at the end
        self.fixups: list[tuple[int, str, str, _Line]] = []
        self.seen_exit = False

    # --- helpers --------------------------------------------------------
    def emit(self, ins: Instruction) -> None:
        self.out.append(ins)

    def target(self, line: _Line, text: str, field: str) -> int:
        """A jump/call target: ``+N``/``-N`` or a label resolved later."""
        if text[:1] in "+-":
            return _off16(line, text) if field == "off" else _imm32(line, text)
        self.fixups.append((len(self.out), text, field, line))
        return 0

    # --- encoders -------------------------------------------------------
    def alu(self, line: _Line) -> None:
        m, ops = line.mnemonic, line.operands
        if m in _MOVSX:
            cls, off = _MOVSX[m]
            self._want(line, 2)
            self.emit(Instruction(cls | op.BPF_X | op.BPF_MOV, _reg(line, ops[0]), _reg(line, ops[1]), off, 0))
            return
        if m.endswith("32"):
            cls, base = op.BPF_ALU, m[:-2]
        elif m.endswith("64"):
            cls, base = op.BPF_ALU64, m[:-2]
        else:
            cls, base = op.BPF_ALU64, m
        code = _ALU_OPS[base]
        off = 1 if base in ("sdiv", "smod") else 0
        if code == op.BPF_NEG:
            self._want(line, 1)
            self.emit(Instruction(cls | op.BPF_NEG, _reg(line, ops[0])))
            return
        self._want(line, 2)
        dst = _reg(line, ops[0])
        if ops[1].startswith("%"):
            self.emit(Instruction(cls | op.BPF_X | code, dst, _reg(line, ops[1]), off, 0))
        else:
            self.emit(Instruction(cls | op.BPF_K | code, dst, 0, off, _imm32(line, ops[1])))

    def endian(self, line: _Line) -> None:
        self._want(line, 1)
        m = line.mnemonic
        if m.startswith("be"):
            code, width = op.BPF_ALU | op.BPF_END | op.BPF_TO_BE, m[2:]
        elif m.startswith("le"):
            code, width = op.BPF_ALU | op.BPF_END | op.BPF_TO_LE, m[2:]
        else:
            code, width = op.BPF_ALU64 | op.BPF_END | op.BPF_TO_LE, m[5:] if m.startswith("bswap") else m[4:]
        self.emit(Instruction(code, _reg(line, line.operands[0]), 0, 0, int(width)))

    def lddw(self, line: _Line) -> None:
        self._want(line, 2)
        value = _imm64(line, line.operands[1])
        lo, hi = _signed32(value), _signed32(value >> 32)
        self.emit(Instruction(op.LDDW, _reg(line, line.operands[0]), 0, 0, lo, hi))
        self.emit(Instruction(0, 0, 0, 0, hi))

    def ldx(self, line: _Line) -> None:
        self._want(line, 2)
        m = line.mnemonic
        mode = op.BPF_MEMSX if m.startswith("ldxs") else op.BPF_MEM
        size = _SIZES[m[4:] if mode == op.BPF_MEMSX else m[3:]]
        src, off = _mem(line, line.operands[1])
        self.emit(Instruction(op.BPF_LDX | mode | size, _reg(line, line.operands[0]), src, off, 0))

    def st(self, line: _Line) -> None:
        self._want(line, 2)
        dst, off = _mem(line, line.operands[0])
        self.emit(Instruction(op.BPF_ST | op.BPF_MEM | _SIZES[line.mnemonic[2:]], dst, 0, off,
                              _imm32(line, line.operands[1])))

    def stx(self, line: _Line) -> None:
        self._want(line, 2)
        dst, off = _mem(line, line.operands[0])
        self.emit(Instruction(op.BPF_STX | op.BPF_MEM | _SIZES[line.mnemonic[3:]], dst,
                              _reg(line, line.operands[1]), off, 0))

    def xadd(self, line: _Line) -> None:
        """ubpf's legacy ``xaddw``/``xadddw [reg+off], reg`` spelling of ``lock add``."""
        self._want(line, 2)
        dst, off = _mem(line, line.operands[0])
        size = op.BPF_W if line.mnemonic == "xaddw" else op.BPF_DW
        self.emit(Instruction(op.BPF_STX | op.BPF_ATOMIC | size, dst, _reg(line, line.operands[1]), off,
                              op.ATOMIC_ADD))

    def lock(self, line: _Line) -> None:
        ops = list(line.operands)
        fetch = bool(ops) and ops[0] == "fetch"
        if fetch:
            ops.pop(0)
        if len(ops) != 3:
            raise line.error("Invalid number of operands for lock")
        name = ops[0]
        size = op.BPF_DW
        if name.endswith("32"):
            name, size = name[:-2], op.BPF_W
        elif name.endswith("64"):
            name = name[:-2]
        if name not in _ATOMIC_OPS:
            raise line.error(f"Invalid mnemonic: lock {ops[0]}")
        imm = _ATOMIC_OPS[name] | (op.BPF_FETCH if fetch else 0)
        dst, off = _mem(line, ops[1])
        self.emit(Instruction(op.BPF_STX | op.BPF_ATOMIC | size, dst, _reg(line, ops[2]), off, imm))

    def jmp(self, line: _Line) -> None:
        m, ops = line.mnemonic, line.operands
        if m == "ja":
            self._want(line, 1)
            self.emit(Instruction(op.BPF_JMP | op.BPF_JA, 0, 0, self.target(line, ops[0], "off"), 0))
            return
        if m == "may_goto":  # Linux extension: taken once the frame's loop budget is used up
            self._want(line, 1)
            self.emit(Instruction(op.MAY_GOTO, 0, 0, self.target(line, ops[0], "off"), 0))
            return
        if m == "ja32":
            self._want(line, 1)
            self.emit(Instruction(op.BPF_JMP32 | op.BPF_JA, 0, 0, 0, self.target(line, ops[0], "imm")))
            return
        self._want(line, 3)
        cls, base = (op.BPF_JMP32, m[:-2]) if m.endswith("32") else (op.BPF_JMP, m)
        code = _JMP_OPS[base]
        dst = _reg(line, ops[0])
        if ops[1].startswith("%"):
            src, imm, code = _reg(line, ops[1]), 0, code | op.BPF_X
        else:
            src, imm = 0, _imm32(line, ops[1])
        self.emit(Instruction(cls | code, dst, src, self.target(line, ops[2], "off"), imm))

    def call(self, line: _Line) -> None:
        ops = line.operands
        if len(ops) == 1:
            ops = ["helper", ops[0]]
        self._want(line, 2, ops)
        mode, target = ops
        if mode == "helper":
            if target.startswith("%"):
                self.emit(Instruction(op.BPF_JMP | op.BPF_X | op.BPF_CALL, _reg(line, target)))
            else:
                self.emit(Instruction(op.BPF_JMP | op.BPF_CALL, 0, op.BPF_CALL_HELPER, 0, _imm32(line, target)))
        elif mode == "local":
            self.emit(Instruction(op.BPF_JMP | op.BPF_CALL, 0, op.BPF_PSEUDO_CALL, 0,
                                  self.target(line, target, "imm")))
        elif mode == "runtime":
            self.emit(Instruction(op.BPF_JMP | op.BPF_CALL, 0, op.BPF_PSEUDO_KFUNC_CALL, 0, _imm32(line, target)))
        else:
            raise line.error(f"Invalid call mode: {mode}")

    def exit(self, line: _Line) -> None:
        self._want(line, 0)
        if not self.seen_exit:
            self.seen_exit = True
            self.labels.setdefault("exit", len(self.out))
        self.emit(Instruction(op.BPF_JMP | op.BPF_EXIT))

    @staticmethod
    def _want(line: _Line, count: int, ops: list[str] | None = None) -> None:
        if len(line.operands if ops is None else ops) != count:
            raise line.error(f"Invalid number of operands for mnemonic: {line.mnemonic}")

    # --- driver ---------------------------------------------------------
    def handler(self, mnemonic: str) -> Callable[[_Line], None] | None:
        if mnemonic in _MOVSX:
            return self.alu
        base = mnemonic[:-2] if mnemonic.endswith(("32", "64")) else mnemonic
        if base in _ALU_OPS:
            return self.alu
        if base in _JMP_OPS or mnemonic in ("ja", "ja32", "may_goto"):
            return self.jmp
        if re.fullmatch(r"(be|le|swap|bswap)(16|32|64)", mnemonic):
            return self.endian
        if re.fullmatch(r"ldxs?(b|h|w|dw)", mnemonic) and mnemonic != "ldxsdw":
            return self.ldx
        if re.fullmatch(r"st(b|h|w|dw)", mnemonic):
            return self.st
        if re.fullmatch(r"stx(b|h|w|dw)", mnemonic):
            return self.stx
        return {"lddw": self.lddw, "lock": self.lock, "call": self.call, "exit": self.exit,
                "xaddw": self.xadd, "xadddw": self.xadd}.get(mnemonic)

    def assemble(self, text: str) -> list[Instruction]:
        for lineno, raw in enumerate(text.splitlines(), 1):
            code = raw.split("#", 1)[0]
            # "[%r1 + 8]" -> "[%r1+8]" so memory operands are one token
            code = re.sub(r"\[\s*([^\]]*?)\s*\]", lambda m: "[" + re.sub(r"\s+", "", m.group(1)) + "]", code)
            tokens = [t[:-1] if t.endswith(",") else t for t in code.replace(",", ", ").split()]
            tokens = [t for t in tokens if t]
            if not tokens:
                continue
            mnemonic, operands = tokens[0], tokens[1:]
            line = _Line(lineno, raw, mnemonic, operands)
            if mnemonic.endswith(":") and not operands:
                label = mnemonic[:-1]
                if label in self.labels and not (label == "exit" and self.seen_exit):
                    raise line.error(f"Duplicate label ({label})")
                self.labels[label] = len(self.out)
                continue
            handler = self.handler(mnemonic)
            if handler is None:
                raise line.error(f"Invalid mnemonic: {mnemonic}")
            handler(line)
        for index, label, field, line in self.fixups:
            if label not in self.labels:
                raise line.error(f"Invalid label: {label}")
            rel = self.labels[label] - index - 1
            ins = self.out[index]
            if field == "off":
                if not -(1 << 15) <= rel < 1 << 15:
                    raise line.error(f"jump to {label} is out of 16-bit offset range ({rel})")
                self.out[index] = ins.replace(off=rel)
            else:
                self.out[index] = ins.replace(imm=rel)
        return self.out


def assemble(text: str) -> list[Instruction]:
    """Assemble bpf_conformance-syntax text into instruction slots (lddw takes two).

    Raises AssemblerError naming the line and the problem.
    """
    return _Assembler().assemble(text)


_ALU_NAMES = {v: k for k, v in _ALU_OPS.items() if k not in ("sdiv", "smod")}
_JMP_NAMES = {v: k for k, v in _JMP_OPS.items()}
_SIZE_NAMES = {v: k for k, v in _SIZES.items()}
_ATOMIC_NAMES = {v: k for k, v in _ATOMIC_OPS.items()}


def _rel(value: int) -> str:
    return f"+{value}" if value >= 0 else str(value)


def _memop(reg: int, off: int) -> str:
    return f"[%r{reg}{_rel(off)}]" if off else f"[%r{reg}]"


def format_asm(ins: Instruction) -> str:
    """One instruction in the assembler's own syntax (the inverse of ``assemble``
    for valid encodings; jump targets come out relative, ``+N``/``-N``)."""
    code, cls = ins.opcode, ins.opcode & 0x07
    d, s = f"%r{ins.dst}", f"%r{ins.src}"
    if cls in (op.BPF_ALU, op.BPF_ALU64):
        suffix = "32" if cls == op.BPF_ALU else ""
        alu = code & 0xF0
        if alu == op.BPF_END:
            if cls == op.BPF_ALU64:
                return f"bswap{ins.imm} {d}"
            return f"{'be' if code & op.BPF_TO_BE else 'le'}{ins.imm} {d}"
        if alu == op.BPF_NEG:
            return f"neg{suffix} {d}"
        if alu == op.BPF_MOV and code & op.BPF_X and ins.off:
            return f"movsx{ins.off}{'32' if cls == op.BPF_ALU else '64'} {d}, {s}"
        name = _ALU_NAMES[alu]
        if alu in (op.BPF_DIV, op.BPF_MOD) and ins.off == 1:
            name = "s" + name
        operand = s if code & op.BPF_X else str(ins.imm)
        return f"{name}{suffix} {d}, {operand}"
    if cls in (op.BPF_JMP, op.BPF_JMP32):
        jop = code & 0xF0
        if code == op.BPF_JMP | op.BPF_JA:
            return f"ja {_rel(ins.off)}"
        if code == op.BPF_JMP32 | op.BPF_JA:
            return f"ja32 {_rel(ins.imm)}"
        if code == op.MAY_GOTO:
            return f"may_goto {_rel(ins.off)}"
        if code == op.BPF_JMP | op.BPF_EXIT:
            return "exit"
        if code == op.BPF_JMP | op.BPF_X | op.BPF_CALL:
            return f"call {d}"
        if code == op.BPF_JMP | op.BPF_CALL:
            mode = {op.BPF_CALL_HELPER: "", op.BPF_PSEUDO_CALL: "local ",
                    op.BPF_PSEUDO_KFUNC_CALL: "runtime "}[ins.src]
            return f"call {mode}{_rel(ins.imm) if ins.src == op.BPF_PSEUDO_CALL else ins.imm}"
        suffix = "32" if cls == op.BPF_JMP32 else ""
        operand = s if code & op.BPF_X else str(ins.imm)
        return f"{_JMP_NAMES[jop]}{suffix} {d}, {operand}, {_rel(ins.off)}"
    size = _SIZE_NAMES.get(code & 0x18, "?")
    if code == op.LDDW:
        return f"lddw {d}, 0x{ins.imm64:x}"
    if cls == op.BPF_LDX:
        return f"ldx{'s' if code & 0xE0 == op.BPF_MEMSX else ''}{size} {d}, {_memop(ins.src, ins.off)}"
    if cls == op.BPF_ST:
        return f"st{size} {_memop(ins.dst, ins.off)}, {ins.imm}"
    if code & 0xE0 == op.BPF_ATOMIC:
        fetch = "fetch " if ins.imm & op.BPF_FETCH and ins.imm not in (op.BPF_XCHG, op.BPF_CMPXCHG) else ""
        name = _ATOMIC_NAMES.get(ins.imm, _ATOMIC_NAMES.get(ins.imm & ~op.BPF_FETCH, "?"))
        return f"lock {fetch}{name}{'32' if size == 'w' else ''} {_memop(ins.dst, ins.off)}, {s}"
    return f"stx{size} {_memop(ins.dst, ins.off)}, {s}"


def to_asm(insns: list[Instruction]) -> str:
    """A whole program in assembler syntax (lddw second slots are implied)."""
    lines = []
    i = 0
    while i < len(insns):
        lines.append(format_asm(insns[i]))
        i += 2 if insns[i].opcode == op.LDDW else 1
    return "\n".join(lines) + "\n"
