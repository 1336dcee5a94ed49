"""Every bpf_conformance test on every engine, plus the suite's negative tests.

Each ``tests/*.data`` file is its own test case per engine (``ENGINES``): the
program gets the file's ``mem`` as r1/r2 and its r0 must equal ``result`` as
an unsigned 64-bit value (the suite's comparison).  Files with both ``asm`` and
``raw`` also check the assembler against the raw encoding.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conformance_data import ConformanceTest, data_files, parse_file
from engines import ENGINES, make_env
from paths import CONFORMANCE

from ubpf_py.errors import AssemblerError, InvalidInstructionError, UbpfError
from ubpf_py.isa.asm import assemble
from ubpf_py.isa.validate import validate
from ubpf_py.vm.interpreter import Interpreter

M64 = (1 << 64) - 1
TESTS_DIR = CONFORMANCE / "tests"
NEGATIVE_DIR = CONFORMANCE / "negative"
POSITIVE = data_files(TESTS_DIR) if TESTS_DIR.is_dir() else []
NEGATIVE = data_files(NEGATIVE_DIR) if NEGATIVE_DIR.is_dir() else []


#: engine variants that only make sense for valid programs (no memory checks)
UNCHECKED = {"interp-unchecked": lambda insns, env: Interpreter(insns, env, check_memory=False)}


def _run(engine: str, test: ConformanceTest) -> int:
    te = make_env(test.mem)
    factory = ENGINES[engine] if engine in ENGINES else UNCHECKED[engine]
    prog = factory(test.program(), te.env)
    return prog.run(te.mem_addr, te.mem_len) & M64


def test_suite_is_complete(conformance_dir: Path) -> None:
    assert len(POSITIVE) == 313, "bpf_conformance tests/ should hold 313 files"


@pytest.mark.parametrize("path", POSITIVE, ids=[p.stem for p in POSITIVE])
@pytest.mark.parametrize("engine", [*sorted(ENGINES), *UNCHECKED])
def test_conformance(engine: str, path: Path) -> None:
    test = parse_file(path)
    assert test.unknown_directive is None
    if test.error is not None:
        with pytest.raises(UbpfError):
            _run(engine, test)
        return
    assert test.result is not None, f"{path.name} has neither result nor error"
    assert _run(engine, test) == test.result & M64


RAW_AND_ASM = [p for p in POSITIVE if (lambda t: t.raw is not None and t.asm)(parse_file(p))]


@pytest.mark.parametrize("path", RAW_AND_ASM, ids=[p.stem for p in RAW_AND_ASM])
def test_assembler_matches_raw(path: Path) -> None:
    test = parse_file(path)
    assert assemble(test.asm) == test.raw_instructions()


def test_every_asm_file_assembles_and_validates() -> None:
    for path in POSITIVE:
        test = parse_file(path)
        if test.asm:
            validate(assemble(test.asm))


# --- the suite's negative tests ------------------------------------------------

UNUSED_FIELD = [p for p in NEGATIVE if p.name.startswith("unused-")]


@pytest.mark.parametrize("path", UNUSED_FIELD, ids=[p.stem for p in UNUSED_FIELD])
def test_nonzero_unused_field_is_rejected(path: Path) -> None:
    test = parse_file(path)
    insns = test.raw_instructions()
    assert insns is not None and test.error is not None
    with pytest.raises(InvalidInstructionError) as info:
        validate(insns)
    assert info.value.index == 0
    for engine, factory in ENGINES.items():
        with pytest.raises(InvalidInstructionError):
            factory(insns, make_env().env)
            pytest.fail(f"engine {engine} accepted {path.name}")


# expected assembler errors: the suite's tests.cmake regular expressions
ASM_ERRORS = {
    "invalid_register": "Invalid register: %r50",
    "invalid_offset": "Failed to decode register and offset: %r1",
    "invalid_offset_range": "Offset out of 16-bit range: .*0x10000",
    "invalid_imm32_hex_range": "Immediate out of 32-bit range: 0x100000000",
    "invalid_imm32_dec_range": "Immediate out of 32-bit range: 2147483648",
    "invalid_operand_count": "Invalid number of operands for mnemonic: lddw",
    "invalid_label": "Invalid label: NOT_A_LABEL",
    "invalid_mnemonic": "Invalid mnemonic: ldxq",
    "invalid_lock": "Invalid number of operands for lock",
    "invalid_lock2": "Invalid number of operands for lock",
}


@pytest.mark.parametrize("name", sorted(ASM_ERRORS))
def test_assembler_negative(name: str, conformance_dir: Path) -> None:
    test = parse_file(NEGATIVE_DIR / f"{name}.data")
    with pytest.raises(AssemblerError) as info:
        assemble(test.asm)
    assert re.search(ASM_ERRORS[name], str(info.value))
    assert str(info.value).startswith("line ")


@pytest.mark.parametrize("name", ["empty", "empty_instructions", "invalid_unknown_directive"])
def test_files_without_instructions(name: str, conformance_dir: Path) -> None:
    test = parse_file(NEGATIVE_DIR / f"{name}.data")
    assert test.raw is None
    assert assemble(test.asm) == []
    if name == "invalid_unknown_directive":
        assert test.unknown_directive == "-- Unknown directive"


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_wrong_expected_value_is_detected(engine: str, conformance_dir: Path) -> None:
    """incorrect_return_value_high_bits.data expects a wrong r0; we must not produce it."""
    test = parse_file(NEGATIVE_DIR / "incorrect_return_value_high_bits.data")
    got = _run(engine, test)
    assert got == 0x8877665544332211
    assert got != test.result
