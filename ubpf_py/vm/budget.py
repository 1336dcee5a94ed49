"""The runaway bound of unverified programs (``--verifier warn|off``).

Why: a program the verifier did not accept may loop forever (``r0 += 1; goto -2``),
and a program holding the tracer holds the target and every signal with it.  Such
programs get a per-run budget; verified programs get none and pay nothing:

* interpreter: instructions executed (counted per basic block);
* JIT: backward jumps executed (each stands for at least one instruction; the count is
  one decrement in ``rt[SLOT_BUDGET]`` per loop iteration, only in code compiled for it).

Exceeding it raises ``VMFault`` naming the program and the instruction; the session then
ends like any program fault (the target is restored, exit code 1).
"""

from __future__ import annotations

from ubpf_py.errors import VMFault
from ubpf_py.isa.instruction import Instruction

#: default budget per run: the kernel verifier's own complexity limit (1M instructions)
DEFAULT_BUDGET = 1_000_000


def runaway_fault(program: str, budget: int, unit: str, pc: int, insns: list[Instruction]) -> VMFault:
    """The fault a run that used up its budget raises (instruction text included)."""
    fault = VMFault(f"runaway program '{program}' stopped: its budget of {budget} {unit} per run is "
                    f"used up (it was not verified; fix the loop or raise --max-insns)", pc)
    if 0 <= pc < len(insns):
        from ubpf_py.isa.disasm import format_instruction

        fault.instruction = format_instruction(insns[pc], pc)  # type: ignore[attr-defined]
        fault.args = (f"{fault.args[0]} ({fault.instruction})",)  # type: ignore[attr-defined]
    return fault
