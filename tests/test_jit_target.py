"""Code compiled for the traced process (``vm.jit.target``) computes what the interpreter does.

The object is meant for the target; here the same IR runs in this process through MCJIT with
the general-registers-only machine, the runtime helpers bound to Python callbacks, so the
whole conformance suite checks the target-mode code generator: same r0 as the reference
interpreter (r1 = the test's memory, r2 = 0: a target entry passes only the context).
"""

from __future__ import annotations

import ctypes
import subprocess
import tempfile
from pathlib import Path

import llvmlite.binding as llvm
import pytest
from conformance_data import data_files, parse_file
from engines import make_env
from paths import CONFORMANCE

from ubpf_py.errors import NotSupportedError, UbpfError
from ubpf_py.vm.interpreter import Interpreter
from ubpf_py.vm.jit import target as T

M64 = (1 << 64) - 1
POSITIVE = data_files(CONFORMANCE / "tests") if (CONFORMANCE / "tests").is_dir() else []
ENTRY = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint64)
HELPER = ctypes.CFUNCTYPE(ctypes.c_uint64, *([ctypes.c_uint64] * 6))
_calls: list[tuple[int, ...]] = []


def _helper5(r1, r2, r3, r4, r5, hf):   # the conformance runtime's helper 5 returns r1
    _calls.append((r1, hf))
    return r1


_HELPER5 = HELPER(_helper5)
llvm.add_symbol("ubpf_helper_5", ctypes.cast(_HELPER5, ctypes.c_void_p).value)
_engine = None


def _run_in_process(insns, name: str, ctx: int, hf: int) -> int:
    global _engine
    text, _plan = T.target_ir(insns, "p_" + name.replace("-", "_"), {})
    tm = T._machine()
    mod = llvm.parse_assembly(text, T._ctx)
    mod.triple, mod.data_layout = tm.triple, str(tm.target_data)
    if _engine is None:
        _engine = llvm.create_mcjit_compiler(llvm.parse_assembly("", T._ctx), tm)
    _engine.add_module(mod)
    _engine.finalize_object()
    addr = _engine.get_function_address("p_" + name.replace("-", "_") + "_tentry")
    return ENTRY(addr)(ctx, hf)


@pytest.mark.parametrize("path", POSITIVE, ids=[p.stem for p in POSITIVE])
def test_target_code_matches_interpreter(path: Path) -> None:
    test = parse_file(path)
    if test.error is not None:
        pytest.skip("error case: target code only runs verified programs")
    insns = test.program()
    te = make_env(test.mem)
    try:
        expected = Interpreter(insns, te.env).run(te.mem_addr, 0) & M64
    except UbpfError:
        pytest.skip("faults with r2 = 0 in the interpreter (program reads its length)")
    try:
        got = _run_in_process(insns, path.stem, te.mem_addr, 0xABC0)
    except NotSupportedError as e:
        assert "traced process" in str(e)
        return
    assert got == expected


def test_helpers_get_the_hit_frame_as_sixth_argument() -> None:
    from ubpf_py.isa.asm import assemble

    _calls.clear()
    got = _run_in_process(assemble("mov %r1, 7\ncall 5\nadd %r0, 1\nexit\n"), "hf_check", 0, 0x1234560)
    assert got == 8 and _calls == [(7, 0x1234560)]


def test_unsupported_in_target_are_named() -> None:
    from ubpf_py.isa.asm import assemble

    with pytest.raises(NotSupportedError, match="a tail call through a prog array not known at compile time"):
        T.target_ir(assemble("call 12\nmov %r0, 0\nexit\n"), "tc", {})


def test_object_has_no_vector_instructions_and_only_pic_relocations() -> None:
    """The trampolines save general registers only: target code must not touch xmm/ymm."""
    from ubpf_py.isa.asm import assemble

    # a copy loop LLVM would vectorise or turn into memcpy on a normal machine
    src = "".join(f"ldxdw %r3, [%r1+{8 * i}]\nstxdw [%r10-{8 * (i + 1)}], %r3\n" for i in range(32))
    code = T.compile_for_target(assemble(src + "call 5\nmov %r0, 0\nexit\n"), "vec", {})
    with tempfile.TemporaryDirectory() as d:
        obj = Path(d) / "p.o"
        obj.write_bytes(code.obj)
        dis = subprocess.run(["objdump", "-dr", str(obj)], capture_output=True, text=True).stdout
    assert "xmm" not in dis and "ymm" not in dis and "memcpy" not in dis
    relocs = {line.split()[1] for line in dis.splitlines() if "R_X86_64" in line}
    assert relocs <= {"R_X86_64_PLT32", "R_X86_64_PC32"}, relocs
    assert code.helper_ids == (5,)


def test_for_each_on_a_map_the_runtime_cannot_walk_is_named() -> None:
    """bpf_for_each_map_elem calls the runtime's walker; on a constant map it cannot iterate
    (anything but ARRAY / HASH-family descriptors) the program stays in the tracer."""
    from ubpf_py.isa.asm import assemble
    from ubpf_py.maps import consts as C
    from ubpf_py.maps import create_map
    from ubpf_py.obj.spec import MapSpec

    q = create_map(MapSpec("q", C.QUEUE, 0, 8, 4))
    a = create_map(MapSpec("a", C.ARRAY, 4, 8, 4))
    prog = "lddw %r1, {h}\nmov %r2, 0\nmov %r3, 0\nmov %r4, 0\ncall 164\nexit\n"
    maps = {q.handle_addr: q, a.handle_addr: a}
    with pytest.raises(NotSupportedError, match="bpf_for_each_map_elem on a map the in-target runtime cannot walk"):
        T.target_ir(assemble(prog.format(h=q.handle_addr)), "fe_q", maps)
    text, _plan = T.target_ir(assemble(prog.format(h=a.handle_addr)), "fe_a", maps)
    assert "call i64 @ubpf_for_each_elem(" in text and "declare i64 @ubpf_for_each_elem" in text
