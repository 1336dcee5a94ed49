"""Turn an inert ``ObjectSpec`` into live maps and runnable programs.

This is the only place that joins the loader, the verifier, the maps, the
helpers and the engines.  The order mirrors what libbpf + the kernel do:
CO-RE against the target BTF, verification of the spec-level bytecode, map
creation (global data included), relocation of map references to host
addresses, then compilation/preparation for the chosen engine.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ubpf_py.abi.bpf import MapType
from ubpf_py.abi.kernel import PT_REGS_SIZE
from ubpf_py.errors import (
    NotSupportedError,
    ObjectLoadError,
    RelocationError,
    UbpfError,
    VerifierError,
    VMFault,
)
from ubpf_py.isa.instruction import Instruction
from ubpf_py.isa.opcodes import (
    BPF_PSEUDO_MAP_IDX,
    BPF_PSEUDO_MAP_IDX_VALUE,
    LDDW,
)
from ubpf_py.obj.core import POISON_HELPER
from ubpf_py.obj.spec import MapSpec, ObjectSpec, ProgramSpec
from ubpf_py.sysinfo import possible_cpus
from ubpf_py.verifier.btfptr import KernelFieldWarning
from ubpf_py.vm.budget import DEFAULT_BUDGET
from ubpf_py.vm.env import ExecEnv, HitContext
from ubpf_py.vm.memory import HostBuffer, MemoryMap, Region

ENGINES = ("jit", "interp")
VERIFIER_MODES = ("strict", "warn", "off")
MAP_TYPE_PROG_ARRAY = MapType.PROG_ARRAY
MAP_TYPE_ARRAY_OF_MAPS = MapType.ARRAY_OF_MAPS
MAP_TYPE_HASH_OF_MAPS = MapType.HASH_OF_MAPS


@dataclass
class LoadedProgram:
    """A program ready to run: its spec, live bytecode and engine executable."""

    spec: ProgramSpec
    instructions: list[Instruction]
    executable: Any
    env: ExecEnv
    #: verifier report (None when the verifier is off)
    report: Any = None
    #: statistics kept by the caller of ``run``
    runs: int = 0

    @property
    def name(self) -> str:
        return self.spec.name

    def run(self, ctx_addr: int) -> int:
        """Run once with r1 = ctx_addr; resets the per-run tail-call budget."""
        self.env.tail_call_count = 0
        self.runs += 1
        return self.executable.run(ctx_addr)


@dataclass
class Collection:
    """Live maps and programs of one object, sharing one ``ExecEnv``."""

    spec: ObjectSpec
    maps: dict[str, Any]
    programs: dict[str, LoadedProgram]
    env: ExecEnv
    #: maps in spec order (index = the MAP_IDX used in spec-level bytecode)
    map_list: list[Any] = field(default_factory=list)
    #: pt_regs buffer the probe engine copies registers into (also registered as a region)
    ctx_buffer: HostBuffer | None = None

    @classmethod
    def load(cls, spec: ObjectSpec, *, engine: str = "jit", verifier: str = "strict",
             programs: Iterable[str] | None = None, target_btf: Any = None,
             check_memory: bool = True, ncpus: int | None = None,
             arena: Any = None, budget: int | None = DEFAULT_BUDGET) -> Collection:
        """Load ``spec`` (or only the named ``programs`` and what they reference).  With
        ``arena`` (an ``intarget.arena.SharedArena``) every map's storage is allocated in
        it, so the same maps serve programs running inside the target.
        ``budget``: per-run bound (``vm.budget``) of programs the verifier did not accept
        (``verifier`` "off", or "warn" with a rejection); None or 0 = unbounded."""
        if engine not in ENGINES:
            raise UbpfError(f"unknown engine {engine!r}: use one of {', '.join(ENGINES)}")
        if verifier not in VERIFIER_MODES:
            raise UbpfError(f"unknown verifier mode {verifier!r}: use one of {', '.join(VERIFIER_MODES)}")
        wanted = list(spec.programs) if programs is None else list(programs)
        for name in wanted:
            if name not in spec.programs:
                raise ObjectLoadError(f"{spec.path}: no program named {name!r} "
                                      f"(programs: {', '.join(spec.programs) or 'none'})")

        from ubpf_py.helpers import build_helper_table, check_helpers
        from ubpf_py.maps import create_map
        from ubpf_py.obj.globals import freeze
        from ubpf_py.verifier import sanitize_dead_code

        ncpus = ncpus or possible_cpus()
        memory = MemoryMap()
        env = ExecEnv(memory=memory, hit=HitContext())
        ctx_buffer = HostBuffer(PT_REGS_SIZE)
        memory.add(Region.of(ctx_buffer, "context (struct pt_regs)", writable=False))

        # programs: CO-RE, helper check, verification on spec-level bytecode
        prepared: dict[str, tuple[ProgramSpec, list[Instruction], Any]] = {}
        poisons: dict[str, dict[int, str]] = {}
        for name in _with_tail_call_targets(spec, wanted):
            prog = spec.programs[name]
            poisoned = poisons[name] = {}
            insns = _apply_core(spec, prog, target_btf, poisoned)
            kept = [i for pc, i in enumerate(insns) if pc not in poisoned]
            try:
                # the verifier sees the poisoned program: reaching a poisoned call is the error
                report = _verify_poisoned(spec, prog, insns, verifier, poisoned)
            except VerifierError:
                check_helpers(kept)  # an unknown helper is still named before the verifier's verdict
                raise
            if report is not None and report.ok:
                for note in report.notes:
                    warnings.warn(f"program '{name}': {note}", KernelFieldWarning, stacklevel=2)
            if report is not None and report.ok and report.reachable is not None:
                # dead code as the kernel sees it is never run: what only it uses (unknown helpers,
                # poisoned CO-RE instructions behind bpf_core_field_exists) is not needed
                insns = sanitize_dead_code(insns, report.reachable, report.rewrites)
                kept = [i for pc, i in enumerate(insns) if pc not in poisoned]
            check_helpers(kept)
            prepared[name] = (prog, insns, report)

        # maps (all of them: globals and maps are shared between programs)
        live_maps: list[Any] = []
        for mspec in spec.maps:
            live = create_map(mspec, ncpus=ncpus, alloc=arena)
            live_maps.append(live)
            env.maps_by_addr[live.handle_addr] = live
            for region in live.regions():
                memory.add(region)
        env.helpers = build_helper_table(env)
        if any(poisons.values()):
            env.helpers[POISON_HELPER] = _poison_call(poisons)

        loaded: dict[str, LoadedProgram] = {}
        for name, (prog, insns, report) in prepared.items():
            live_insns = relocate_maps(insns, spec.maps, live_maps, prog.name)
            unverified = report is None or not report.ok
            executable = _make_executable(engine, live_insns, env, check_memory, name,
                                          budget if unverified else None)
            loaded[name] = LoadedProgram(prog, live_insns, executable, env, report)

        _init_slots(spec, live_maps, loaded)
        by_name = {m.spec.name: m for m in live_maps}
        env.resolve_tail_call = _tail_call_resolver(env)
        freeze(spec)  # like libbpf: .rodata/.kconfig cannot be changed once loaded
        return cls(spec, by_name, loaded, env, live_maps, ctx_buffer)

    def program(self, name: str) -> LoadedProgram:
        try:
            return self.programs[name]
        except KeyError:
            raise UbpfError(f"no program named {name!r} in {self.spec.path} "
                            f"(programs: {', '.join(self.programs)})") from None


def _with_tail_call_targets(spec: ObjectSpec, wanted: list[str]) -> list[str]:
    """The wanted programs plus every program a PROG_ARRAY initialiser names."""
    names = list(wanted)
    for m in spec.maps:
        if m.type == MAP_TYPE_PROG_ARRAY:
            for target in m.init_slots.values():
                if target in spec.programs and target not in names:
                    names.append(target)
    return names


def _apply_core(spec: ObjectSpec, prog: ProgramSpec, target_btf: Any,
                poisoned: dict[int, str] | None = None) -> list[Instruction]:
    """CO-RE as libbpf: a relocation no target resolves poisons its instruction (a call to helper
    0xbad2310), so a guarded access (``if (bpf_core_field_exists(...))``) in code the verifier
    never reaches costs nothing, and reaching one fails naming the relocation."""
    if not prog.core_relocs:
        return list(prog.instructions)
    from ubpf_py.obj import core

    return core.apply_core_relocs(prog, spec.btf, target_btf, strict=False, poisoned=poisoned)


def _verify_poisoned(spec: ObjectSpec, prog: ProgramSpec, insns: list[Instruction], mode: str,
                     poisoned: dict[int, str]) -> Any:
    """Verify; a rejection at a poisoned instruction is libbpf's "failed to resolve CO-RE relocation"."""
    try:
        return _verify(spec, prog, insns, mode)
    except VerifierError as e:
        why = poisoned.get(e.insn_index) if e.insn_index is not None else None
        if why is None:
            raise
        raise RelocationError(f"program '{prog.name}' instruction {e.insn_index}: {why}; build the target "
                              "with -g (DWARF) or BTF so its types can be found") from None


