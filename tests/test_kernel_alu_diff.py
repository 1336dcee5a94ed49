"""The kernel is the oracle: random ALU/JMP programs give the same r0 in the kernel
(BPF_PROG_TEST_RUN), in the JIT and in the interpreter.

Programs come from the differential generator in ALU/JMP-only mode (every ALU32/
ALU64 operation incl. sdiv/smod/movsx/bswap, JMP/JMP32 with every condition,
bounded loops).  Socket-filter test runs return only 32 bits of r0, so every
program is loaded twice: as generated (low half) and with ``r0 >>= 32`` in front
of the exit (high half).  Skips with the reason when not root or the kernel
refuses BPF; a program the verifier refuses is counted and reported, and most
programs must be accepted for the test to mean anything.
"""

from __future__ import annotations

import os
import random

import pytest
from engines import make_env
from test_differential import random_program

from ubpf_py.errors import KernelBackendError
from ubpf_py.isa import opcodes as op
from ubpf_py.isa.instruction import Instruction
from ubpf_py.vm.interpreter import Interpreter
from ubpf_py.vm.jit import CODE_CACHE, JitProgram

kprog = pytest.importorskip("ubpf_py.kernel.prog")
ksys = pytest.importorskip("ubpf_py.kernel.syscall")

pytestmark = pytest.mark.kernel

PROGRAMS = 300
#: a socket filter's test run needs at least an Ethernet header of packet data
PACKET = bytes(64)


def _high_half(insns: list[Instruction]) -> list[Instruction]:
    """Same program returning r0 >> 32: the shift takes the exit's index, so every jump
    to the exit now lands on the shift."""
    assert insns[-1].opcode == op.BPF_JMP | op.BPF_EXIT
    return [*insns[:-1], Instruction(op.BPF_ALU64 | op.BPF_RSH, 0, 0, 0, 32), insns[-1]]


def _kernel_r0(insns: list[Instruction]) -> int | None:
    """r0 (low 32 bits) from the kernel, or None if the verifier refused the program."""
    try:
        fd = kprog.prog_load(insns, kprog.SOCKET_FILTER)
    except KernelBackendError as exc:
        if exc.errno in (1, 13):   # EPERM/EACCES: not a verdict on this program
            pytest.skip(f"kernel refuses BPF_PROG_LOAD: {exc}")
        return None
    try:
        return kprog.prog_test_run(fd, data_in=PACKET).retval & 0xFFFFFFFF
    finally:
        os.close(fd)


def _ours(insns: list[Instruction]) -> tuple[int, int]:
    te = make_env()
    interp = Interpreter(insns, te.env)
    jit = JitProgram(insns, te.env)
    try:
        return interp.run(0), jit.run(0)
    finally:
        interp.close()
        jit.close()


@pytest.mark.parametrize("chunk", range(3))
def test_random_alu_programs_match_kernel(chunk: int) -> None:
    reason = ksys.kernel_bpf_skip_reason()
    if reason:
        pytest.skip(reason)
    rng = random.Random(0x5EED + chunk)
    programs = [random_program(rng, segments=rng.randint(2, 6), seg_len=6, memory=False, kernel=True)
                for _ in range(PROGRAMS // 3)]
    variants = [v for p in programs for v in (p, _high_half(p))]
    CODE_CACHE.precompile(variants, True, "O2")
    refused = 0
    for i, insns in enumerate(programs):
        lo = _kernel_r0(insns)
        hi = _kernel_r0(_high_half(insns))
        if lo is None or hi is None:
            refused += 1
            continue
        interp_r0, jit_r0 = _ours(insns)
        kernel_r0 = lo | hi << 32
        assert interp_r0 == kernel_r0, f"program {i}: interpreter 0x{interp_r0:x} != kernel 0x{kernel_r0:x}"
        assert jit_r0 == kernel_r0, f"program {i}: jit 0x{jit_r0:x} != kernel 0x{kernel_r0:x}"
    assert refused <= len(programs) // 10, f"kernel verifier refused {refused} of {len(programs)} programs"
