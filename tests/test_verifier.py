"""Unit tests of the verifier: structure, scalars, memory, helpers, references, calls.

Programs are written in bpf_conformance assembly.  Map references use a marker
in lddw's high word: ``lddw %r1, 0xfa0000000K`` is map K (src=5),
``0xfb..`` a map value pointer (src=6, low byte map, next bytes offset), and
``0xfc..`` a function pointer (src=4, low word = relative offset).
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ubpf_py.errors import VerifierError
from ubpf_py.isa import opcodes as op
from ubpf_py.isa.asm import assemble
from ubpf_py.isa.instruction import Instruction
from ubpf_py.obj.spec import MapSpec, ProgramSpec
from ubpf_py.verifier import alu as A
from ubpf_py.verifier import verify_program
from ubpf_py.verifier.scalar import Scalar

HASH = MapSpec("h", 1, 4, 8, 16)
ARRAY = MapSpec("a", 2, 4, 32, 4)
RINGBUF = MapSpec("rb", 27, 0, 0, 4096)
RODATA = MapSpec(".rodata", 2, 4, 8, 1, data=b"abc\0\x05\0\0\0", readonly=True, internal=True,
                 section=".rodata")
PROGS = MapSpec("jt", 3, 4, 4, 2)
MAPS = [HASH, ARRAY, RINGBUF, RODATA, PROGS]


def _fix(insns: list[Instruction]) -> list[Instruction]:
    out = list(insns)
    for i, ins in enumerate(out):
        if ins.opcode != op.LDDW:
            continue
        tag = ins.imm_hi & 0xFFFFFFFF
        if tag == 0xFA:
            out[i] = ins.replace(src=op.BPF_PSEUDO_MAP_IDX, imm_hi=0)
        elif tag == 0xFB:
            out[i] = ins.replace(src=op.BPF_PSEUDO_MAP_IDX_VALUE, imm=ins.imm & 0xFF, imm_hi=ins.imm >> 8)
        elif tag == 0xFC:
            out[i] = ins.replace(src=op.BPF_PSEUDO_FUNC, imm_hi=0)
    return out


def prog(text: str, name: str = "t") -> ProgramSpec:
    return ProgramSpec(name, "uprobe", "uprobe", _fix(assemble(text)))


def check(text: str, maps: list[MapSpec] | None = None, **kw: object):
    return verify_program(prog(text), MAPS if maps is None else maps, mode="warn", **kw)


def rejects(text: str, phrase: str, **kw: object) -> None:
    r = check(text, **kw)
    assert not r.ok, f"accepted, expected: {phrase}\n{r.log}"
    assert phrase in r.error, f"wanted {phrase!r}, got {r.error!r}\n{r.log}"


def accepts(text: str, **kw: object) -> None:
    r = check(text, **kw)
    assert r.ok, r.log


# -- scalar domain soundness (property tests) -----------------------------------------------

_OPS = [op.BPF_ADD, op.BPF_SUB, op.BPF_MUL, op.BPF_AND, op.BPF_OR, op.BPF_XOR, op.BPF_LSH,
        op.BPF_RSH, op.BPF_ARSH]
_JMPS = [op.BPF_JEQ, op.BPF_JNE, op.BPF_JGT, op.BPF_JGE, op.BPF_JLT, op.BPF_JLE, op.BPF_JSGT,
         op.BPF_JSGE, op.BPF_JSLT, op.BPF_JSLE, op.BPF_JSET]
_vals = st.one_of(st.integers(0, 70), st.integers(0, (1 << 64) - 1), st.integers(-300, 300).map(
    lambda v: v & ((1 << 64) - 1)))


def _around(v: int, spread: int, signed: bool) -> Scalar:
    if signed:
        sv = v - (1 << 64) if v >> 63 else v
        lo, hi = max(sv - spread, -(1 << 63)), min(sv + spread, (1 << 63) - 1)
        return Scalar.srange(lo, hi)
    return Scalar.urange(max(v - spread, 0), min(v + spread, (1 << 64) - 1))


def _contains(s: Scalar, v: int, bits: int) -> bool:
    v &= (1 << bits) - 1 if bits == 32 else (1 << 64) - 1
    sv = v - (1 << 64) if v >> 63 else v
    lo = v & 0xFFFFFFFF
    s32 = lo - (1 << 32) if lo >> 31 else lo
    return (s.umin <= v <= s.umax and s.smin <= sv <= s.smax and s.var.has(v)
            and s.u32min <= lo <= s.u32max and s.s32min <= s32 <= s.s32max)


@settings(max_examples=400, deadline=None)
@given(_vals, _vals, st.sampled_from(_OPS), st.sampled_from([32, 64]), st.integers(0, 40),
       st.integers(0, 40), st.booleans())
def test_alu_is_sound(a, b, code, bits, sa, sb, signed):
    if code in (op.BPF_LSH, op.BPF_RSH, op.BPF_ARSH):
        b %= bits
        sb = 0
    x, y = _around(a, sa, signed), _around(b, sb, not signed)
    if bits == 32:
        x, y = Scalar.const(a), y.zext32() if sb else Scalar.const(b)
    r = A.scalar_alu(code, x, y, bits)
    concrete = A._concrete(code, a, b, bits)
    assert concrete is not None
    assert _contains(r, concrete, 64), (code, bits, x, y, r, concrete)


@settings(max_examples=400, deadline=None)
@given(_vals, _vals, st.sampled_from(_JMPS), st.sampled_from([32, 64]), st.integers(0, 40),
       st.integers(0, 40), st.booleans())
def test_branch_refinement_is_sound(a, b, code, bits, sa, sb, signed):
    x, y = _around(a, sa, signed), _around(b, sb, signed)
    m = (1 << bits) - 1
    ca, cb = a & m, b & m

    def sgn(v: int) -> int:
        return v - (1 << bits) if v >> (bits - 1) else v

    truth = {op.BPF_JEQ: ca == cb, op.BPF_JNE: ca != cb, op.BPF_JGT: ca > cb, op.BPF_JGE: ca >= cb,
             op.BPF_JLT: ca < cb, op.BPF_JLE: ca <= cb, op.BPF_JSGT: sgn(ca) > sgn(cb),
             op.BPF_JSGE: sgn(ca) >= sgn(cb), op.BPF_JSLT: sgn(ca) < sgn(cb),
             op.BPF_JSLE: sgn(ca) <= sgn(cb), op.BPF_JSET: bool(ca & cb)}[code]
    taken = A.branch_taken(code, x, y, bits)
    assert taken in (-1, int(truth))
    cond = code if truth else A.negate(code)
    r = A.refine(cond, x, y, bits)
    assert r is not None
    assert _contains(r[0], a, 64) and _contains(r[1], b, 64)


# -- structure ------------------------------------------------------------------------------------

def test_unknown_opcode() -> None:
    p = ProgramSpec("t", "uprobe", "uprobe", [Instruction(0xFF), *assemble("mov %r0, 0\nexit")])
    r = verify_program(p, [], mode="warn")
    assert not r.ok and r.error == "unknown opcode ff" and r.insn_index == 0


def test_jump_out_of_range_and_into_lddw() -> None:
    rejects("ja +5\nmov %r0, 0\nexit", "jump out of range from insn 0 to 6")
    rejects("ja +1\nlddw %r0, 1\nexit", "jump into the middle of ldimm64 insn 1")


def test_fall_off_the_end_and_unreachable() -> None:
    rejects("mov %r0, 0", "last insn is not an exit or jmp")
    rejects("mov %r0, 0\nexit\nmov %r0, 1\nexit", "unreachable insn 2")


def test_infinite_loop_and_bounded_loop() -> None:
    rejects("mov %r0, 0\nlbl:\nja lbl", "infinite loop detected at insn 1")
    accepts("mov %r0, 0\nmov %r1, 0\nloop:\nadd %r0, %r1\nadd %r1, 1\njlt %r1, 100, loop\nexit")


def test_complexity_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    from ubpf_py.verifier import checker
    monkeypatch.setattr(checker, "COMPLEXITY_LIMIT", 5000)
    rejects("mov %r0, 0\nmov %r1, 0\nloop:\nadd %r1, 1\njlt %r1, 100000, loop\nexit",
            "BPF program is too large. Processed 5001 insn")


def test_uninitialised_register_and_frame_pointer() -> None:
    rejects("mov %r0, %r3\nexit", "R3 !read_ok")
    rejects("exit", "R0 !read_ok")
    rejects("mov %r10, 0\nmov %r0, 0\nexit", "frame pointer is read only")


def test_div_by_zero_register_ok_constant_rejected() -> None:
    accepts("mov %r0, 7\nmov %r1, 0\ndiv %r0, %r1\nexit")
    rejects("mov %r0, 7\ndiv %r0, 0\nexit", "div by zero")
    rejects("mov %r0, 7\nlsh %r0, 64\nexit", "invalid shift 64")


# -- context ------------------------------------------------------------------------------------

def test_ctx_reads() -> None:
    accepts("ldxdw %r0, [%r1+160]\nexit")
    accepts("ldxw %r0, [%r1+112]\nexit")
    rejects("ldxdw %r0, [%r1+168]\nexit", "invalid bpf_context access off=168 size=8")
    rejects("ldxdw %r0, [%r1+4]\nexit", "invalid bpf_context access off=4 size=8")
    rejects("stdw [%r1+0], 1\nmov %r0, 0\nexit", "invalid bpf_context access off=0 size=8")
    rejects("add %r1, 8\nldxdw %r0, [%r1+0]\nexit", "dereference of modified ctx ptr R1 off=8 disallowed")


# -- stack --------------------------------------------------------------------------------------

def test_stack_bounds_alignment_and_uninit() -> None:
    accepts("ldxdw %r0, [%r10-8]\nexit")  # privileged: uninitialised stack reads are allowed
    rejects("ldxdw %r0, [%r10-520]\nexit", "invalid read from stack R10 off=-520 size=8")
    rejects("stdw [%r10+0], 1\nmov %r0, 0\nexit", "invalid write to stack R10 off=0 size=8")
    rejects("ldxdw %r0, [%r10-12]\nexit", "misaligned stack access")


def test_spilled_pointer_stays_precise_and_partial_overwrite_kills_it() -> None:
    base = ("stw [%r10-4], 0\nmov %r2, %r10\nadd %r2, -4\nlddw %r1, 0xfa00000000\ncall 1\n"
            "jeq %r0, 0, out\nstxdw [%r10-16], %r0\n")
    accepts(base + "ldxdw %r3, [%r10-16]\nldxdw %r0, [%r3+0]\nexit\nout:\nmov %r0, 0\nexit")
    rejects(base + "stb [%r10-16], 1\nldxdw %r3, [%r10-16]\nldxdw %r0, [%r3+0]\nexit\nout:\nmov %r0, 0\nexit",
            "R3 invalid mem access 'scalar'")


# -- maps -----------------------------------------------------------------------------------------

LOOKUP = "stw [%r10-4], 1\nmov %r2, %r10\nadd %r2, -4\nlddw %r1, 0xfa00000000\ncall 1\n"


def test_map_value_null_check_and_bounds() -> None:
    rejects(LOOKUP + "ldxdw %r0, [%r0+0]\nexit", "R0 invalid mem access 'map_value_or_null'")
    accepts(LOOKUP + "jeq %r0, 0, +1\nldxdw %r0, [%r0+0]\nexit")
    rejects(LOOKUP + "jeq %r0, 0, +1\nldxdw %r0, [%r0+8]\nexit",
            "invalid access to map value, value_size=8 off=8 size=8")
    rejects(LOOKUP + "add %r0, 8\nmov %r0, 0\nexit", "R0 pointer arithmetic on map_value_or_null prohibited")


def test_map_value_variable_offset() -> None:
    arr = ("stw [%r10-4], 9\nmov %r2, %r10\nadd %r2, -4\nlddw %r1, 0xfa00000001\ncall 1\n"
           "jeq %r0, 0, out\nmov %r6, %r0\ncall 7\n")
    accepts(arr + "and %r0, 3\nlsh %r0, 3\nadd %r6, %r0\nldxdw %r0, [%r6+0]\nexit\nout:\nmov %r0, 0\nexit")
    rejects(arr + "and %r0, 7\nlsh %r0, 3\nadd %r6, %r0\nldxdw %r0, [%r6+0]\nexit\nout:\nmov %r0, 0\nexit",
            "invalid access to map value, value_size=32 off=56 size=8")
    rejects(arr + "add %r6, %r0\nldxdw %r0, [%r6+0]\nexit\nout:\nmov %r0, 0\nexit",
            "math between map_value pointer and register with unbounded min value is not allowed")


def test_array_lookup_with_constant_key_needs_no_null_check() -> None:
    # Linux 6.13+ elides the NULL case for array maps and in-range constant keys
    accepts("stw [%r10-8], 1\nmov %r2, %r10\nadd %r2, -8\nlddw %r1, 0xfa00000001\ncall 1\n"
            "ldxdw %r0, [%r0+0]\nexit")
    rejects("stw [%r10-8], 9\nmov %r2, %r10\nadd %r2, -8\nlddw %r1, 0xfa00000001\ncall 1\n"
            "ldxdw %r0, [%r0+0]\nexit", "invalid mem access 'map_value_or_null'")
    # the key is not a known constant (not a full spill slot): the NULL check stays mandatory
    rejects("stw [%r10-4], 1\nmov %r2, %r10\nadd %r2, -4\nlddw %r1, 0xfa00000001\ncall 1\n"
            "ldxdw %r0, [%r0+0]\nexit", "invalid mem access 'map_value_or_null'")


def test_rodata_is_read_only_and_constant() -> None:
    rejects("lddw %r1, 0xfb00000003\nstw [%r1+0], 2\nmov %r0, 0\nexit",
            "write into map forbidden, value_size=8 off=0 size=4")
    # the frozen .rodata value is known: the branch is decided and the bad path is dead
    accepts("lddw %r1, 0xfb00000003\nldxw %r2, [%r1+4]\nmov %r0, 0\njeq %r2, 5, +1\nldxdw %r0, [%r0+0]\nexit")


# -- helpers -----------------------------------------------------------------------------------------

def test_helper_ids_and_program_type() -> None:
    rejects("call 10000\nmov %r0, 0\nexit", "invalid func unknown#10000")
    rejects("mov %r2, 0\ncall 26\nmov %r0, 0\nexit", "program of this type cannot use helper bpf_skb_load_bytes#26")


def test_helper_argument_types_and_sizes() -> None:
    rejects("mov %r1, 0\nmov %r2, 16\ncall 16\nmov %r0, 0\nexit",
            "R1 type=scalar expected=fp, pkt, pkt_meta, map_key, map_value, mem, ringbuf_mem, buf, trusted_ptr_")
    accepts("mov %r1, %r10\nadd %r1, -16\nmov %r2, 16\ncall 16\nmov %r0, 0\nexit")
    rejects("mov %r1, %r10\nadd %r1, -8\nmov %r2, 16\ncall 16\nmov %r0, 0\nexit",
            "invalid write to stack R1 off=-8 size=16")
    rejects("ldxdw %r2, [%r1+104]\nmov %r1, %r10\nadd %r1, -64\nmov %r3, 0\ncall 112\nmov %r0, 0\nexit",
            "R2 min value is negative, either use unsigned or 'var &= const'")
    rejects("ldxw %r2, [%r1+104]\nmov %r1, %r10\nadd %r1, -64\nmov %r3, 0\ncall 112\nmov %r0, 0\nexit",
            "R2 unbounded memory access")
    rejects("ldxb %r2, [%r1+104]\nmov %r1, %r10\nadd %r1, -64\nmov %r3, 0\ncall 112\nmov %r0, 0\nexit",
            "invalid write to stack R1 off=-64 size=255")
    rejects("mov %r1, %r10\nadd %r1, -8\nmov %r2, 0\ncall 16\nmov %r0, 0\nexit", "R2 invalid zero-sized read")
    rejects("mov %r2, %r10\nadd %r2, -4\nmov %r1, 0\ncall 1\nmov %r0, 0\nexit", "R1 type=scalar expected=map_ptr")


def test_map_type_compatibility() -> None:
    rejects("mov %r2, %r10\nadd %r2, -8\nlddw %r1, 0xfa00000002\ncall 1\nmov %r0, 0\nexit",
            "cannot pass map_type 27 into func bpf_map_lookup_elem#1")


# -- ringbuf references ----------------------------------------------------------------------------

RESERVE = "lddw %r1, 0xfa00000002\nmov %r2, 8\nmov %r3, 0\ncall 131\nmov %r6, %r0\n"


def test_ringbuf_reserve_submit_discard() -> None:
    accepts(RESERVE + "jeq %r6, 0, out\nstdw [%r6+0], 1\nmov %r1, %r6\nmov %r2, 0\ncall 132\n"
            "out:\nmov %r0, 0\nexit")
    rejects(RESERVE + "jeq %r6, 0, out\nstdw [%r6+0], 1\nout:\nmov %r0, 0\nexit",
            "Unreleased reference id=2 alloc_insn=4")
    r = check(RESERVE + "jeq %r6, 0, out\nmov %r1, %r6\nmov %r2, 0\ncall 132\nstdw [%r6+0], 2\n"
              "out:\nmov %r0, 0\nexit")
    assert r.error == "R6 invalid mem access 'scalar'" and "released at insn 9" in r.hint
    rejects(RESERVE + "mov %r1, %r6\nmov %r2, 0\ncall 133\nmov %r0, 0\nexit",
            "R1 type=ringbuf_mem_or_null expected=ringbuf_mem")
    rejects(RESERVE + "jeq %r6, 0, out\nstdw [%r6+8], 1\nmov %r1, %r6\nmov %r2, 0\ncall 133\n"
            "out:\nmov %r0, 0\nexit", "invalid access to memory, mem_size=8 off=8 size=8")
    rejects(RESERVE + "jeq %r6, 0, out\nmov %r1, %r6\nadd %r1, 4\nmov %r2, 0\ncall 133\n"
            "out:\nmov %r0, 0\nexit", "R1 must have zero offset when passed to release func")


def test_tail_call_with_reference_held() -> None:
    rejects(RESERVE + "mov %r1, %r10\nmov %r7, %r1\n" "ldxdw %r1, [%r10-8]\nmov %r0, 0\nexit",
            "Unreleased reference")
    rejects("mov %r6, %r1\n" + RESERVE + "jeq %r6, 0, out\nmov %r1, %r6\n"
            "lddw %r2, 0xfa00000004\nmov %r3, 0\ncall 12\nout:\nmov %r0, 0\nexit",
            "R1 type=ringbuf_mem expected=ctx")


# -- pointer arithmetic ---------------------------------------------------------------------------

def test_pointer_arithmetic_rules() -> None:
    rejects("mul %r1, 2\nmov %r0, 0\nexit", "R1 pointer arithmetic with *= operator prohibited")
    rejects("and %r1, 2\nmov %r0, 0\nexit", "R1 bitwise operator &= on pointer prohibited")
    rejects("add32 %r1, 2\nmov %r0, 0\nexit", "R1 32-bit pointer arithmetic prohibited")
    rejects("mov %r2, 1\nsub %r2, %r1\nmov %r0, 0\nexit", "R2 tried to subtract pointer from scalar")
    accepts("mov %r0, %r10\nsub %r0, %r1\nexit")  # privileged: pointer difference is a scalar
    accepts("mov %r0, 0\njgt %r1, %r10, +1\nmov %r0, 1\nexit")  # privileged: pointer comparison
    accepts("mov %r0, %r10\nexit")  # privileged: returning a pointer


# -- calls ----------------------------------------------------------------------------------------------

def test_bpf_to_bpf_calls() -> None:
    accepts("mov %r1, %r10\nadd %r1, -8\nstdw [%r10-8], 5\ncall local f\nexit\n"
            "f:\nldxdw %r0, [%r1+0]\nexit")
    rejects("call local f\nldxdw %r0, [%r0+0]\nexit\nf:\nmov %r0, %r10\nadd %r0, -8\nexit",
            "cannot return stack pointer to the caller frame")
    rejects("call local f\nexit\nf:\ncall local f\nexit", "the call stack of 9 frames is too deep")


def test_bpf_loop_callbacks() -> None:
    ok = ("mov %r1, 10\nlddw %r2, 0xfc00000005\nmov %r3, 0\nmov %r4, 0\ncall 181\nexit\n"
          "cb:\nmov %r0, 0\nexit")
    accepts(ok)
    rejects(ok.replace("cb:\nmov %r0, 0", "cb:\nmov %r0, 2"), "should have been in [0, 1]")


def test_stack_depth_per_frame() -> None:
    # 3 frames x 400 bytes: every frame counts, as on the CI kernel (6.18 gives kprobe programs
    # no private per-subprogram stacks; kernel-checked); the first chain over 512 is reported
    big = "stdw [%r10-400], 0\n"
    rejects(big + "call local f\nexit\nf:\n" + big + "call local g\nexit\ng:\n" + big + "mov %r0, 0\nexit",
            "combined stack size of 2 calls is 800. Too large")
    # a tail call turns private stacks off: the frames share 512 bytes again (kernel-checked)
    rejects(big + "mov %r6, %r1\ncall local f\nmov %r1, %r6\nlddw %r2, 0xfa00000004\nmov %r3, 0\n"
            "call 12\nmov %r0, 0\nexit\nf:\n" + big + "mov %r0, 0\nexit",
            "combined stack size of 2 calls is 800. Too large")


# -- modes, messages, API ----------------------------------------------------------------------------

def test_modes() -> None:
    p = prog("ldxdw %r0, [%r1+168]\nexit")
    with pytest.raises(VerifierError) as ei:
        verify_program(p, [])
    e = ei.value
    assert e.insn_index == 0 and e.program == "t" and "invalid bpf_context access" in e.log
    assert "r0 = *(u64 *)(r1 + 168)" in str(e)
    assert not verify_program(p, [], mode="warn").ok
    assert verify_program(p, [], mode="off").skipped
    with pytest.raises(VerifierError):
        verify_program(p, [], mode="bogus")


def test_log_has_path_state_and_reason() -> None:
    r = check(LOOKUP + "mov %r6, %r0\nldxdw %r0, [%r6+0]\nexit")
    assert "R6 invalid mem access 'map_value_or_null'" in r.log
    assert "register state:" in r.log and "map_value_or_null" in r.log
    assert "hint:" in r.log and "NULL" in r.hint
    assert "5: if r0" not in r.log  # the failing path is linear here
    assert f"{r.insn_index}: r0 = *(u64 *)(r6 + 0)" in r.log


def test_log_level_2_traces_every_instruction() -> None:
    r = check("mov %r0, 1\nexit", log_level=2)
    assert r.ok and "0: r0 = 1" in r.log and "1: exit" in r.log


def test_random_programs_never_crash() -> None:
    """Random instruction soup is rejected or accepted, never a Python exception."""
    rng = random.Random(5)
    codes = sorted({0x07, 0x0F, 0x17, 0x1F, 0x27, 0x2F, 0x37, 0x3F, 0x47, 0x4F, 0x57, 0x5F, 0x67, 0x6F,
                    0x77, 0x7F, 0xA7, 0xAF, 0xB7, 0xBF, 0xC7, 0xCF, 0x04, 0x0C, 0xB4, 0xBC, 0x61, 0x69,
                    0x71, 0x79, 0x62, 0x6A, 0x72, 0x7A, 0x63, 0x6B, 0x73, 0x7B, 0x05, 0x15, 0x1D, 0x25,
                    0x2D, 0x55, 0x5D, 0xA5, 0xAD, 0x16, 0x1E, 0x85, 0xDB, 0xC3, 0x84, 0x87, 0xD4, 0xDC})
    for _ in range(300):
        n = rng.randrange(2, 12)
        insns = []
        for _ in range(n - 1):
            c = rng.choice(codes)
            imm = rng.choice((0, 1, 4, 8, 16, -8, 1 << 20, rng.randrange(-(1 << 31), 1 << 31)))
            if c == 0x85:
                imm = rng.choice((1, 2, 3, 5, 7, 12, 14, 16, 131, 132))
            if c in (0xDB, 0xC3):
                imm = rng.choice((0, 0x01, 0x40, 0xE1, 0xF1))
            if c in (0xD4, 0xDC):
                imm = rng.choice((16, 32, 64))
            insns.append(Instruction(c, rng.randrange(11), rng.randrange(11),
                                     rng.choice((0, 1, 2, -8, -16, 8, -1)), imm))
        insns.append(Instruction(0x95))
        r = verify_program(ProgramSpec("r", "uprobe", "uprobe", insns), MAPS, mode="warn", time_budget=5)
        assert r.ok or r.error


# -- regression tests for classes found by the kernel differential campaign ------------------------

def test_regression_atomic_needs_alignment() -> None:
    """funclat mutant: an atomic add at a misaligned map value offset (kernel: misaligned value access)."""
    rejects(LOOKUP + "jeq %r0, 0, +4\nmov %r1, 1\nlock add [%r0+4], %r1\nmov %r0, 0\nexit\nmov %r0, 0\nexit",
            "misaligned value access off 0+0+4 size 8")


def test_regression_no_callee_stack_pointer_in_caller_frame() -> None:
    """calls mutant: a bpf_loop callback stored a pointer to its own stack into the caller's frame."""
    rejects("mov %r1, 1\nlddw %r2, 0xfc00000006\nmov %r3, %r10\nadd %r3, -8\nmov %r4, 0\ncall 181\nexit\n"
            "cb:\nmov %r3, %r10\nstxdw [%r2+0], %r3\nmov %r0, 0\nexit",
            "cannot spill pointers to stack into stack frame of the caller")


