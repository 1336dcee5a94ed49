"""Stack limits over the call graph, as the kernel's check_max_stack_depth.

Checked once the walk is done (it records each function's deepest stack use): every function
alone fits in 512 bytes, every static chain of calls and callback references fits in 512 bytes
together and is at most 8 frames deep, and the callers of a subprogram that tail calls use less
than 256 bytes.  The chain is walked statically, over every call in each
function whether the walk reached it or not, because the kernel does so: a program refused
for an unreachable deep chain must be refused here too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ubpf_py.isa import opcodes as op
from ubpf_py.isa.instruction import Instruction

MAX_STACK = 512
MAX_CALL_FRAMES = 8
#: callers of a subprogram that tail calls may use less than this much stack together
TAIL_CALL_STACK_LIMIT = 256


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


def check_stack_depth(insns: list[Instruction], func_of: Callable[[int], int],
                      stack_depth: dict[int, int]) -> StackDepthError | None:
    """The first limit broken (None: all hold).  ``stack_depth``: function start -> bytes used.

    Every frame counts toward the combined 512 bytes.  Kernels from 6.13 can give a kprobe
    program's large frames private stacks when the JIT supports it; the kernel this project is
    checked against (6.18, CI) does not for the programs we load -- main 504 + callee 1 byte is
    "combined stack size of 2 calls is 528" there -- and counting them is the safe side."""
    depth = {k: _round16(v) for k, v in stack_depth.items()}
    for start, d in depth.items():
        if d > MAX_STACK:
            return StackDepthError(f"stack size of subprog at insn {start} is {d}. Too large", start, "")

    graph = static_calls(insns, func_of)
    tail_callers = {func_of(i) for i, ins in enumerate(insns)
                    if ins.opcode == op.BPF_JMP | op.BPF_CALL and ins.src == op.BPF_CALL_HELPER and ins.imm == 12}
    seen: set[tuple[int, int, int]] = set()

    def walk(sub: int, acc: int, frame: int) -> StackDepthError | None:
        if frame >= MAX_CALL_FRAMES:
            return StackDepthError(f"the call stack of {frame} frames is too deep !", sub,
                                   "BPF allows 8 nested function frames; is a function recursive?")
        if sub and sub in tail_callers and acc >= TAIL_CALL_STACK_LIMIT:
            # a tail call replaces only the innermost frame: the callers' stacks stay, and the
            # chain of tail calls could otherwise grow the kernel stack past its size
            return StackDepthError(f"tail_calls are not allowed when call stack of previous frames is {acc} bytes. "
                                   "Too large", sub, "the callers of a function that tail calls must use less than "
                                   "256 bytes of stack together")
        acc += depth.get(sub, 0)
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
