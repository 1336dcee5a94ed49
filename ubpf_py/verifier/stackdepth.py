"""Stack limits over the call graph, as the kernel's check_max_stack_depth.

Checked once the walk is done (it records each function's deepest stack use): every function
alone fits in 512 bytes, every static chain of calls and callback references fits in 512 bytes
together and is at most 8 frames deep.  The chain is walked statically, over every call in each
function whether the walk reached it or not, because the kernel does so: a program refused
for an unreachable deep chain must be refused here too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ubpf_py.isa import opcodes as op
from ubpf_py.isa.instruction import Instruction

MAX_STACK = 512
#: with no tail call, a function using at least this much stack gets a private stack (kernel 6.13+)
PRIV_STACK_MIN = 64
MAX_CALL_FRAMES = 8


@dataclass(frozen=True)
class StackDepthError:
    message: str
    pc: int
    hint: str


def _round16(v: int) -> int:
    return (v + 15) // 16 * 16


def static_calls(insns: list[Instruction], func_of: Callable[[int], int]) -> dict[int, list[int]]:
    """Function start -> functions it calls or takes as callbacks, in instruction order."""
    out: dict[int, list[int]] = {}
    for i, ins in enumerate(insns):
        if (ins.opcode == op.BPF_JMP | op.BPF_CALL and ins.src == op.BPF_PSEUDO_CALL) or \
                (ins.opcode == op.LDDW and ins.src == op.BPF_PSEUDO_FUNC):
            out.setdefault(func_of(i), []).append(i + ins.imm + 1)
    return out


def check_stack_depth(insns: list[Instruction], func_of: Callable[[int], int], stack_depth: dict[int, int],
                      has_tail_call: bool) -> StackDepthError | None:
    """The first limit broken (None: all hold).  ``stack_depth``: function start -> bytes used."""
    depth = {k: _round16(v) for k, v in stack_depth.items()}
    priv_ok = not has_tail_call
    for start, d in depth.items():
        if d > MAX_STACK:
            return StackDepthError(f"stack size of subprog at insn {start} is {d}. Too large", start, "")

    graph = static_calls(insns, func_of)
    seen: set[tuple[int, int, int]] = set()

    def walk(sub: int, acc: int, frame: int) -> StackDepthError | None:
        if frame >= MAX_CALL_FRAMES:
            return StackDepthError(f"the call stack of {frame} frames is too deep !", sub,
                                   "BPF allows 8 nested function frames; is a function recursive?")
        d = depth.get(sub, 0)
        if not (priv_ok and d >= PRIV_STACK_MIN):
            acc += d
            if acc > MAX_STACK:
                return StackDepthError(f"combined stack size of {frame + 1} calls is {acc}. Too large", sub,
                                       "the functions on this call chain use more than 512 bytes of stack together")
        key = (sub, frame, acc)
        if key in seen:
            return None
        seen.add(key)
        for callee in graph.get(sub, ()):
            f = walk(callee, acc, frame + 1)
            if f:
                return f
        return None

    return walk(0, 0, 0)
