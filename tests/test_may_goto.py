"""may_goto (BPF_JMP | BPF_JCOND, src_reg BPF_MAY_GOTO): decoded, verified as the kernel
verifies it, and run with the kernel's semantics on every engine (issue 15, false rejects).

The kernel rewrites each may_goto into a test of a hidden per-call counter that the
function's prologue sets to BPF_MAX_LOOPS (8M): while it is not zero the instruction
decrements it and falls through; at zero the jump is taken.  Its verifier explores the
jump first, pushes the fall-through one "may_goto depth" deeper, and prunes a loop
iteration against an earlier one whose precise scalars contain it.  The objects are
built with the ``can_loop``/``cond_break`` macros in the raw-byte form that
bpf_experimental.h uses for compilers without the mnemonic (clang 14 here), and every
verdict is compared with the running kernel's.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import pytest
from bpf_build import compile_bpf
from engines import make_env
from kernel_verdict import kernel_skip_reason, kernel_verdict
from test_verifier import MAPS, prog

from ubpf_py.errors import InvalidInstructionError
from ubpf_py.isa import opcodes as op
from ubpf_py.isa.asm import assemble
from ubpf_py.isa.disasm import format_instruction
from ubpf_py.isa.instruction import Instruction
from ubpf_py.isa.validate import validate
from ubpf_py.live.collection import Collection
from ubpf_py.obj.elf import load_object
from ubpf_py.verifier import verify_program
from ubpf_py.vm.interpreter import Interpreter
from ubpf_py.vm.jit import JitProgram
from ubpf_py.vm.jit import target as T

COUNT = "mov %r0, 0\nl:\nmay_goto +2\nadd %r0, 1\nja l\nexit"
#: main calls a function that counts with may_goto, twice: every call has its own budget
PER_CALL = ("mov %r1, 5\ncall local f\nmov %r6, %r0\nmov %r1, 0\ncall local f\nadd %r0, %r6\nexit\n"
            "f:\nmov %r0, %r1\nl:\nmay_goto +2\nadd %r0, 1\nja l\nexit")
#: leaves the loop by its own condition long before the budget is used up
EARLY = "mov %r0, 0\nl:\nmay_goto +3\nadd %r0, 3\njge %r0, 300, +1\nja l\nexit"


# -- encoding ------------------------------------------------------------------------

def test_assembles_and_disassembles() -> None:
    insns = assemble(COUNT)
    assert insns[1] == Instruction(op.BPF_JMP | op.BPF_JCOND, 0, op.BPF_MAY_GOTO, 2, 0)
    assert insns[1].opcode == 0xE5
    assert format_instruction(insns[1], 1) == "may_goto +2"
    validate(insns)


@pytest.mark.parametrize("field", ["dst", "src", "imm"])
def test_reserved_fields_are_invalid(field: str) -> None:
    kw = {"opcode": op.MAY_GOTO, "dst": 0, "src": 0, "off": 1, "imm": 0, field: 1}
    with pytest.raises(InvalidInstructionError):
        validate([Instruction(**kw), Instruction(0x95, 0, 0, 0, 0), Instruction(0x95, 0, 0, 0, 0)])


# -- engines -------------------------------------------------------------------------

def test_jit_runs_the_kernel_budget() -> None:
    """Taken only once BPF_MAX_LOOPS fall-throughs are used up; fresh at every run."""
    jit = JitProgram(assemble(COUNT), make_env().env)
    assert jit.run(0) == op.BPF_MAX_LOOPS
    assert jit.run(0) == op.BPF_MAX_LOOPS


def test_jit_budget_is_per_call() -> None:
    jit = JitProgram(assemble(PER_CALL), make_env().env)
    assert jit.run(0) == 2 * op.BPF_MAX_LOOPS + 5


@pytest.mark.parametrize("budget", [0, 1, 1000])
def test_interpreter_budget(budget: int) -> None:
    """The same rule with a small budget (8M fall-throughs take seconds in Python)."""
    interp = Interpreter(assemble(COUNT), make_env().env, loop_budget=budget)
    assert interp.run(0) == budget
    assert interp.run(0) == budget
    assert Interpreter(assemble(PER_CALL), make_env().env, loop_budget=budget).run(0) == 2 * budget + 5


def test_interpreter_default_budget_is_the_kernel_limit() -> None:
    assert Interpreter(assemble(COUNT), make_env().env).loop_budget == op.BPF_MAX_LOOPS == 1 << 23


@pytest.mark.parametrize("engine", ["interp", "jit"])
def test_loop_ending_by_its_condition(engine: str) -> None:
    insns = assemble(EARLY)
    exe = Interpreter(insns, make_env().env) if engine == "interp" else JitProgram(insns, make_env().env)
    assert exe.run(0) == 300


def test_target_code_runs_the_same_budget() -> None:
    """Target mode (code for the traced process) shares the IR: same results, still PIC and
    free of vector instructions."""
    from test_jit_target import _run_in_process

    assert _run_in_process(assemble(COUNT), "mg_count", 0, 0) == op.BPF_MAX_LOOPS
    assert _run_in_process(assemble(PER_CALL), "mg_per_call", 0, 0) == 2 * op.BPF_MAX_LOOPS + 5
    assert _run_in_process(assemble(EARLY), "mg_early", 0, 0) == 300
    code = T.compile_for_target(assemble(PER_CALL), "mg", {})
    with tempfile.TemporaryDirectory() as d:
        obj = Path(d) / "p.o"
        obj.write_bytes(code.obj)
        dis = subprocess.run(["objdump", "-dr", str(obj)], capture_output=True, text=True).stdout
    assert "xmm" not in dis and "ymm" not in dis
    assert {ln.split()[1] for ln in dis.splitlines() if "R_X86_64" in ln} <= {"R_X86_64_PLT32", "R_X86_64_PC32"}


# -- verifier against the kernel ---------------------------------------------------------

#: (name, program, None when the kernel accepts else its error line)
CASES = [
    ("counter_in_r0", COUNT, None),
    ("counter_in_r6", "mov %r6, 0\nl:\nmay_goto +2\nadd %r6, 1\nja l\nmov %r0, %r6\nexit", None),
    ("may_goto_zero_offset", "mov %r0, 0\nmay_goto +0\nexit", None),
    ("per_call_budget", PER_CALL, None),
    ("bounded_index_into_stack",
     "mov %r6, 0\nl:\nmay_goto +9\njge %r6, 8, +8\nmov %r1, %r6\nlsh %r1, 3\nmov %r2, %r10\nadd %r2, -64\n"
     "add %r2, %r1\nstdw [%r2+0], 1\nadd %r6, 1\nja l\nmov %r0, 0\nexit", None),
    # the counter decides a branch: it is precise, so iterations are not pruned and the
    # bad write on the 100th is found, as the kernel finds it
    ("unsafe_on_the_100th_iteration",
     "mov %r6, 0\nl:\nmay_goto +4\nadd %r6, 1\njne %r6, 100, +1\nstdw [%r10+8], 1\nja l\nmov %r0, 0\nexit",
     "invalid write to stack R10 off=8 size=8"),
    # the exit side is walked too
    ("unsafe_on_the_exit_side", "mov %r0, 0\nl:\nmay_goto +2\nadd %r0, 1\nja l\nstdw [%r10+8], 1\nexit",
     "invalid write to stack R10 off=8 size=8"),
    ("uninitialised_after_the_loop", "l:\nmay_goto +1\nja l\nexit", "R0 !read_ok"),
    ("loop_without_may_goto_is_infinite", "mov %r0, 0\nl:\njeq %r0, 1, +1\nja l\nexit",
     "infinite loop detected at insn 1"),
]


def _load(name: str, text: str):
    p = prog(text, name)
    return p


@pytest.mark.parametrize("name,text,error", CASES, ids=[c[0] for c in CASES])
def test_verdict(name: str, text: str, error: str | None) -> None:
    r = verify_program(_load(name, text), MAPS, mode="warn")
    assert r.ok == (error is None), r.error
    if error is not None:
        assert error in r.error


def test_reserved_imm_message() -> None:
    p = prog("mov %r0, 0\nmay_goto +0\nexit")
    p.instructions[1] = Instruction(op.MAY_GOTO, 0, 0, 0, 5)
    r = verify_program(p, MAPS, mode="warn")
    assert not r.ok and r.error == "invalid may_goto imm 5"


@pytest.mark.skipif(kernel_skip_reason() is not None, reason=str(kernel_skip_reason()))
@pytest.mark.parametrize("name,text,error", CASES, ids=[c[0] for c in CASES])
def test_verdict_matches_kernel(name: str, text: str, error: str | None) -> None:
    ok, line, log = kernel_verdict(_load(name, text), MAPS)
    assert ok == (error is None), line
    if error is not None:
        assert error in line or error in log


def test_pruning_matches_the_kernel_count() -> None:
    """Iterations are unrolled only while the counter is precise: the same processed count."""
    r = verify_program(prog(CASES[5][1]), MAPS, mode="warn")
    assert r.processed == 601   # the kernel's "processed 601 insns" on this program (6.18)
    r = verify_program(prog(COUNT), MAPS)
    assert r.ok and r.processed < 20


# -- objects built with can_loop / cond_break ------------------------------------------------

SOURCE = r"""
#include <linux/bpf.h>
#include <linux/ptrace.h>
#include <bpf/bpf_helpers.h>

