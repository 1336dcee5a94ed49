"""The verifier on real objects: the uprobe corpus, the invalid/ set, bpf_conformance.

* every program of the corpus is accepted;
* every program of ``invalid/`` gets the kernel's recorded verdict, and a
  rejection names the same problem (the kernel's error line is contained in ours);
* every bpf_conformance program is accepted under a test context (r1 = the
  test's memory), except those the kernel would refuse too.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from kernel_verdict import invalid_case_here
from paths import CORPUS

from ubpf_py.helpers.protos import _NOT_FOR_KPROBE, KPROBE_ALLOWED, PROTOS
from ubpf_py.isa.asm import assemble
from ubpf_py.obj.spec import ProgramSpec
from ubpf_py.verifier import check_object, format_verdict, verify_program

INVALID_MANIFEST = CORPUS / "invalid" / "manifest.json"


def _objects(build: Path) -> list[Path]:
    objs = sorted(build.glob("*.bpf.o"))
    assert objs, f"no corpus objects in {build}"
    return objs


def test_every_corpus_program_is_accepted(corpus_build: Path) -> None:
    from ubpf_py.obj.elf import load_object

    n = 0
    for path in _objects(corpus_build):
        obj = load_object(str(path))
        for prog in obj.programs.values():
            r = verify_program(prog, obj.maps, mode="warn", btf=obj.btf)
            assert r.ok, f"{path.name}:{prog.name} rejected:\n{r.log}"
            assert r.processed > 0
            n += 1
    assert n >= 20


def _invalid_cases() -> list[dict]:
    if not INVALID_MANIFEST.is_file():
        return []
    return json.loads(INVALID_MANIFEST.read_text())["programs"]


@pytest.mark.parametrize("case", _invalid_cases(), ids=lambda c: c["name"])
def test_invalid_set_matches_kernel_verdicts(corpus_build: Path, case: dict) -> None:
    from ubpf_py.obj.elf import load_object

    case = invalid_case_here(corpus_build, case)
    obj = load_object(str(corpus_build / "invalid" / f"{case['name']}.o"))
    (prog,) = obj.programs.values()
    r = verify_program(prog, obj.maps, mode="warn", btf=obj.btf)
    if case["verdict"] == "accept":
        assert r.ok, f"kernel accepts {case['name']} ({case.get('note', '')}) but we reject:\n{r.log}"
        return
    assert not r.ok, f"kernel rejects {case['name']} with {case['kernel_error']!r} but we accept"
    assert case["kernel_error"] in r.error, f"kernel said {case['kernel_error']!r}, we said {r.error!r}"
    # the better-than-the-kernel parts: where, what instruction, and a hint
    assert r.insn_index is not None and r.insn_text and r.hint
    assert case["kernel_error"] in r.log


def test_rejection_names_the_c_source_line(corpus_build: Path) -> None:
    from ubpf_py.obj.elf import load_object

    obj = load_object(str(corpus_build / "invalid" / "map_null_deref.o"))
    (prog,) = obj.programs.values()
    r = verify_program(prog, obj.maps, mode="warn", btf=obj.btf)
    assert "return *v;" in r.source and "map_null_deref.c" in r.source
    assert "return *v;" in r.message


def test_check_object_lines(corpus_build: Path) -> None:
    reports = check_object(corpus_build / "calls.bpf.o")
    assert {r.program for r in reports} == {"tail_even", "tail_odd", "compute_entry"}
    lines = [format_verdict(r) for r in reports]
    assert all(": OK (" in ln for ln in lines)
    bad = check_object(corpus_build / "invalid" / "ringbuf_leak.o")
    assert not bad[0].ok
    assert "REJECTED" in format_verdict(bad[0]) and "Unreleased reference" in format_verdict(bad[0])


def test_protos_cover_every_runtime_helper() -> None:
    from ubpf_py.helpers import SUPPORTED_HELPERS

    missing = sorted(h for h in SUPPORTED_HELPERS if h not in PROTOS)
    assert not missing, f"helpers without a verifier prototype: {missing}"
    # the runtime implements a few helpers the kernel refuses to kprobe programs (protos._NOT_FOR_KPROBE);
    # the verifier follows the kernel
    assert KPROBE_ALLOWED | {93, 94} | _NOT_FOR_KPROBE >= SUPPORTED_HELPERS


# -- bpf_conformance under a test context ------------------------------------------------------

#: programs the kernel verifier refuses as well: shift immediates outside [0, bits) and callx
_KERNEL_REFUSES = re.compile(r"^(arsh|lsh|rsh)(32|64)-imm-(high|neg)$|^callx$")


def _sections(text: str) -> dict[str, str]:
    return dict(re.findall(r"^-- (\w+)\n(.*?)(?=^-- |\Z)", text, re.S | re.M))


def test_conformance_programs_accepted(conformance_dir: Path) -> None:
    files = sorted((conformance_dir / "tests").glob("*.data"))
    assert files
    rejected = {}
    accepted = 0
    for f in files:
        secs = _sections(f.read_text())
        mem = bytes.fromhex("".join(secs.get("mem", "").split()))
        prog = ProgramSpec(f.stem, "test", "test", assemble(secs.get("asm", "")))
        r = verify_program(prog, [], mode="warn", test_mem_size=len(mem), time_budget=10)
        if r.ok:
            accepted += 1
        else:
            rejected[f.stem] = r.error
    unexpected = {k: v for k, v in rejected.items() if not _KERNEL_REFUSES.match(k)}
    assert not unexpected, unexpected
    assert accepted >= 290
    assert all(("invalid shift" in v or "unknown opcode" in v) for v in rejected.values())
