"""Engine semantics beyond the conformance suite: faults, frames, calls, callbacks,
tail calls and arithmetic edge cases.  Engine-agnostic tests run on every engine
in ``ENGINES``; interpreter-only options (budget, unchecked memory) test the
interpreter directly."""

from __future__ import annotations

import pytest
from engines import ENGINES, make_env
from hypothesis import given, settings
from hypothesis import strategies as st

from ubpf_py.errors import HelperError, NotSupportedError, VMFault
from ubpf_py.isa import opcodes as op
from ubpf_py.isa.asm import assemble
from ubpf_py.isa.instruction import Instruction
from ubpf_py.vm import interp_ops
from ubpf_py.vm.env import ExecEnv
from ubpf_py.vm.interpreter import FUNC_PTR_BASE, Interpreter
from ubpf_py.vm.memory import HostBuffer, Region

M64 = (1 << 64) - 1
ENGINE_NAMES = sorted(ENGINES)


def run(engine: str, text: str | list[Instruction], mem: bytes = b"", env_setup=None, **regs: int) -> int:
    te = make_env(mem)
    if env_setup:
        env_setup(te.env)
    insns = assemble(text) if isinstance(text, str) else text
    prog = ENGINES[engine](insns, te.env)
    return prog.run(regs.get("r1", te.mem_addr), regs.get("r2", te.mem_len))


# --- arithmetic edge cases ---------------------------------------------------------

ARITH = [
    ("mov %r0, 7\nmov %r1, 0\ndiv %r0, %r1\nexit", 0),
    ("mov %r0, 7\nmov %r1, 0\nmod %r0, %r1\nexit", 7),
    ("lddw %r0, 0x100000007\nmov %r1, 0\nmod32 %r0, %r1\nexit", 7),               # zero-extends
    ("lddw %r0, 0x100000007\nmov %r1, 0\ndiv32 %r0, %r1\nexit", 0),
    ("lddw %r0, 0x8000000000000000\nsdiv %r0, -1\nexit", 1 << 63),                 # INT_MIN / -1
    ("lddw %r0, 0x8000000000000000\nsmod %r0, -1\nexit", 0),
    ("mov32 %r0, 0x80000000\nsdiv32 %r0, -1\nexit", 0x80000000),
    ("mov %r0, -7\nsdiv %r0, 2\nexit", (-3) & M64),                                  # truncates
    ("mov %r0, -7\nsmod %r0, 2\nexit", (-1) & M64),                                  # sign of dividend
    ("mov %r0, 7\nsmod %r0, -2\nexit", 1),
    ("mov %r0, -7\nmov %r1, 0\nsmod32 %r0, %r1\nexit", 0xFFFFFFF9),
    ("mov %r0, -7\nsdiv32 %r0, 0\nexit", 0),
    ("mov %r0, 1\nlsh %r0, 65\nexit", 2),                                            # count masked
    ("mov32 %r0, 1\nlsh32 %r0, 33\nexit", 2),
    ("mov %r0, -16\narsh32 %r0, 2\nexit", 0xFFFFFFFC),
    ("mov %r0, -1\nadd32 %r0, 1\nexit", 0),
    ("mov %r0, -1\nmov32 %r0, %r0\nexit", 0xFFFFFFFF),
    ("mov %r0, 0x1234\nbe16 %r0\nexit", 0x3412),
    ("lddw %r0, 0x1122334455667788\nle32 %r0\nexit", 0x55667788),
    ("lddw %r0, 0x1122334455667788\nbswap64 %r0\nexit", 0x8877665544332211),
    ("mov %r0, 0x80\nmovsx864 %r0, %r0\nexit", (-128) & M64),
    ("mov %r0, 0x80\nmovsx832 %r0, %r0\nexit", 0xFFFFFF80),
    ("mov %r0, -1\nneg32 %r0\nexit", 1),
    ("mov %r0, 5\njsgt %r0, -1, +1\nmov %r0, 0\nexit", 5),
    ("mov %r0, -1\njgt %r0, 5, +1\nmov %r0, 0\nexit", M64),
    ("lddw %r0, 0x100000000\njeq32 %r0, 0, +1\nmov %r0, 0\nexit", 1 << 32),
]


@pytest.mark.parametrize("engine", ENGINE_NAMES)
@pytest.mark.parametrize(("text", "expected"), ARITH, ids=[t.replace("\n", "; ") for t, _ in ARITH])
def test_arithmetic(engine: str, text: str, expected: int) -> None:
    assert run(engine, text) == expected


# --- memory ----------------------------------------------------------------------