/* may_goto as raw bytes (clang 14 has no mnemonic), the form bpf_experimental.h uses */
#define MAY_GOTO_TO(label) \
    asm volatile goto("1:.byte 0xe5; .byte 0; .long ((%l[" #label "] - 1b - 8) / 8) & 0xffff; .short 0" \
                      :::: label)
#define can_loop ({ __label__ l_break, l_continue; _Bool ok = 1; MAY_GOTO_TO(l_break); \
                    goto l_continue; l_break: ok = 0; l_continue:; ok; })
#define cond_break ({ __label__ l_break, l_continue; MAY_GOTO_TO(l_break); \
                      goto l_continue; l_break: break; l_continue:; })

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 16);
    __type(key, __u32);
    __type(value, __u64);
} slots SEC(".maps");

SEC("uprobe") int sum_can_loop(struct pt_regs *ctx)
{
    __u64 n = ctx->rdi, i = 0, sum = 0;
    while (i < n && can_loop) {
        sum += i;
        i++;
    }
    return sum;
}

SEC("uprobe") int count_until_budget(struct pt_regs *ctx)
{
    __u64 count = 0;
    while (can_loop)
        count++;
    return count;
}

static __attribute__((noinline)) __u64 spin(__u64 start)
{
    __u64 c = start;
    while (can_loop)
        c++;
    return c;
}

