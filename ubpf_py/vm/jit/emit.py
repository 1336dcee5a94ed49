"""Textual LLVM IR emission state for one BPF function.

Why text: building IR with ``llvmlite.ir`` objects costs tens of microseconds
per instruction in Python, which alone would blow the compile-time budget
(< 30 ms per 1,000 BPF instructions).  Formatting lines with f-strings is an
order of magnitude cheaper and LLVM's parser is fast.

Each BPF register r0..r9 lives in an ``alloca`` (``%R0``..``%R9``); SROA turns
them into SSA values.  r10 is read-only, so it is the function argument
``%fp`` itself.  Within a BPF basic block the emitter remembers each register's
current SSA value and writes registers back to their allocas only before a
branch to another BPF block: the IR text shrinks by about a third, which cuts
parse and optimisation time (compile time is the budget that matters here).
Internal blocks (memory checks, call status tests) are dominated by the block
that started the BPF instruction, so remembered values stay valid across them.
"""

from __future__ import annotations

from ubpf_py.errors import InvalidInstructionError

U64 = (1 << 64) - 1


def s64(value: int) -> int:
    """``value`` as a signed 64-bit integer (the form LLVM's parser wants for i64)."""
    value &= U64
    return value - (1 << 64) if value >> 63 else value


def s32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >> 31 else value


class FunctionEmitter:
    """Lines and temporaries of one LLVM function under construction."""

    __slots__ = ("checked", "dirty", "lines", "n", "pc", "start", "target", "vals")

    def __init__(self, checked: bool, start: int, target: bool = False) -> None:
        self.lines: list[str] = []
        #: register -> SSA operand holding its value in the current BPF block
        self.vals: dict[int, str] = {}
        #: registers whose alloca is behind ``vals``
        self.dirty: set[int] = set()
        self.n = 0
        self.checked = checked
        #: BPF index of the function's first instruction
        self.start = start
        #: BPF index of the instruction being translated (fault reports)
        self.pc = start
        #: code for the traced process: helpers are the in-target runtime's functions
        #: (``@ubpf_helper_<id>``), never Python trampolines (see ``vm.jit.target``)
        self.target = target

    def tmp(self) -> str:
        self.n += 1
        return f"%t{self.n}"

    def op(self, text: str) -> str:
        """Emit ``%tN = text`` and return ``%tN``."""
        self.n += 1
        name = f"%t{self.n}"
        self.lines.append(f"  {name} = {text}")
        return name

    def emit(self, text: str) -> None:
        self.lines.append(text)

    def get(self, reg: int) -> str:
        """The current value of a BPF register, as an i64 operand."""
        if reg == 10:
            return "%fp"
        value = self.vals.get(reg)
        if value is None:
            if reg > 10:
                raise InvalidInstructionError(self.pc, f"register r{reg} does not exist")
            value = self.vals[reg] = self.op(f"load i64, ptr %R{reg}")
        return value

    def put(self, reg: int, value: str) -> None:
        if reg >= 10:
            raise InvalidInstructionError(self.pc, f"r{reg} is not writable" if reg == 10
                                          else f"register r{reg} does not exist")
        self.vals[reg] = value
        self.dirty.add(reg)

    def flush(self) -> None:
        """Write changed registers back; call right before a branch to a BPF block."""
        vals, lines = self.vals, self.lines
        for reg in sorted(self.dirty):
            lines.append(f"  store i64 {vals[reg]}, ptr %R{reg}")
        self.dirty.clear()

    def label(self, name: str) -> None:
        """Start a BPF basic block: register values must be reloaded from the allocas."""
        self.lines.append(f"{name}:")
        self.vals.clear()
        self.dirty.clear()

    def get32(self, reg: int) -> str:
        return self.op(f"trunc i64 {self.get(reg)} to i32")

    def put32(self, reg: int, value: str) -> None:
        """Store a 32-bit result zero-extended, as every ALU32 operation does."""
        self.put(reg, self.op(f"zext i32 {value} to i64"))