@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_out_of_bounds_read_faults_with_pc(engine: str) -> None:
    with pytest.raises(VMFault) as info:
        run(engine, "mov %r0, 0\nldxw %r0, [%r1+2]\nexit", mem=b"\x01\x02\x03\x04")
    assert info.value.pc == 1
    assert "outside every memory region" in str(info.value)


def test_fault_message_shows_the_instruction() -> None:
    te = make_env(b"\x01\x02\x03\x04")
    prog = Interpreter(assemble("mov %r0, 0\nldxw %r0, [%r1+2]\nexit"), te.env)
    with pytest.raises(VMFault) as info:
        prog.run(te.mem_addr)
    assert str(info.value).startswith("program fault at instruction 1: read of 4 bytes")
    assert str(info.value).endswith("(r0 = *(u32 *)(r1 + 2))")


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_null_and_wild_pointers_fault(engine: str) -> None:
    with pytest.raises(VMFault) as info:
        run(engine, "mov %r1, 0\nmov %r2, 1\nstxb [%r1+0], %r2\nexit")
    assert info.value.pc == 2
    with pytest.raises(VMFault):
        run(engine, "lddw %r1, 0xdeadbeef000\nldxdw %r0, [%r1+0]\nexit")


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_stack_bounds(engine: str) -> None:
    assert run(engine, "stdw [%r10-512], 9\nldxdw %r0, [%r10-512]\nexit") == 9
    with pytest.raises(VMFault) as info:
        run(engine, "stdw [%r10+0], 9\nexit")
    assert info.value.pc == 0


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_read_only_region_rejects_writes_and_atomics(engine: str) -> None:
    def setup(env: ExecEnv) -> None:
        buf = HostBuffer(8)
        buf.view[:] = (41).to_bytes(8, "little")
        env.memory.add(Region.of(buf, ".rodata", writable=False))
        env.helpers[100] = lambda *a: buf.addr
        setup.buf = buf  # type: ignore[attr-defined]

    assert run(engine, "call 100\nldxdw %r0, [%r0+0]\nexit", env_setup=setup) == 41
    with pytest.raises(VMFault, match="read-only"):
        run(engine, "call 100\nstdw [%r0+0], 1\nexit", env_setup=setup)
    with pytest.raises(VMFault, match="read-only"):
        run(engine, "call 100\nmov %r1, 1\nlock add [%r0+0], %r1\nexit", env_setup=setup)


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_atomics_on_memory(engine: str) -> None:
    text = """
        stdw [%r10-8], 10
        mov %r1, 5
        lock fetch add [%r10-8], %r1     # r1 = 10, mem = 15
        mov %r0, 15
        lock cmpxchg [%r10-8], %r1       # mem == r0 -> mem = 10, r0 = 15
        ldxdw %r2, [%r10-8]
        lsh %r0, 8
        or %r0, %r2
        mov %r3, 0xff
        lock xchg32 [%r10-8], %r3        # r3 = 10
        lsh %r0, 8
        or %r0, %r3
        exit
    """
    assert run(engine, text) == (15 << 16) | (10 << 8) | 10


# --- calls ------------------------------------------------------------------------