SEC("uprobe") int budget_per_call(struct pt_regs *ctx)
{
    return spin(ctx->rdi) + spin(0);
}

SEC("uprobe") int fill_map_cond_break(struct pt_regs *ctx)
{
    __u64 n = ctx->rdi, total = 0;
    for (__u32 i = 0; i < n; i++) {
        cond_break;
        __u32 key = i & 15;
        __u64 *v = bpf_map_lookup_elem(&slots, &key);
        if (!v)
            break;
        *v += i;
        total += *v;
    }
    return total;
}

SEC("uprobe") int bad_access_after_1000(struct pt_regs *ctx)
{
    __u64 i = 0;
    while (can_loop) {
        i++;
        if (i == 1000)
            return *(volatile __u64 *)((char *)ctx + 4000);
    }
    return 0;
}

char LICENSE[] SEC("license") = "GPL";
"""

#: program -> the kernel's error line (None: accepted)
EXPECTED = {"sum_can_loop": None, "count_until_budget": None, "budget_per_call": None,
            "fill_map_cond_break": None, "bad_access_after_1000": "invalid bpf_context access off=4000 size=8"}
RDI = 112   # offset of rdi in struct pt_regs


@pytest.fixture(scope="module")
def obj_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_bpf(SOURCE, tmp_path_factory.mktemp("maygoto"), "loops")


def test_object_has_may_goto(obj_path: Path) -> None:
    spec = load_object(str(obj_path))
    for name in EXPECTED:
        assert any(ins.opcode == op.MAY_GOTO for ins in spec.programs[name].instructions), name


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_object_verdicts(obj_path: Path, name: str) -> None:
    spec = load_object(str(obj_path))
    r = verify_program(spec.programs[name], list(spec.maps), mode="warn")
    assert r.ok == (EXPECTED[name] is None), r.error
    if EXPECTED[name]:
        assert EXPECTED[name] in r.error


@pytest.mark.skipif(kernel_skip_reason() is not None, reason=str(kernel_skip_reason()))
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_object_verdicts_match_kernel(obj_path: Path, name: str) -> None:
    spec = load_object(str(obj_path))
    ok, line, _log = kernel_verdict(spec.programs[name], list(spec.maps))
    assert ok == (EXPECTED[name] is None), line
    if EXPECTED[name]:
        assert EXPECTED[name] in line


def _run(obj_path: Path, engine: str, name: str, rdi: int) -> int:
    coll = Collection.load(load_object(str(obj_path)), engine=engine, programs=[name])
    coll.ctx_buffer.array[RDI:RDI + 8] = list(rdi.to_bytes(8, "little"))
    return coll.program(name).run(coll.ctx_buffer.addr)


@pytest.mark.parametrize("name,rdi,want", [("sum_can_loop", 100, 4950), ("sum_can_loop", 0, 0),
                                           ("fill_map_cond_break", 40, None)])
def test_object_runs_alike_on_both_engines(obj_path: Path, name: str, rdi: int, want: int | None) -> None:
    got = {engine: _run(obj_path, engine, name, rdi) for engine in ("interp", "jit")}
    assert got["interp"] == got["jit"]
    if want is not None:
        assert got["jit"] == want
    else:   # keys i & 15 accumulate: slot k holds the sum of the i < 40 with i % 16 == k
        slots = [0] * 16
        total = 0
        for i in range(rdi):
            slots[i & 15] += i
            total += slots[i & 15]
        assert got["jit"] == total


def test_object_budget_on_the_jit(obj_path: Path) -> None:
    assert _run(obj_path, "jit", "count_until_budget", 0) == op.BPF_MAX_LOOPS
    assert _run(obj_path, "jit", "budget_per_call", 7) == 2 * op.BPF_MAX_LOOPS + 7
