"""Engine behaviour written to kill mutants that survived ``benchmarks/mutation_score.py``
(named in each test's docstring: ``path#index`` from the earlier hand-written mutator,
``path:operator#occurrence`` from cosmic-ray)."""

from __future__ import annotations

import pytest
from engines import make_env

from ubpf_py.errors import VMFault
from ubpf_py.isa.asm import assemble
from ubpf_py.vm.interpreter import Interpreter


def test_instruction_budget_is_per_run_not_per_program() -> None:
    """Each run may use most of the budget; runs after the first start from zero again
    (interpreter.py#28: the nesting count never returned to zero, so the count carried over)."""
    te = make_env()
    prog = Interpreter(assemble("mov %r0, 0\nloop:\nadd %r0, 1\njlt %r0, 200, loop\nexit"), te.env,
                       max_instructions=500)
    assert [prog.run(0) for _ in range(3)] == [200, 200, 200]



@pytest.mark.parametrize("text, last", [("mov %r0, 1\njeq %r0, 1, +1\nexit\nmov %r0, 2", 3),
                                        ("mov %r0, 1\njeq %r0, 2, -2", 1)])
def test_running_past_the_end_names_the_last_instruction(text: str, last: int) -> None:
    """An unverified program that runs past its end faults at its last instruction, the one that
    ran: a plain one, or a conditional jump not taken (interpreter.py:ReplaceBinaryOperator_Sub_Pow#0:
    one past the end was named for the jump's fall-through)."""
    te = make_env()
    prog = Interpreter(assemble(text), te.env)
    with pytest.raises(VMFault, match=rf"instruction {last}: execution ran past the last instruction"):
        prog.run(0)