def _nested_calls(depth: int) -> str:
    """main calls f1 calls f2 ... f<depth>; each adds 1 to its argument r1."""
    lines = ["mov %r1, 0", "call local f1", "exit"]
    for i in range(1, depth + 1):
        lines += [f"f{i}:", "add %r1, 1", "stdw [%r10-8], 1"]
        lines += [f"call local f{i + 1}"] if i < depth else ["mov %r0, %r1"]
        lines.append("exit")
    return "\n".join(lines)


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_call_depth_limit(engine: str) -> None:
    assert run(engine, _nested_calls(7)) == 7  # main + 7 frames = 8
    with pytest.raises(VMFault, match="call depth") as info:
        run(engine, _nested_calls(8))
    assert info.value.pc is not None


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_frames_are_separate_and_callee_saved_registers_restored(engine: str) -> None:
    text = """
        stdw [%r10-8], 111
        mov %r6, 6
        mov %r1, %r10
        call local f
        ldxdw %r2, [%r10-8]
        jne %r2, 111, bad
        jne %r6, 6, bad
        exit
    bad:
        mov %r0, -1
        exit
    f:
        stdw [%r10-8], 222         # own frame: does not clobber the caller's slot
        ldxdw %r3, [%r1-8]         # the caller's frame through a pointer
        mov %r6, 0
        mov %r0, %r1
        sub %r0, %r10              # frame distance
        add %r0, %r3
        exit
    """
    assert run(engine, text) == 512 + 111


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_helpers_and_missing_helper(engine: str) -> None:
    def setup(env: ExecEnv) -> None:
        env.helpers[1] = lambda a, b, c, d, e: a + b + c + d + e
        env.helpers[2] = lambda *a: -1

    text = "mov %r1, 1\nmov %r2, 2\nmov %r3, 3\nmov %r4, 4\nmov %r5, 5\ncall 1\nexit"
    assert run(engine, text, env_setup=setup) == 15
    assert run(engine, "call 2\nexit", env_setup=setup) == M64
    with pytest.raises(HelperError, match="helper 77"):
        run(engine, "call 77\nexit")


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_helper_fault_gets_pc(engine: str) -> None:
    def setup(env: ExecEnv) -> None:
        env.helpers[3] = lambda a, *rest: env.memory.load(a, 8)

    with pytest.raises(VMFault) as info:
        run(engine, "mov %r1, 16\ncall 3\nexit", env_setup=setup)
    assert info.value.pc == 1


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_callback_through_invoke_callback(engine: str) -> None:
    """A bpf_loop-like helper: calls the callback n times with (i, ctx)."""
    def setup(env: ExecEnv) -> None:
        def loop(n: int, fn: int, ctx: int, flags: int, _: int) -> int:
            assert env.invoke_callback is not None
            for i in range(n):
                if env.invoke_callback(fn, i, ctx, 0, 0, 0):
                    return i + 1
            return n
        env.helpers[181] = loop

    text = """
        stdw [%r10-8], 0
        mov %r1, 10
        lddw %r2, 0
        mov %r3, %r10
        add %r3, -8
        call 181
        ldxdw %r1, [%r10-8]
        lsh %r0, 16
        or %r0, %r1
        exit
    cb:                            # sum += i; stop after i == 4
        ldxdw %r3, [%r2+0]
        add %r3, %r1
        stxdw [%r2+0], %r3
        stdw [%r10-8], 7           # its own frame
        mov %r0, 0
        jne %r1, 4, +1
        mov %r0, 1
        exit
    """
    insns = assemble(text)
    # point the lddw at the callback: lddw src=4 with a relative imm
    cb_index = 11
    insns[2] = Instruction(op.LDDW, 2, op.BPF_PSEUDO_FUNC, 0, cb_index - 3, 0)
    assert run(engine, insns, env_setup=setup) == (5 << 16) | (0 + 1 + 2 + 3 + 4)


def test_invoke_callback_rejects_bad_pointer() -> None:
    te = make_env()
    prog = Interpreter(assemble("mov %r0, 0\nexit"), te.env)
    with pytest.raises(VMFault, match="not a callback"):
        prog.invoke_callback(FUNC_PTR_BASE + 100)


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_callx_to_function_pointer(engine: str) -> None:
    insns = assemble("lddw %r2, 0\ncall %r2\nadd %r0, 1\nexit\nmov %r0, 41\nexit")
    insns[0] = Instruction(op.LDDW, 2, op.BPF_PSEUDO_FUNC, 0, 4, 0)  # -> index 5
    assert run(engine, insns) == 42


# --- tail calls -------------------------------------------------------------------

TAIL_PROG = """
    mov %r6, %r1
    lddw %r2, 0xabc          # "map handle"
    mov %r3, {index}
    call 12
    mov %r0, {fallthrough}   # reached only when the tail call fails
    exit
"""


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_tail_call_protocol(engine: str) -> None:
    te = make_env(b"\x2a" + b"\x00" * 7)
    env = te.env
    target = ENGINES[engine](assemble("ldxdw %r0, [%r1+0]\nadd %r0, 1000\nexit"), env)
    calls: list[tuple[int, int]] = []

    def resolve(handle: int, index: int):
        calls.append((handle, index))
        return target if index == 1 else None

    env.resolve_tail_call = resolve
    hit = ENGINES[engine](assemble(TAIL_PROG.format(index=1, fallthrough=7)), env)
    miss = ENGINES[engine](assemble(TAIL_PROG.format(index=2, fallthrough=7)), env)
    assert hit.run(te.mem_addr) == 1042           # result of the target with the original ctx
    assert env.tail_call_count == 0                # reset after a top-level run
    assert miss.run(te.mem_addr) == 7
    assert calls == [(0xABC, 1), (0xABC, 2)]
    env.resolve_tail_call = None
    assert hit.run(te.mem_addr) == 7               # no resolver: the call fails


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_tail_call_chain_limit(engine: str) -> None:
    """A program tail-calling itself: 33 tail calls succeed, the 34th fails."""
    te = make_env()
    env = te.env
    text = """
        ldxdw %r0, [%r10-8]        # unused read keeps the frame live
        mov %r2, 0
        mov %r3, 0
        call 12
        mov %r0, 1000              # the tail call failed: report it
        exit
    """
    depth = {"n": 0}
    prog_holder: list = []

    def resolve(handle: int, index: int):
        depth["n"] += 1
        return prog_holder[0]

    env.resolve_tail_call = resolve
    prog = ENGINES[engine](assemble("stdw [%r10-8], 0\n" + text), env)
    prog_holder.append(prog)
    assert prog.run(0) == 1000
    assert depth["n"] == op.MAX_TAIL_CALLS + 1
    assert env.tail_call_count == 0


