"""The llvmlite JIT: caching, memory checks, helpers, calls, callbacks, tail calls, errors.

Instruction semantics are covered by the conformance suite (tests/test_conformance.py
runs every file on the JIT) and by tests/test_differential.py; this file tests the
engine machinery around them.  Where behaviour is observable on the interpreter too,
the JIT result is compared with it.
"""

from __future__ import annotations

import pytest
from engines import make_env

from ubpf_py.errors import HelperError, InvalidInstructionError, NotSupportedError, VMFault
from ubpf_py.isa import opcodes as op
from ubpf_py.isa.asm import assemble
from ubpf_py.isa.instruction import Instruction
from ubpf_py.vm.env import ExecEnv, HitContext
from ubpf_py.vm.interpreter import FUNC_PTR_BASE, Interpreter
from ubpf_py.vm.jit import CODE_CACHE, JitProgram, compile_stats
from ubpf_py.vm.jit.backend import OPT_LEVELS
from ubpf_py.vm.memory import HostBuffer, MemoryMap, Region

M64 = (1 << 64) - 1


def _env() -> ExecEnv:
    return ExecEnv(MemoryMap(), HitContext())


def _lddw_func(dst: int, rel: int) -> list[Instruction]:
    """lddw dst, <function at pc + rel + 1> (BPF_PSEUDO_FUNC)."""
    return [Instruction(op.LDDW, dst, op.BPF_PSEUDO_FUNC, 0, rel), Instruction(0)]


# --- compilation cache ------------------------------------------------------------

def test_same_bytecode_compiles_once() -> None:
    insns = assemble("mov %r0, 4242\nadd %r0, %r1\nexit")
    before = compile_stats().programs
    first = JitProgram(insns, _env())
    after_first = compile_stats().programs
    second = JitProgram(list(insns), _env())
    assert after_first == before + 1
    assert compile_stats().programs == after_first, "second load of the same bytecode recompiled"
    assert first.code is second.code
    assert first.run(1) == second.run(2) - 1 == 4243
    JitProgram(insns, _env(), check_memory=False)
    assert compile_stats().programs == after_first + 1, "unchecked mode is a different cache entry"


