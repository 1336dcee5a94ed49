"""BPF helpers by kernel id, bound to one ``ExecEnv``.

``build_helper_table(env)`` returns ``{helper id: HelperFn}`` for every helper we
implement (closures over ``env``; call it once ``env.maps_by_addr`` holds the
object's maps, so storage those maps add later is followed).  Helper 12
(bpf_tail_call) is in ``SUPPORTED_HELPERS`` but not in the table: the engines
perform tail calls themselves through ``env.resolve_tail_call``.

``check_helpers(insns)`` is the load-time check: any call to a helper id we do
not provide raises ``HelperError`` naming it.
"""

from __future__ import annotations

from collections.abc import Iterable

from ubpf_py.errors import HelperError, UnknownHelperError
from ubpf_py.helpers import map_helpers, memory_helpers, printk, task_helpers
from ubpf_py.helpers.context import HelperContext
from ubpf_py.helpers.names import HELPER_NAMES
from ubpf_py.isa.opcodes import BPF_CALL, BPF_CALL_HELPER, BPF_JMP
from ubpf_py.vm.env import ExecEnv, HelperFn

BPF_FUNC_TAIL_CALL = 12

SUPPORTED_HELPERS: frozenset[int] = frozenset({
    1, 2, 3, 4, 5, 6, 7, 8, 12, 14, 15, 16, 17, 25, 27, 35, 36, 37, 45, 67, 80, 87, 88, 89, 93, 94, 109,
    112, 113, 114, 115, 118, 120, 125, 130, 131, 132, 133, 134, 148, 160, 164, 165, 173, 174, 191,
    141, 158, 175, 177, 181, 182,
})

#: helpers whose standard implementations the JIT may replace with native code
#: (``vm.jit.fastpath``): they carry ``ubpf_native = <kernel name>``
NATIVE_HELPERS: frozenset[int] = frozenset({1, 2, 5, 7, 8, 14, 15, 125, 130, 173, 174})


def build_helper_table(env: ExecEnv) -> dict[int, HelperFn]:
    """Every supported helper (except tail_call, which engines handle) bound to ``env``."""
    hc = HelperContext(env)
    table: dict[int, HelperFn] = {}
    for family in (map_helpers, memory_helpers, task_helpers, printk):
        family.bind(hc, table)
    for hid in NATIVE_HELPERS:   # the JIT may run these natively (vm.jit.fastpath)
        table[hid].ubpf_native = HELPER_NAMES[hid]
    missing = SUPPORTED_HELPERS - set(table) - {BPF_FUNC_TAIL_CALL}
    if missing:  # a family forgot one: fail loudly at load rather than at the first call
        raise HelperError(f"internal: helpers {sorted(missing)} are listed as supported but not bound")
    return table


def helper_name(helper_id: int) -> str:
    return HELPER_NAMES.get(helper_id, f"helper#{helper_id}")


def check_helpers(insns: Iterable, program: str = "") -> None:
    """Raise HelperError for the first call to a helper id ubpf-py does not provide."""
    call = BPF_JMP | BPF_CALL
    for pc, insn in enumerate(insns):
        if insn.opcode == call and insn.src == BPF_CALL_HELPER and insn.imm not in SUPPORTED_HELPERS:
            where = f" in program {program}" if program else ""
            raise UnknownHelperError(
                f"unknown helper #{insn.imm} ({helper_name(insn.imm)}) called at instruction {pc}{where}: "
                f"not supported by ubpf-py; use a supported helper or run with the kernel backend")


__all__ = ["HELPER_NAMES", "SUPPORTED_HELPERS", "build_helper_table", "check_helpers", "helper_name"]
