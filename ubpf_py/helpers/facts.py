"""Which per-hit facts a program reads, so the probe engine reads only those, exactly.

The kernel answers ``bpf_get_smp_processor_id``, ``bpf_get_current_uid_gid`` and
``bpf_get_current_comm`` from the running thread at that moment.  From a ptrace
tracer each of these is a /proc read per hit (``probe.hits``: the stat file for the
CPU and the thread name, the status file for credentials), so the engine reads a
fact only when some attached program can observe it:

* ``cpu``: helper 8, ``bpf_perf_event_output`` (BPF_F_CURRENT_CPU picks the CPU's
  buffer), and any use of a per-CPU map (lookups return this CPU's copy);
* ``ids``: helper 15 (uid/gid), the task helpers (the task's cred);
* ``comm``: helper 16 and the task helpers.
"""

from __future__ import annotations

from collections.abc import Iterable

from ubpf_py.isa.opcodes import BPF_CALL, BPF_CALL_HELPER, BPF_JMP

_HELPER_FACTS = {8: {"cpu"}, 25: {"cpu"}, 15: {"ids"}, 16: {"comm"}, 35: {"comm"}, 158: {"comm"}}
#: PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH
_PERCPU_MAPS = {5, 6, 10}
_LDDW = 0x18
_MAP_SRCS = {1, 2, 5, 6}     # BPF_PSEUDO_MAP_FD/_VALUE and the spec-level MAP_IDX/_VALUE


def facts_needed(programs: Iterable, maps: list) -> set[str]:
    """The facts any of ``programs`` (spec-level ProgramSpecs) reads; ``maps`` is ObjectSpec.maps."""
    need: set[str] = set()
    call = BPF_JMP | BPF_CALL
    for prog in programs:
        for insn in prog.instructions:
            if insn.opcode == call and insn.src == BPF_CALL_HELPER:
                need |= _HELPER_FACTS.get(insn.imm, set())
            elif (insn.opcode == _LDDW and insn.src in _MAP_SRCS and 0 <= insn.imm < len(maps)
                  and maps[insn.imm].type in _PERCPU_MAPS):
                need.add("cpu")
    return need
