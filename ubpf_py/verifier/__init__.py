"""The bytecode verifier: prove a uprobe program safe before it runs.

``verify_program`` runs the structural checks (``structure``) and then the
abstract interpreter (``checker``) over the spec-level instructions of one
program.  Modes: ``strict`` raises ``VerifierError`` on rejection, ``warn``
returns a report with ``ok=False`` (the runtime's memory checks still stop
faults), ``off`` skips verification.  ``check_object`` verifies every program of
an ELF object for ``ubpf-run --check``.

Semantics are the kernel's for a privileged (CAP_BPF + CAP_PERFMON) loader of
a kprobe program on Linux 6.18, checked by a differential campaign
(tests/verifier_mutations.py).  Deliberate differences:

* Precision: the kernel finds which scalars must be compared exactly when
  pruning by backtracking; we use a static over-approximation
  (``structure.precision_demand``) in which a branch's operands count only once
  some path found that branch decided and stack slots only through accesses some
  path made with a stack pointer (or a spilled constant map key a lookup relied on),
  and a liveness that is static for registers (a helper reads only its prototype's
  parameters, as in the kernel's compute_live_registers) and for stack slots uses the
  slots each helper call and stack-pointer access was seen to read.  Sound (a
  checkpoint prunes only once every path below it is finished, so everything its
  paths decided or accessed is known); it may explore more or less than the kernel
  (libbpf-tools: 29.6k instructions against the kernel's 33.0k over 134 programs,
  benchmarks/verifier_speed.py; tests/test_verifier_precision.py).
* Callbacks (bpf_loop, for_each_map_elem): scalars that keep changing between
  iterations are widened to unknown, so exploration converges (the kernel
  compares imprecise scalars as equal).  Sound; may reject a program whose
  callback needs an exact value that changes every iteration.
* Reserved fields are checked up front; writes to r10 and encodings
  (``isa.validate``) only where a path reaches them, like the kernel.  The
  report lists the reached instructions: the loader turns the rest into
  ``ja -1`` (``sanitize_dead_code``) as the kernel does.
* A wall-clock budget (default 30 s) on top of the 1,000,000-instruction limit.
* ``may_goto`` is verified as the kernel does (exit side first, the loop body one
  may_goto depth deeper with changed imprecise scalars widened, an iteration pruned
  against an earlier one at another depth).  The engines run the kernel's counted
  budget (BPF_MAX_LOOPS fall-throughs per call, then the jump is taken); an x86-64
  kernel of 6.15 or later JITs a *timed* may_goto instead (about 250 ms per call).
* The kernel fails with an internal "verifier bug: No program to jit" when a
  callback's address is taken but the callback is never verified; we accept.
* Global functions are verified alone against their BTF signature like the
  kernel's; ``__arg_trusted`` (kernel objects) and ``__arg_arena`` arguments
  are refused (not supported).
* ``bpf_get_current_task_btf`` returns a typed kernel pointer (PTR_TO_BTF_ID,
  ``btfptr``): direct loads through it and the pointers loaded from it are checked
  as the kernel does; a ``struct task_struct *`` argument (bpf_copy_from_user_task,
  bpf_task_pt_regs, bpf_get_task_stack) is checked as the kernel's ARG_PTR_TO_BTF_ID;
  a pointer member to no struct loads as ``rdonly_untrusted_mem`` (6.17+; loads
  through it read 0 here); other helpers that take BTF-typed arguments stay refused.
* Sleepable programs (``uprobe.s``) follow the kernel's extra rules (``sleepable``:
  the map types they may use; sleepable-only helpers; untrusted loaded pointers),
  checked against the kernel loading them with BPF_F_SLEEPABLE
  (tests/test_verifier_sleepable.py).
* Not modelled (refused where reached): other BTF-typed kernel pointers (kptrs,
  dynptrs, task storage, spin locks, timers), kfuncs, reads of ``struct bpf_map`` fields other than map_type, key_size,
  value_size, max_entries, map_extra and map_flags (``mapfields``: those become the
  loaded map's values), helpers on map types other than
  ``protos.MODELLED_MAP_TYPES`` (sockmap, devmap, local storage, ...).
  Comparison with the kernel's own verifier tests:
  ``benchmarks/verifier_selftests.py``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from ubpf_py.errors import InvalidInstructionError, NotSupportedError, VerifierError
from ubpf_py.isa.instruction import Instruction
from ubpf_py.obj.spec import MapSpec, ProgramSpec
from ubpf_py.verifier import log as L
from ubpf_py.verifier.btfptr import notes as btf_notes
from ubpf_py.verifier.btfptr import rewrites as btf_rewrites
from ubpf_py.verifier.checker import COMPLEXITY_LIMIT, Checker, Failure, describe_regs
from ubpf_py.verifier.globalfuncs import global_functions, hidden_functions
from ubpf_py.verifier.mapfields import rewrites as map_field_rewrites
from ubpf_py.verifier.memory import Reject
from ubpf_py.verifier.sleepable import check_maps as check_sleepable_maps
from ubpf_py.verifier.structure import StructureError, analyse

MODES = ("strict", "warn", "off")


@dataclass
class VerifierReport:
    """The verdict on one program."""

    program: str
    ok: bool
    log: str = ""
    #: the kernel-style one-line reason (empty when accepted)
    error: str = ""
    #: plain-words explanation and fix
    hint: str = ""
    insn_index: int | None = None
    #: instruction text (LLVM syntax) and C source line of the failing instruction
    insn_text: str = ""
    source: str = ""
    processed: int = 0
    states: int = 0
    seconds: float = 0.0
    skipped: bool = False
    #: bytes of stack per function start
    stack_depth: dict[int, int] = field(default_factory=dict)
    #: instructions some path reaches (accepted programs); the rest is dead code
    reachable: frozenset[int] | None = None
    #: accepted programs: loads of struct bpf_map fields -> the move of the loaded map's value
    #: that replaces them (``mapfields``; the loader applies it with ``sanitize_dead_code``)
    rewrites: dict[int, Instruction] = field(default_factory=dict)
    #: accepted programs: what the loader warns about (fields read directly that have no value here)
    notes: list[str] = field(default_factory=list)

    @property
    def message(self) -> str:
        """One line: where, what (kernel words), why/fix."""
        if self.ok:
            return f"{self.program}: ok"
        where = f" at insn {self.insn_index}" if self.insn_index is not None else ""
        text = f" `{self.insn_text}`" if self.insn_text else ""
        src = f" [{self.source}]" if self.source else ""
        hint = f" ({self.hint})" if self.hint else ""
        return f"program '{self.program}' rejected{where}{text}: {self.error}{hint}{src}"


def verify_program(prog: ProgramSpec, maps: list[MapSpec], *, mode: str = "strict", log_level: int = 1,
                   btf: object | None = None, time_budget: float = 30.0,
                   test_mem_size: int | None = None, hidden: frozenset[str] | None = None) -> VerifierReport:
    """Verify one program; see the module docstring for the modes.

    ``time_budget`` (seconds) bounds the walk in wall-clock time on top of the
    kernel's 1,000,000-instruction complexity limit (Python is slower than C).
    ``test_mem_size`` replaces the pt_regs context by a writable buffer of that
    many bytes in r1 and its length in r2 (how bpf_conformance runs programs).
    ``hidden`` names ``__hidden`` global functions, verified like static ones as after
    libbpf's loading (``globalfuncs.hidden_functions(object path)``); by default they
    are read from the object file the BTF was loaded from.
    """
    if mode not in MODES:
        raise VerifierError(f"unknown verifier mode {mode!r}: use strict, warn or off")
    if mode == "off":
        return VerifierReport(prog.name, True, log="verification skipped (mode off)\n", skipped=True)
    t0 = time.perf_counter()
    insns = prog.instructions
    fail: Failure | None = None
    ck: Checker | None = None
    try:
        if prog.sleepable:
            check_sleepable_maps(insns, maps)
        cfg = analyse(insns)
    except StructureError as e:
        fail = Failure(e.msg, e.insn, e.hint, [], None, None)
    except NotSupportedError as e:
        fail = Failure(str(e), 0, "", [], None, None)
    if fail is None:
        ck = Checker(prog, maps, cfg, global_functions(prog, btf, _hidden(btf) if hidden is None else hidden), log_level, time_budget)
        ck.test_mem_size = test_mem_size
        fail = ck.run()
    reachable: frozenset[int] | None = None
    rewrites: dict[int, Instruction] = {}
    if fail is None and ck is not None:
        # encodings are checked where the kernel checks them: on the instructions it reaches
        reachable = frozenset(i for i, b in enumerate(ck.seen) if b)
        rewrites = map_field_rewrites(insns, ck.map_field_loads)
        try:
            rewrites.update(btf_rewrites(insns, ck.btf_loads))
        except Reject as e:
            fail = Failure(e.msg, 0, e.hint, [], None, None)
        try:
            _isa_validate(sanitize_dead_code(insns, reachable, rewrites))
        except InvalidInstructionError as e:
            fail = Failure(e.reason, e.index, "", [], None, None)
        except NotSupportedError as e:
            fail = Failure(str(e), 0, "", [], None, None)
    seconds = time.perf_counter() - t0
    report = _report(prog, fail, ck, seconds)
    if report.ok:
        report.reachable = reachable
        report.rewrites = rewrites
        report.notes = btf_notes(ck.btf_loads) if ck is not None else []
    if not report.ok and mode == "strict":
        raise VerifierError(report.message, log=report.log, program=prog.name, insn_index=report.insn_index)
    return report


def _hidden(btf: object | None) -> frozenset[str]:
    """Hidden functions of the object file ``btf`` came from (its source is "PATH .BTF")."""
    src = getattr(btf, "source", "")
    if isinstance(src, str) and src.endswith(" .BTF"):
        return hidden_functions(src[:-5])
    return frozenset()


#: what dead instructions become: "ja -1", the kernel's sanitize_dead_code trap
DEAD_INSN = Instruction(0x05, off=-1)


def sanitize_dead_code(insns: list[Instruction], reachable: frozenset[int] | set[int],
                       rewrites: dict[int, Instruction] | None = None) -> list[Instruction]:
    """Replace every instruction no path reaches by ``ja -1``, as the kernel does.

    Code that constants or frozen ``.rodata`` make dead (a helper the runtime does not
    have, a kfunc call, a write to r10) is then neither compiled nor a reason to refuse
    the program; the engines never execute it.  ``rewrites`` (``VerifierReport.rewrites``)
    replaces the loads of ``struct bpf_map`` fields by the loaded map's values.
    """
    out = list(insns) if len(reachable) == len(insns) else \
        [ins if i in reachable else DEAD_INSN for i, ins in enumerate(insns)]
    for i, ins in (rewrites or {}).items():
        out[i] = ins
    return out


def _isa_validate(insns: list) -> None:
    try:
        from ubpf_py.isa.validate import validate
    except ImportError:  # pragma: no cover
        return
    validate(insns)


def _report(prog: ProgramSpec, fail: Failure | None, ck: Checker | None, seconds: float) -> VerifierReport:
    processed = ck.stats.processed if ck else 0
    states = ck.stats.states if ck else 0
    lines: list[str] = []
    if ck and ck.trace:
        lines.extend(ck.trace)
    depth = dict(ck.stats.stack_depth) if ck else {}
    stack_line = "stack depth " + "+".join(str(depth[k]) for k in sorted(depth)) if depth else ""
    stats = (f"processed {processed} insns (limit {COMPLEXITY_LIMIT}) "
             f"max_states_per_insn {ck.stats.max_states_per_insn if ck else 0} total_states {states}")
    if fail is None:
        lines.append(stats)
        if stack_line:
            lines.append(stack_line)
        return VerifierReport(prog.name, True, "\n".join(lines) + "\n", processed=processed, states=states,
                              seconds=seconds, stack_depth=depth)
    n = len(prog.instructions)
    pc = fail.insn if 0 <= fail.insn < n else None
    insn_text = L.format_insn(prog.instructions[pc], pc) if pc is not None else ""
    src = L.source_line(prog, pc) if pc is not None else ""
    if fail.trail is not None and not (ck and ck.trace):
        lines.append(f"path to the failing instruction (last steps, function {L.function_of(prog, pc or 0)}):")
        lines.extend(L.trail_lines(prog, fail.trail))
    if pc is not None and not (fail.trail is not None and fail.trail[0] == pc):
        if src:
            lines.append(f"; {src}")
        lines.append(f"{pc}: {insn_text}")
    if fail.state is not None:
        lines.append(f"register state: {describe_regs(fail.state)}")
    lines.append(fail.msg)
    lines.extend(fail.extra)
    if fail.hint:
        lines.append(f"hint: {fail.hint}")
    lines.append(stats)
    return VerifierReport(prog.name, False, "\n".join(lines) + "\n", error=fail.msg, hint=fail.hint,
                          insn_index=pc, insn_text=insn_text, source=src, processed=processed,
                          states=states, seconds=seconds, stack_depth=depth)


def check_object(path: str | Path, mode: str = "warn", log_level: int = 1) -> list[VerifierReport]:
    """Load an object (no privileges, nothing attached) and verify every program.

    Never raises for a rejected program (the reports say it); errors loading the
    object itself propagate as ObjectLoadError.
    """
    from ubpf_py.obj.elf import load_object

    return check_spec(load_object(str(path)), mode, log_level)


def check_spec(obj, mode: str = "warn", log_level: int = 1) -> list[VerifierReport]:
    """``check_object`` for an already loaded ``ObjectSpec``."""
    hidden = hidden_functions(str(obj.path)) if getattr(obj, "path", None) else frozenset()
    out = []
    for prog in obj.programs.values():
        if mode == "off":
            out.append(VerifierReport(prog.name, True, skipped=True))
            continue
        out.append(verify_program(prog, obj.maps, mode="warn", log_level=log_level, btf=obj.btf,
                                  hidden=hidden))
    return out


def format_verdict(report: VerifierReport) -> str:
    """One line per program for ``ubpf-run --check``."""
    if report.skipped:
        return f"{report.program}: SKIPPED (verifier off)"
    if report.ok:
        return (f"{report.program}: OK ({report.processed} insns processed, {report.states} states, "
                f"{report.seconds * 1000:.1f} ms)")
    return f"{report.program}: REJECTED {report.message}"


__all__ = [
    "DEAD_INSN",
    "MODES",
    "VerifierReport",
    "check_object",
    "check_spec",
    "format_verdict",
    "hidden_functions",
    "sanitize_dead_code",
    "verify_program",
]
