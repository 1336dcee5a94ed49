"""The reference engine: a checked BPF interpreter in pure Python.

Semantics are the kernel's (RFC 9669 + Linux): 32-bit ALU ops zero-extend,
shift counts are masked, x/0 = 0, x%0 = x (32-bit: zero-extended), INT_MIN/-1
wraps, BPF-to-BPF calls get their own 512-byte frame (at most 8 frames),
``may_goto`` falls through while its frame's loop budget lasts (the kernel's
hidden per-call counter: ``BPF_MAX_LOOPS`` decrements, then the jump is taken),
helpers come from ``env.helpers``, helper 12 is the tail call protocol of
docs/ARCHITECTURE.md and callbacks run through ``env.invoke_callback``.

Every load/store/atomic is checked against ``env.memory``; a bad access raises
VMFault carrying the instruction index.  The program is translated once into
one Python function per basic block (``interp_codegen``), which is what makes
a pure-Python engine fast enough to be useful (see benchmarks/interp_speed.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ubpf_py.errors import HelperError, NotSupportedError, VMFault
from ubpf_py.isa import opcodes as op
from ubpf_py.isa.disasm import format_instruction
from ubpf_py.isa.instruction import Instruction
from ubpf_py.isa.validate import validate
from ubpf_py.vm import interp_ops
from ubpf_py.vm.budget import runaway_fault
from ubpf_py.vm.env import ExecEnv
from ubpf_py.vm.interp_codegen import generate
from ubpf_py.vm.memory import HostBuffer, Region

M64 = 0xFFFFFFFFFFFFFFFF
M32 = 0xFFFFFFFF

#: lddw src=4 (BPF_PSEUDO_FUNC) loads FUNC_PTR_BASE + target pc; invoke_callback and
#: callx accept these values back.  The range is far from any user-space address.
FUNC_PTR_BASE = 0xFFFFFFFF00000000

_PSEUDO_NAMES = {op.BPF_PSEUDO_MAP_FD: "map fd", op.BPF_PSEUDO_MAP_VALUE: "map value",
                 op.BPF_PSEUDO_BTF_ID: "BTF id", op.BPF_PSEUDO_MAP_IDX: "map index",
                 op.BPF_PSEUDO_MAP_IDX_VALUE: "map index value"}


class Interpreter:
    """A loaded program on the interpreter; implements ``vm.env.Executable``.

    ``max_instructions`` (optional) bounds one ``run``: the count is kept per
    basic block, so the fault fires at the first block that crosses the limit.
    """

    def __init__(self, insns: list[Instruction], env: ExecEnv, *, check_memory: bool = True,
                 max_instructions: int | None = None, name: str = "prog",
                 loop_budget: int = op.BPF_MAX_LOOPS) -> None:
        validate(insns)
        _check_loadable(insns)
        self.insns = list(insns)
        self.env = env
        self.name = name
        self.check_memory = check_memory
        self.max_instructions = max_instructions
        self.stack_buffer = HostBuffer(op.STACK_SIZE * op.MAX_CALL_DEPTH)
        self.stack_region = Region.of(self.stack_buffer, f"stack of {name}")
        self.stack_top = self.stack_buffer.addr + self.stack_buffer.size
        self._frames: list[tuple[int, int, int, int, int, int]] = []
        #: may_goto budget of each frame (index = frame depth), reset when the frame starts;
        #: ``loop_budget`` is the kernel's BPF_MAX_LOOPS (smaller only to test exhaustion)
        self.loop_budget = loop_budget
        self._loops = [loop_budget] * (op.MAX_CALL_DEPTH + 1)
        self._ctx = 0
        self._running = 0
        self._count = 0
        self._mem = interp_ops.MemoryAccess(env.memory, self.stack_region, check_memory)
        self.source, starts, self._counts = generate(
            self.insns, FUNC_PTR_BASE, (self.stack_region.start, self.stack_region.end))
        namespace = self._namespace()
        exec(compile(self.source, f"<bpf {name}>", "exec"), namespace)
        # one extra entry: falling through (or returning) to index n faults cleanly
        self._blocks: list[Callable[[list[int]], int] | None] = [None] * (len(self.insns) + 1)
        for s in starts:
            self._blocks[s] = namespace[f"B{s}"]
        self._blocks[-1] = lambda R: self._fall_off(len(self.insns) - 1)
        self._costs = [self._counts.get(i, 0) for i in range(len(self.insns) + 1)]
        env.memory.add(self.stack_region)  # last: a failed construction leaves env untouched

    def close(self) -> None:
        """Unregister the stack region (the program cannot run afterwards)."""
        self.env.memory.remove(self.stack_region)

    # --- the names the generated code uses --------------------------------
    def _namespace(self) -> dict[str, Any]:
        mem = self._mem
        ns: dict[str, Any] = {
            # (M64, M32, S64 and S32 are inlined as literals by the code generator)
            "SDIV64": interp_ops.sdiv64, "SMOD64": interp_ops.smod64,
            "SDIV32": interp_ops.sdiv32, "SMOD32": interp_ops.smod32,
            "BSWAP32": interp_ops.bswap32, "BSWAP64": interp_ops.bswap64,
            "ATOMIC": mem.atomic, "CMPXCHG": mem.cmpxchg,
            "HELPER": self._helper, "CALL": self._call, "CALLX": self._callx,
            "TAIL": self._tail_call, "FALLOFF": self._fall_off, "MAYGOTO": self._may_goto,
        }
        for size in (1, 2, 4, 8):
            ns[f"LD{size}"] = mem.loads[size]
            ns[f"ST{size}"] = mem.stores[size]
            ns[f"UN{size}"] = interp_ops.STRUCTS[size].unpack_from
            ns[f"PK{size}"] = interp_ops.STRUCTS[size].pack_into
        ns["SV"] = self.stack_region.view
        for size, fmt in ((1, "B"), (2, "H"), (4, "I"), (8, "Q")):
            ns[f"SV{size}"] = self.stack_region.view.cast(fmt)
        return ns

    def _helper(self, helper_id: int, r1: int, r2: int, r3: int, r4: int, r5: int, pc: int) -> int:
        fn = self.env.helpers.get(helper_id)
        if fn is None:
            raise HelperError(f"helper {helper_id} is not available in this runtime "
                              f"(instruction {pc} of {self.name}); remove the call or provide the helper")
        try:
            return fn(r1, r2, r3, r4, r5) & M64
        except VMFault as e:
            if e.pc is None:
                raise VMFault(f"in helper {helper_id}: {e.reason}", pc) from e
            raise

    def _may_goto(self, R: list[int], taken: int, nxt: int) -> int:
        """The kernel's rewrite of may_goto: ``if budget == 0 goto taken; budget -= 1``."""
        depth = (self.stack_top - R[10]) // op.STACK_SIZE
        left = self._loops[depth]
        if left == 0:
            return taken
        self._loops[depth] = left - 1
        return nxt

    def _call(self, R: list[int], ret: int, target: int, pc: int) -> int:
        frames = self._frames
        if len(frames) + 1 >= op.MAX_CALL_DEPTH:
            raise VMFault(f"call depth exceeds {op.MAX_CALL_DEPTH} frames", pc)
        frames.append((ret, R[6], R[7], R[8], R[9], R[10]))
        R[10] -= op.STACK_SIZE
        self._loops[len(frames)] = self.loop_budget
        return target

    def _callx(self, R: list[int], value: int, ret: int, pc: int) -> int:
        target = value - FUNC_PTR_BASE
        if 0 <= target < len(self.insns):
            if self._blocks[target] is None:  # not a block start, so not a function
                raise VMFault(f"callx target 0x{value:x} is not a function of {self.name}", pc)
            return self._call(R, ret, target, pc)
        if value < 1 << 31:  # bpf_conformance convention: a helper id in the register
            R[0] = self._helper(value, R[1], R[2], R[3], R[4], R[5], pc)
            return ret
        raise VMFault(f"callx target 0x{value:x} is neither a function pointer nor a helper id", pc)

    def _tail_call(self, R: list[int], pc: int) -> int:
        env = self.env
        resolver = env.resolve_tail_call
        target = resolver(R[2], R[3] & M32) if resolver is not None else None
        if target is None or env.tail_call_count >= op.MAX_TAIL_CALLS:
            return pc + 1
        env.tail_call_count += 1
        R[0] = target.run(self._ctx) & M64
        return -1

    def _fall_off(self, pc: int) -> int:
        raise VMFault(f"execution ran past the last instruction of {self.name}", pc)

    # --- running -------------------------------------------------------------
    def _loop(self, R: list[int], pc: int, base: int) -> int:
        blocks = self._blocks
        frames = self._frames
        limit = self.max_instructions
        if limit is None:
            while True:
                while pc >= 0:
                    pc = blocks[pc](R)  # type: ignore[misc]
                if len(frames) == base:
                    return R[0]
                pc, R[6], R[7], R[8], R[9], R[10] = frames.pop()
        costs = self._costs
        while True:
            while pc >= 0:
                self._count += costs[pc]
                if self._count > limit:
                    raise runaway_fault(self.name, limit, "instructions", pc, self.insns)
                pc = blocks[pc](R)  # type: ignore[misc]
            if len(frames) == base:
                return R[0]
            pc, R[6], R[7], R[8], R[9], R[10] = frames.pop()

    def run(self, r1: int, r2: int = 0, r3: int = 0, r4: int = 0, r5: int = 0) -> int:
        """Run from instruction 0 with r1..r5; returns r0 as an unsigned 64-bit int."""
        env = self.env
        top_level = env.tail_call_count == 0
        saved_callback = env.invoke_callback
        env.invoke_callback = self.invoke_callback
        frames = self._frames
        base = len(frames)  # > 0 only when re-entered (a tail call into this same program)
        if base >= op.MAX_CALL_DEPTH:
            raise VMFault(f"call depth exceeds {op.MAX_CALL_DEPTH} frames")
        saved_ctx = self._ctx
        if self._running == 0:
            self._ctx = r1 & M64
            self._count = 0
        self._running += 1
        R = [0, r1 & M64, r2 & M64, r3 & M64, r4 & M64, r5 & M64, 0, 0, 0, 0,
             self.stack_top - op.STACK_SIZE * base]
        self._loops[base] = self.loop_budget
        try:
            return self._loop(R, 0, base)
        except VMFault as e:
            self._annotate(e)
            raise
        finally:
            del frames[base:]
            self._running -= 1
            self._ctx = saved_ctx
            env.invoke_callback = saved_callback
            if top_level:
                env.tail_call_count = 0

    def _annotate(self, fault: VMFault) -> None:
        """Append the faulting instruction in objdump syntax, once (a fault from a
        tail-call target was already annotated by that program's run)."""
        pc = fault.pc
        if pc is None or getattr(fault, "instruction", None) or not 0 <= pc < len(self.insns):
            return
        fault.instruction = format_instruction(self.insns[pc], pc)  # type: ignore[attr-defined]
        fault.args = (f"{fault.args[0]} ({fault.instruction})",)  # type: ignore[attr-defined]

    def invoke_callback(self, fnptr: int, r1: int = 0, r2: int = 0, r3: int = 0, r4: int = 0,
                        r5: int = 0) -> int:
        """Run the BPF function ``fnptr`` (from lddw src=4) in a new frame; returns its r0.

        Helpers such as bpf_loop call this (through ``env.invoke_callback``)
        while the program is running.
        """
        target = fnptr - FUNC_PTR_BASE
        if not 0 <= target < len(self.insns) or self._blocks[target] is None:
            raise VMFault(f"0x{fnptr:x} is not a callback function of {self.name}")
        frames = self._frames
        if len(frames) + 1 >= op.MAX_CALL_DEPTH:
            raise VMFault(f"call depth exceeds {op.MAX_CALL_DEPTH} frames (in a callback)")
        frames.append((-1, 0, 0, 0, 0, 0))  # sentinel: the callback's frame
        base = len(frames)
        R = [0, r1 & M64, r2 & M64, r3 & M64, r4 & M64, r5 & M64, 0, 0, 0, 0,
             self.stack_top - op.STACK_SIZE * base]
        self._loops[base] = self.loop_budget
        try:
            return self._loop(R, target, base)
        finally:
            del frames[base - 1:]


def _check_loadable(insns: list[Instruction]) -> None:
    """Refuse what the engines cannot run: unresolved map/BTF lddw and kfunc calls."""
    for i, ins in enumerate(insns):
        if ins.opcode == op.LDDW and ins.src not in (0, op.BPF_PSEUDO_FUNC):
            raise NotSupportedError(f"unresolved lddw with {_PSEUDO_NAMES.get(ins.src, 'pseudo')} source "
                                    f"(src={ins.src}) at instruction {i}; load the program through the loader")
        if ins.opcode == op.BPF_JMP | op.BPF_CALL and ins.src == op.BPF_PSEUDO_KFUNC_CALL:
            raise NotSupportedError(f"kfunc calls (instruction {i}, btf id {ins.imm})")