def test_regression_uncalled_function_is_unreachable() -> None:
    """usdt/calls mutants: deleting the only call leaves the callee as dead code."""
    p = prog("mov %r0, 0\nexit\nmov %r0, 1\nexit")
    p.functions = {0: "t", 2: "f"}
    r = verify_program(p, MAPS, mode="warn")
    assert not r.ok and r.error == "unreachable insn 2"


def test_regression_partial_fill_of_spilled_pointer() -> None:
    """swap_reg/size mutants: reading 4 bytes of a spilled pointer (kernel: invalid size of register fill)."""
    rejects("stxdw [%r10-8], %r1\nldxw %r0, [%r10-8]\nexit", "invalid size of register fill")


def test_regression_pointer_math_checks_the_offset_first() -> None:
    """The kernel checks the scalar's bounds before the operator: unbounded min wins over '<<='."""
    rejects("ldxdw %r2, [%r1+0]\nmov %r0, %r10\nlsh %r0, %r2\nexit",
            "math between fp pointer and register with unbounded min value is not allowed")


def test_regression_map_compatibility_checked_after_arguments() -> None:
    """helper mutants: argument errors are reported before the map type mismatch, as the kernel does."""
    rejects("lddw %r1, 0xfa00000000\nmov %r2, %r10\nmov %r3, 0\ncall 131\nmov %r0, 0\nexit",
            "R2 type=fp expected=scalar")


def test_regression_jump_sequence_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    from ubpf_py.verifier import checker
    monkeypatch.setattr(checker, "JMP_SEQ_LIMIT", 3)
    text = "ldxdw %r2, [%r1+0]\nmov %r0, 0\n" + "jeq %r2, 1, +1\nadd %r0, 1\n" * 6 + "exit"
    rejects(text, "The sequence of 4 jumps is too complex.")


def test_legacy_packet_loads_are_not_for_uprobes() -> None:
    p = ProgramSpec("t", "uprobe", "uprobe", [Instruction(0x30, imm=0), *assemble("mov %r0, 0\nexit")])
    r = verify_program(p, [], mode="warn")
    assert r.error == "BPF_LD_[ABS|IND] instructions not allowed for this program type"