def _poison_call(poisons: dict[str, dict[int, str]]) -> Any:
    """Helper 0xbad2310 (reached only without verification): fault naming the relocation."""
    whys = sorted({w for p in poisons.values() for w in p.values()})

    def poisoned(r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
        raise VMFault(f"reached a poisoned instruction: {whys[0] if len(whys) == 1 else '; '.join(whys)}")
    return poisoned


def _verify(spec: ObjectSpec, prog: ProgramSpec, insns: list[Instruction], mode: str) -> Any:
    if mode == "off":
        return None
    from ubpf_py.verifier import hidden_functions, verify_program

    checked = prog if insns is prog.instructions else _replace_insns(prog, insns)
    return verify_program(checked, spec.maps, mode=mode, btf=spec.btf, hidden=hidden_functions(spec.path))


def _replace_insns(prog: ProgramSpec, insns: list[Instruction]) -> ProgramSpec:
    import dataclasses

    return dataclasses.replace(prog, instructions=insns)


def relocate_maps(insns: list[Instruction], specs: list[MapSpec], live: list[Any],
                  prog_name: str) -> list[Instruction]:
    """Replace spec-level map references (lddw src=5/6) by host addresses (src=0)."""
    out = list(insns)
    for i, ins in enumerate(out):
        if ins.opcode != LDDW or ins.src == 0:
            continue
        if ins.src in (BPF_PSEUDO_MAP_IDX, BPF_PSEUDO_MAP_IDX_VALUE):
            idx = ins.imm
            if not 0 <= idx < len(live):
                raise ObjectLoadError(f"program {prog_name}: instruction {i} references map index {idx}, "
                                      f"but the object has {len(live)} maps")
            m = live[idx]
            if ins.src == BPF_PSEUDO_MAP_IDX:
                addr = m.handle_addr
            else:
                base = m.lookup_addr(b"\0" * specs[idx].key_size)
                if not base:
                    raise ObjectLoadError(f"program {prog_name}: instruction {i} takes the address of a value "
                                          f"of map {specs[idx].name}, which has no value at key 0")
                addr = base + (ins.imm_hi & 0xFFFFFFFF)
            out[i] = ins.replace(src=0, imm=_s32(addr & 0xFFFFFFFF), imm_hi=_s32(addr >> 32))
        elif ins.src == 4:  # BPF_PSEUDO_FUNC: engines handle callbacks themselves
            continue
        else:
            raise NotSupportedError(f"lddw pseudo source {ins.src} (instruction {i} of {prog_name})")
    return out


def _s32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v & 0x80000000 else v


def _make_executable(engine: str, insns: list[Instruction], env: ExecEnv, check_memory: bool,
                     name: str = "prog", budget: int | None = None) -> Any:
    if engine == "interp":
        from ubpf_py.vm.interpreter import Interpreter

        return Interpreter(insns, env, check_memory=check_memory, name=name, max_instructions=budget or None)
    from ubpf_py.vm.jit import JitProgram

    return JitProgram(insns, env, check_memory=check_memory, name=name, budget=budget or None)


def _init_slots(spec: ObjectSpec, live_maps: list[Any], loaded: dict[str, LoadedProgram]) -> None:
    """Static ``__array(values, ...)`` initialisation of prog arrays and map-in-map."""
    by_name = {m.spec.name: m for m in live_maps}
    for m in live_maps:
        for slot, target in m.spec.init_slots.items():
            if m.spec.type == MAP_TYPE_PROG_ARRAY:
                if target not in loaded:
                    raise ObjectLoadError(f"map {m.spec.name}: slot {slot} names program {target!r}, "
                                          f"which was not loaded")
                m.set_program(slot, loaded[target].executable)
            elif m.spec.type in (MAP_TYPE_ARRAY_OF_MAPS, MAP_TYPE_HASH_OF_MAPS):
                if target not in by_name:
                    raise ObjectLoadError(f"map {m.spec.name}: slot {slot} names map {target!r}, which does not exist")
                key = slot.to_bytes(m.spec.key_size, "little")
                rc = m.update(key, by_name[target], 0)
                if rc:
                    raise ObjectLoadError(f"map {m.spec.name}: cannot store inner map {target} in slot {slot} "
                                          f"(error {rc})")


def _tail_call_resolver(env: ExecEnv):
    maps_by_addr = env.maps_by_addr

    def resolve(handle: int, index: int) -> Any:
        m = maps_by_addr.get(handle)
        if m is None or m.spec.type != MAP_TYPE_PROG_ARRAY:
            return None
        return m.get_program(index)

    return resolve
