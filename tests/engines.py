"""The execution engines every engine-level test runs against, and test environments.

``ENGINES`` maps an engine name to a factory ``(insns, env) -> Executable``.
Tests parametrize over it, so adding an engine here runs the whole conformance
suite (and the other engine tests) on it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ubpf_py.isa.instruction import Instruction
from ubpf_py.vm.env import ExecEnv, Executable, HitContext
from ubpf_py.vm.interpreter import Interpreter
from ubpf_py.vm.memory import HostBuffer, MemoryMap, Region

EngineFactory = Callable[[list[Instruction], ExecEnv], Executable]

ENGINES: dict[str, EngineFactory] = {
    "interp": lambda insns, env: Interpreter(insns, env),
}

# --- JIT engine registration (owned by the JIT work) -------------------------
from ubpf_py.vm.jit import JitProgram  # noqa: E402

ENGINES["jit"] = lambda insns, env: JitProgram(insns, env)
# -----------------------------------------------------------------------------


def conformance_helper_identity(r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
    """Helper 5 of the bpf_conformance/ubpf test runtime ("unwind"): returns its argument.

    The suite's call_unwind_fail and callx tests call it with r1 = -1, in which
    case ubpf continues normally; this runtime never unwinds on it.
    """
    return r1


@dataclass
class EngineEnv:
    """An ExecEnv plus the memory block the program was given."""

    env: ExecEnv
    mem: HostBuffer | None
    mem_addr: int
    mem_len: int


def make_env(mem: bytes = b"", *, writable: bool = True,
             helpers: dict[int, Callable[[int, int, int, int, int], int]] | None = None) -> EngineEnv:
    """An ExecEnv whose memory map holds ``mem`` as a region (r1 = its address, r2 = its length,
    the bpf_conformance calling convention); without ``mem`` r1 = r2 = 0."""
    memory = MemoryMap()
    env = ExecEnv(memory=memory, hit=HitContext())
    env.helpers[5] = conformance_helper_identity
    if helpers:
        env.helpers.update(helpers)
    buf = None
    addr = 0
    if mem:
        buf = HostBuffer(len(mem))
        buf.view[:] = mem
        memory.add(Region.of(buf, "test memory", writable=writable))
        addr = buf.addr
    return EngineEnv(env, buf, addr, len(mem))