def test_concurrent_loads_compile_each_program_once() -> None:
    import threading

    programs = [assemble(f"mov %r0, {n}\nadd %r0, %r1\nexit") for n in range(300_000, 300_005)]
    before = compile_stats().programs
    results: list[int] = []

    def load_all() -> None:
        for insns in programs:
            results.append(JitProgram(insns, _env()).run(1))

    threads = [threading.Thread(target=load_all) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == sorted([n + 1 for n in range(300_000, 300_005)] * 4)
    assert compile_stats().programs == before + 5


def test_batch_precompile_fills_cache() -> None:
    programs = [assemble(f"mov %r0, {n}\nmul %r0, %r1\nexit") for n in range(100_000, 100_040)]
    before = compile_stats()
    modules, progs = before.modules, before.programs
    assert CODE_CACHE.precompile(programs, True, "fast") == 40
    assert compile_stats().modules == modules + 1 and compile_stats().programs == progs + 40
    for n, insns in zip(range(100_000, 100_040), programs, strict=True):
        assert JitProgram(insns, _env(), opt_level="fast").run(3) == 3 * n
    assert compile_stats().programs == progs + 40


@pytest.mark.parametrize("level", OPT_LEVELS)
def test_every_opt_level_gives_the_same_answer(level: str) -> None:
    insns = assemble("""
        mov %r0, 0
        mov %r2, 100
    loop:
        mov %r3, %r2
        mul %r3, %r3
        sdiv %r3, -3
        add %r0, %r3
        sub %r2, 1
        jne %r2, 0, loop
        exit""")
    expected = sum(-((i * i) // 3) for i in range(1, 101)) & M64
    assert JitProgram(insns, _env(), opt_level=level).run(0) == expected
    assert Interpreter(insns, _env()).run(0) == expected


def test_tiered_compilation_switches_to_o2_code() -> None:
    insns = assemble("""
        mov %r0, 0
        mov %r2, 1000
    loop:
        add %r0, %r2
        xor %r0, 0x5a5a
        sub %r2, 1
        jne %r2, 0, loop
        exit""")
    insns[0] = insns[0].replace(imm=31337)   # bytecode no other test compiles
    prog = JitProgram(insns, _env(), opt_level="tiered")
    first = prog.run(0)
    assert prog.wait_for_tier2(timeout=60)
    assert prog.code.level == "O2"
    assert prog.run(0) == first == Interpreter(insns, _env()).run(0)
    again = JitProgram(insns, _env(), opt_level="tiered")
    assert again.code.level == "O2", "a finished tier-2 compile is reused directly"
    with pytest.raises(NotSupportedError, match="optimisation level"):
        JitProgram(insns, _env(), opt_level="O9")


# --- memory checks -----------------------------------------------------------------

def _partial_env() -> tuple[ExecEnv, HostBuffer]:
    """A 64-byte buffer of which only the first 32 bytes are a (writable) region."""
    env = _env()
    buf = HostBuffer(64)
    buf.array[:] = range(64)
    env.memory.add(Region.of(buf, "half", writable=True, size=32))
    return env, buf


def test_out_of_region_access_faults_with_pc_and_touches_nothing() -> None:
    env, buf = _partial_env()
    prog = JitProgram(assemble("""
        ldxdw %r0, [%r1+0]
        stdw [%r1+24], 7
        stdw [%r1+28], 9
        exit"""), env)
    with pytest.raises(VMFault) as info:
        prog.run(buf.addr)
    assert info.value.pc == 2
    assert "write of 8 bytes" in str(info.value)
    assert int.from_bytes(bytes(buf.array[24:32]), "little") == 7, "the store before the fault happened"
    assert list(buf.array[32:36]) == [32, 33, 34, 35], "faulting store wrote past the region"


def test_region_cache_does_not_admit_the_next_bytes() -> None:
    """The inline last-region cache must check size too: a read that starts inside the
    cached region and ends outside it faults."""
    env, buf = _partial_env()
    prog = JitProgram(assemble("""
        ldxdw %r0, [%r1+16]
        ldxdw %r2, [%r1+24]
        ldxdw %r3, [%r1+25]
        exit"""), env)
    with pytest.raises(VMFault) as info:
        prog.run(buf.addr)
    assert info.value.pc == 2
    prog_ok = JitProgram(assemble("ldxdw %r0, [%r1+16]\nldxw %r0, [%r1+28]\nexit"), env)
    assert prog_ok.run(buf.addr) == int.from_bytes(bytes(range(28, 32)), "little")


def test_tiny_regions_are_checked_exactly() -> None:
    """Regions shorter than 8 bytes are never put in the inline cache."""
    env = _env()
    buf = HostBuffer(16)
    buf.array[:] = range(1, 17)
    env.memory.add(Region.of(buf, "tiny", size=4))
    ok = JitProgram(assemble("ldxw %r0, [%r1]\nldxh %r2, [%r1+2]\nldxb %r2, [%r1+3]\nexit"), env)
    assert ok.run(buf.addr) == 0x04030201
    for text, pc in (("ldxw %r0, [%r1]\nldxh %r0, [%r1+3]\nexit", 1),
                     ("ldxb %r0, [%r1]\nldxb %r0, [%r1+4]\nexit", 1),
                     ("ldxb %r0, [%r1]\nldxdw %r0, [%r1]\nexit", 1)):
        with pytest.raises(VMFault) as info:
            JitProgram(assemble(text), env).run(buf.addr)
        assert info.value.pc == pc


def test_read_only_region_rejects_writes() -> None:
    te = make_env(bytes(16), writable=False)
    prog = JitProgram(assemble("ldxdw %r0, [%r1]\nstxb [%r1+3], %r0\nexit"), te.env)
    with pytest.raises(VMFault, match="read-only") as info:
        prog.run(te.mem_addr)
    assert info.value.pc == 1
    with pytest.raises(VMFault) as info:
        JitProgram(assemble("lock add [%r1], %r1\nexit"), te.env).run(te.mem_addr)
    assert info.value.pc == 0


def test_null_and_wild_pointers_fault() -> None:
    prog = JitProgram(assemble("ldxb %r0, [%r1]\nexit"), _env())
    for addr in (0, 8, M64 - 3, 1 << 47):
        with pytest.raises(VMFault):
            prog.run(addr)


def test_stack_accesses_through_computed_pointers() -> None:
    insns = assemble("""
        mov %r2, %r10
        add %r2, -512
        stdw [%r2], 11
        ldxdw %r0, [%r10-512]
        mov %r3, %r10
        ldxb %r4, [%r3+0]
        exit""")
    env = _env()
    prog = JitProgram(insns, env)
    with pytest.raises(VMFault) as info:   # [r10 + 0] is just above the frame (outside the stack)
        prog.run(0)
    assert info.value.pc == 5
    assert JitProgram([*insns[:4], Instruction(op.BPF_JMP | op.BPF_EXIT)], env).run(0) == 11


def test_unchecked_mode_trusts_the_program() -> None:
    env, buf = _partial_env()
    prog = JitProgram(assemble("ldxdw %r0, [%r1+32]\nexit"), env, check_memory=False)
    assert prog.run(buf.addr) == int.from_bytes(bytes(range(32, 40)), "little")
    with pytest.raises(VMFault):
        JitProgram(assemble("ldxdw %r0, [%r1+32]\nexit"), env).run(buf.addr)


def test_regions_added_and_removed_by_helpers_are_seen() -> None:
    env = _env()
    extra = HostBuffer(16)
    extra.array[:8] = [1, 2, 3, 4, 5, 6, 7, 8]
    region = Region.of(extra, "helper memory")

    def add(*_: int) -> int:
        env.memory.add(region)
        return extra.addr

    def remove(*_: int) -> int:
        env.memory.remove(region)
        return 0

    env.helpers[1000] = add
    env.helpers[1001] = remove
    prog = JitProgram(assemble("""
        call 1000
        mov %r6, %r0
        ldxdw %r7, [%r6]
        call 1001
        ldxdw %r0, [%r6]
        exit"""), env)
    with pytest.raises(VMFault) as info:
        prog.run(0)
    assert info.value.pc == 4
    assert JitProgram(assemble("call 1000\nldxdw %r0, [%r0]\nexit"), env).run(0) == 0x0807060504030201


def test_llvm_ir_dump_shows_the_checks() -> None:
    insns = assemble("ldxdw %r0, [%r1]\nexit")
    checked = JitProgram(insns, _env()).llvm_ir(optimised=False)
    assert "@bpf_chk" in checked.split("define internal i64 @dump_f0")[1]
    unchecked = JitProgram(insns, _env(), check_memory=False).llvm_ir()
    assert "@bpf_chk(" not in unchecked.split("@dump_f0")[1] and "load i64" in unchecked


def test_stack_region_is_registered_and_released() -> None:
    env = _env()
    prog = JitProgram(assemble("mov %r0, 0\nexit"), env)
    assert prog.stack_region in env.memory.regions
    assert prog.stack_region.end - prog.stack_region.start == 4096
    prog.close()
    assert prog.stack_region not in env.memory.regions


# --- helpers -------------------------------------------------------------------------

def test_helper_arguments_and_result() -> None:
    seen = []
    env = _env()
    env.helpers[99] = lambda *args: seen.append(args) or -2
    prog = JitProgram(assemble("""
        mov %r1, 1
        mov %r2, -1
        mov %r3, 3
        mov %r4, 4
        mov %r5, 5
        call 99
        exit"""), env)
    assert prog.run(0) == M64 - 1
    assert seen == [(1, M64, 3, 4, 5)]


def test_missing_helper_is_refused_at_load() -> None:
    with pytest.raises(HelperError, match="helper 4242"):
        JitProgram(assemble("call 4242\nexit"), _env())


def test_helper_exceptions_propagate() -> None:
    env = _env()

    def boom(*_: int) -> int:
        raise KeyError("from helper")

    def fault(*_: int) -> int:
        raise VMFault("helper refused")

    env.helpers[7] = boom
    env.helpers[8] = fault
    with pytest.raises(KeyError, match="from helper"):
        JitProgram(assemble("mov %r0, 1\ncall 7\nexit"), env).run(0)
    with pytest.raises(VMFault, match="helper refused") as info:
        JitProgram(assemble("mov %r0, 1\nmov %r0, 2\ncall 8\nexit"), env).run(0)
    assert info.value.pc == 2
    prog = JitProgram(assemble("mov %r0, 5\nexit"), env)
    assert prog.run(0) == 5, "state after a failed run leaks into the next one"


def test_arguments_r1_to_r5() -> None:
    prog = JitProgram(assemble("mov %r0, %r1\nadd %r0, %r2\nadd %r0, %r3\nadd %r0, %r4\nadd %r0, %r5\nexit"),
                      _env())
    assert prog.run(1, 20, 300, 4000, 50000) == 54321
    assert prog.run(7) == 7


# --- BPF-to-BPF calls, callbacks, callx ---------------------------------------------

def test_local_calls_get_their_own_frames() -> None:
    insns = assemble("""
        stdw [%r10-8], 5
        mov %r6, 6
        call local f
        ldxdw %r1, [%r10-8]
        add %r0, %r1
        add %r0, %r6
        exit
    f:
        stdw [%r10-8], 1000
        ldxdw %r0, [%r10-8]
        mov %r6, 77
        exit""")
    assert JitProgram(insns, _env()).run(0) == 1011 == Interpreter(insns, _env()).run(0)


def test_call_depth_is_limited_to_eight_frames() -> None:
    def chain(depth: int) -> list[Instruction]:
        lines = []
        for i in range(depth - 1):
            lines += [f"f{i}:" if i else "", f"call local f{i + 1}", "exit"]
        lines += [f"f{depth - 1}:", "mov %r0, 42", "exit"]
        return assemble("\n".join(x for x in lines if x))

    assert JitProgram(chain(8), _env()).run(0) == 42 == Interpreter(chain(8), _env()).run(0)
    with pytest.raises(VMFault, match="call depth") as info:
        JitProgram(chain(9), _env()).run(0)
    with pytest.raises(VMFault, match="call depth") as ref:
        Interpreter(chain(9), _env()).run(0)
    assert info.value.pc == ref.value.pc == 14


def _loop_helper(env: ExecEnv):
    def bpf_loop(nr: int, fn: int, ctx: int, flags: int, _: int) -> int:
        for i in range(nr):
            if env.invoke_callback(fn, i, ctx, 0, 0, 0):
                return i + 1
        return nr
    return bpf_loop


def _callback_program() -> list[Instruction]:
    # r0 = sum of i*i for i < 10 via bpf_loop(10, cb, &acc); cb writes into the caller's stack
    head = assemble("""
        stdw [%r10-8], 0
        mov %r1, 10""")
    tail = assemble("""
        mov %r3, %r10
        add %r3, -8
        mov %r4, 0
        call 181
        ldxdw %r0, [%r10-8]
        exit
    cb:
        mov %r0, %r1
        mul %r0, %r1
        ldxdw %r3, [%r2]
        add %r3, %r0
        stxdw [%r2], %r3
        stdw [%r10-8], 99
        mov %r0, 0
        exit""")
    # lddw r2, cb sits between head and tail; cb is at len(head) + 2 + 6
    rel = (len(head) + 2 + 6) - len(head) - 1
    return head + _lddw_func(2, rel) + tail


def test_callbacks_through_invoke_callback() -> None:
    insns = _callback_program()
    env = _env()
    env.helpers[181] = _loop_helper(env)
    prog = JitProgram(insns, env)
    assert prog.run(0) == sum(i * i for i in range(10))
    assert env.invoke_callback is None, "run() must restore env.invoke_callback"
    ienv = _env()
    ienv.helpers[181] = _loop_helper(ienv)
    assert Interpreter(insns, ienv).run(0) == prog.run(0)


def test_fault_inside_callback_stops_the_program() -> None:
    insns = _callback_program()
    bad = insns.index(Instruction(op.BPF_LDX | op.BPF_MEM | op.BPF_DW, 3, 2))
    insns[bad] = Instruction(op.BPF_LDX | op.BPF_MEM | op.BPF_DW, 3, 1)   # [r1] = [i]: wild read
    env = _env()
    env.helpers[181] = _loop_helper(env)
    with pytest.raises(VMFault) as info:
        JitProgram(insns, env).run(0)
    assert info.value.pc == bad


def test_invoke_callback_refuses_foreign_pointers() -> None:
    insns = _callback_program()
    env = _env()
    env.helpers[181] = lambda nr, fn, ctx, flags, _: env.invoke_callback(fn + 16, 0, ctx)
    with pytest.raises(VMFault, match="not a function"):
        JitProgram(insns, env).run(0)


def test_callx_calls_function_pointers_and_helper_ids() -> None:
    body = assemble("""
        mov %r1, 20
        callx %r6
        mov %r7, %r0
        mov %r8, 77
        callx %r8
        add %r0, %r7
        exit
    f:
        mov %r0, %r1
        add %r0, 1
        exit""".replace("callx %r6", "call %r6").replace("callx %r8", "call %r8"))
    insns = _lddw_func(6, 8) + body   # f is at index 9 (lddw takes 2 slots): rel = 9 - 0 - 1
    env = _env()
    env.helpers[77] = lambda r1, *_: r1 * 100
    ienv = _env()
    ienv.helpers[77] = env.helpers[77]
    assert JitProgram(insns, env).run(0) == 21 + 2000 == Interpreter(insns, ienv).run(0)


# --- tail calls ----------------------------------------------------------------------

def test_tail_calls_follow_the_protocol() -> None:
    env = _env()
    target = JitProgram(assemble("mov %r0, %r1\nadd %r0, 1000\nexit"), env)
    caller_insns = assemble("""
        mov %r6, %r1
        mov %r0, 7
        mov %r2, 1
        mov %r3, 0
        call 12
        add %r0, 1
        exit""")
    env.resolve_tail_call = lambda m, i: target if (m, i) == (1, 0) else None
    caller = JitProgram(caller_insns, env)
    assert caller.run(5) == 1005
    assert env.tail_call_count == 0, "a top-level run resets the tail call count"
    env.resolve_tail_call = lambda m, i: None
    assert caller.run(5) == 8, "a missed tail call continues with r0 untouched"


def test_tail_call_chain_stops_after_33() -> None:
    # each run adds 1 to the counter at [r1] and tail-calls itself
    te = make_env(bytes(8))
    insns = assemble("""
        mov %r6, %r1
        ldxdw %r2, [%r6]
        add %r2, 1
        stxdw [%r6], %r2
        mov %r0, %r2
        mov %r1, %r6
        mov %r2, 1
        mov %r3, 0
        call 12
        exit""")
    prog = JitProgram(insns, te.env)
    te.env.resolve_tail_call = lambda m, i: prog
    assert prog.run(te.mem_addr) == 34
    assert int.from_bytes(bytes(te.mem.view[:8]), "little") == 34
    assert te.env.tail_call_count == 0
    ie = make_env(bytes(8))
    interp = Interpreter(insns, ie.env)
    ie.env.resolve_tail_call = lambda m, i: interp
    assert interp.run(ie.mem_addr) == 34


# --- refused programs -----------------------------------------------------------------

def test_kfunc_and_unrelocated_map_references_are_not_supported() -> None:
    kfunc = [Instruction(op.BPF_JMP | op.BPF_CALL, 0, op.BPF_PSEUDO_KFUNC_CALL, 0, 1234),
             Instruction(op.BPF_JMP | op.BPF_EXIT)]
    with pytest.raises(NotSupportedError, match="kfunc calls"):
        JitProgram(kfunc, _env())
    map_ref = [Instruction(op.LDDW, 1, op.BPF_PSEUDO_MAP_FD, 0, 3), Instruction(0),
               Instruction(op.BPF_ALU64 | op.BPF_MOV, 0, 0, 0, 0), Instruction(op.BPF_JMP | op.BPF_EXIT)]
    with pytest.raises(NotSupportedError, match="map fd"):
        JitProgram(map_ref, _env())


def test_invalid_programs_are_rejected_with_the_index() -> None:
    with pytest.raises(InvalidInstructionError) as info:
        JitProgram([Instruction(op.BPF_ALU64 | op.BPF_MOV, 0), Instruction(0xFF)], _env())
    assert info.value.index == 1
    with pytest.raises(InvalidInstructionError):
        JitProgram(assemble("mov %r0, 1"), _env())   # falls off the end


def test_function_pointer_values_are_native_addresses() -> None:
    insns = _lddw_func(0, 2) + assemble("exit\nmov %r0, 0\nexit")
    value = JitProgram(insns, _env()).run(0)
    assert value not in range(FUNC_PTR_BASE, FUNC_PTR_BASE + 16) and value > 4096