# --- load-time refusals and interpreter options ---------------------------------------

@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_kfunc_and_unresolved_lddw_not_supported(engine: str) -> None:
    te = make_env()
    with pytest.raises(NotSupportedError, match="kfunc"):
        ENGINES[engine](assemble("call runtime 5\nexit"), te.env)
    with pytest.raises(NotSupportedError, match="map index"):
        ENGINES[engine]([Instruction(op.LDDW, 1, op.BPF_PSEUDO_MAP_IDX, 0, 0), Instruction(0),
                         Instruction(op.BPF_JMP | op.BPF_EXIT)], te.env)


def test_instruction_budget() -> None:
    te = make_env()
    loop = Interpreter(assemble("mov %r0, 0\nloop:\nadd %r0, 1\nja loop"), te.env, max_instructions=1000)
    with pytest.raises(VMFault, match="budget of 1000"):
        loop.run(0)
    ok = Interpreter(assemble("mov %r0, 0\nloop:\nadd %r0, 1\njlt %r0, 10, loop\nexit"), te.env,
                     max_instructions=1000)
    assert ok.run(0) == 10
    assert ok.run(0) == 10  # the budget is per run


def test_falling_off_the_end_faults() -> None:
    te = make_env()
    prog = Interpreter(assemble("mov %r0, 1\njeq %r0, 1, +1\nexit\nmov %r0, 2"), te.env)
    with pytest.raises(VMFault, match="past the last instruction"):
        prog.run(0)
    prog = Interpreter(assemble("mov %r0, 0\njeq %r0, 1, -2"), te.env)  # conditional fall-through
    with pytest.raises(VMFault, match="past the last instruction"):
        prog.run(0)


def test_unchecked_memory_mode_runs_the_same_program() -> None:
    te = make_env(bytes(range(16)))
    text = "ldxdw %r0, [%r1+8]\nstdw [%r10-8], 3\nldxdw %r2, [%r10-8]\nadd %r0, %r2\nexit"
    checked = Interpreter(assemble(text), te.env).run(te.mem_addr)
    unchecked = Interpreter(assemble(text), te.env, check_memory=False).run(te.mem_addr)
    assert checked == unchecked == int.from_bytes(bytes(range(8, 16)), "little") + 3


def test_close_unregisters_the_stack() -> None:
    te = make_env()
    before = len(te.env.memory.regions)
    prog = Interpreter(assemble("mov %r0, 0\nexit"), te.env)
    assert len(te.env.memory.regions) == before + 1
    prog.close()
    assert len(te.env.memory.regions) == before


# --- signed division primitives against a reference definition ----------------------

def _trunc_div(a: int, b: int) -> int:
    q = abs(a) // abs(b)
    return q if (a < 0) == (b < 0) else -q


@given(st.integers(-(1 << 63), (1 << 63) - 1), st.integers(-(1 << 63), (1 << 63) - 1))
@settings(max_examples=300, deadline=None)
def test_signed_division_primitives(a: int, b: int) -> None:
    ua, ub = a & M64, b & M64
    if b == 0:
        assert interp_ops.sdiv64(ua, ub) == 0 and interp_ops.smod64(ua, ub) == ua
    else:
        q = _trunc_div(a, b)
        assert interp_ops.sdiv64(ua, ub) == q & M64
        assert interp_ops.smod64(ua, ub) == (a - b * q) & M64
    a32, b32 = ((ua & 0xFFFFFFFF) ^ (1 << 31)) - (1 << 31), ((ub & 0xFFFFFFFF) ^ (1 << 31)) - (1 << 31)
    if b32 == 0:
        assert interp_ops.sdiv32(ua, ub) == 0 and interp_ops.smod32(ua, ub) == ua & 0xFFFFFFFF
    else:
        q32 = _trunc_div(a32, b32)
        assert interp_ops.sdiv32(ua, ub) == q32 & 0xFFFFFFFF
        assert interp_ops.smod32(ua, ub) == (a32 - b32 * q32) & 0xFFFFFFFF
