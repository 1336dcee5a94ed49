"""Which programs run inside the traced process, and the image they run from.

A program runs in the target (entered from a patched jump, no stop per hit) when all of
these hold, else it takes the ptrace path and the reason is reported per probe:

* the run allows it (``--mode auto|intarget``; ``--mode ptrace`` keeps everything in the tracer);
* the JIT is the engine (the interpreter is the tracer-side reference engine);
* the verifier accepted it in strict mode: in the target it runs unchecked, as in the kernel;
* the target compiler supports it (no callx, no callbacks other than bpf_loop's and
  for_each_map_elem's, tail calls only through prog arrays known at compile time);
* the in-target runtime implements every helper it calls;
* the in-target runtime implements every map it refers to (a map whose descriptor has no
  native kind -- a build-id stack map, a cgroup array -- would look empty in the target), and
  for map-in-map, the inner maps it can hand out.

The image is the runtime object plus every eligible program, linked for one address in the
target (``ProbeSession.load_in_target_image``); each probe then gets its program's entry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ubpf_py.abi.bpf import MapType
from ubpf_py.errors import NotSupportedError
from ubpf_py.isa import opcodes as op
from ubpf_py.isa.opcodes import LDDW

MODES = ("auto", "intarget", "ptrace")


@dataclass
class InTargetPlan:
    """Per program: its entry address in the target image, or why it stays on the ptrace path."""

    entries: dict[str, int] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    image_addr: int = 0
    image_size: int = 0
    #: the RINGBUF map printk records of in-target programs go through (None: no program prints)
    printk_ring: Any = None

    def entry(self, program: str) -> int:
        return self.entries.get(program, 0)


def runtime_unavailable(mode: str, engine: str) -> str | None:
    """Why no program of this run can run in the target (None: some may)."""
    if mode == "ptrace":
        return "--mode ptrace"
    if engine != "jit":
        return f"--engine {engine} runs programs in the tracer"
    from ubpf_py.intarget import runtime_obj

    why = runtime_obj.unavailable_reason()
    return None if why is None else f"the in-target runtime is not available: {why}"


def program_reason(lp: Any, verifier: str, helpers: frozenset[int]) -> str | None:
    """Why ``lp`` (a LoadedProgram) cannot run in the target, or None."""
    if verifier != "strict":
        return f"--verifier {verifier}: only programs verified in strict mode run unchecked in the target"
    if lp.report is None or not lp.report.ok:
        return "not accepted by the verifier in strict mode"
    from ubpf_py.helpers.names import HELPER_NAMES
    from ubpf_py.vm.jit.compiler import scan_program
    from ubpf_py.vm.jit.target import INLINE_HELPERS

    _starts, helper_ids, _callbacks, _callx = scan_program(lp.instructions)
    missing = [h for h in helper_ids if h not in helpers and h not in INLINE_HELPERS]
    if missing:
        return "helper " + ", ".join(f"{HELPER_NAMES.get(h, 'helper')} (#{h})" for h in missing) + " is not available in the target"
    why = _map_reason(lp.instructions, getattr(lp.env, "maps_by_addr", {}))
    if why is not None:
        return why
    from ubpf_py.intarget.runtime_obj import RETURN_VALUE_DIFFERS, UNSUPPORTED_FLAGS

    for pc in _calls_whose_result_is_read(lp.instructions, RETURN_VALUE_DIFFERS):
        h = lp.instructions[pc].imm
        return (f"it reads the result of {HELPER_NAMES.get(h, 'helper')} (#{h}) at instruction {pc}, which "
                f"differs in the target")
    for hid, (regno, mask) in UNSUPPORTED_FLAGS.items():
        for pc in _calls_whose_flags_may_have(lp.instructions, hid, regno, mask):
            return (f"{HELPER_NAMES.get(hid, 'helper')} (#{hid}) at instruction {pc} may get flags 0x{mask:x}, "
                    f"which the in-target runtime does not support")
    return None


#: helpers whose in-target results carry ids as the target sees them (its own namespaces), by
#: kind: bpf_get_current_pid_tgid and the pid of printk lines (trace_printk, trace_vprintk);
#: bpf_get_current_uid_gid
ID_REPORTING_HELPERS = {"pid": frozenset({6, 14, 177}), "uid": frozenset({15})}


def reported_ids(lp: Any) -> frozenset[str]:
    """The kinds of ids ``lp`` reports.  The kernel reports them in the initial namespaces (the
    tracer's view); in the target, getpid()/getuid() give the target's own namespaces' ids, so a
    probe of such a program stays on the ptrace path in a process of a child pid or user
    namespace."""
    from ubpf_py.vm.jit.compiler import scan_program

    used = set(scan_program(lp.instructions)[1])
    return frozenset(kind for kind, ids in ID_REPORTING_HELPERS.items() if used & ids)


def _map_reason(insns: list, maps_by_addr: dict[int, Any]) -> str | None:
    """Why a map the program loads (``lddw`` of a map handle) cannot serve it in the target:
    the runtime works from a map's descriptor, and a descriptor of kind 0 means no native
    operations (lookups would miss, updates fail), unlike the ptrace path's Python map."""
    from ubpf_py.maps import descriptor as D

    seen = set()
    for ins in insns:
        if ins.opcode != LDDW:
            continue
        m = maps_by_addr.get(ins.imm64 & ((1 << 64) - 1))
        if m is None or id(m) in seen:
            continue
        seen.add(id(m))
        why = _native_map_reason(m, D)
        if why is not None:
            return why
    return None


def _native_map_reason(m: Any, D: Any) -> str | None:
    if m.spec.type_name == "prog_array":
        return None                                      # tail calls: entry tables (prepare)
    if D.read_word(m.handle_addr, D.D_KIND) == D.KIND_NONE:
        return f"map {m.name} ({m.spec.type_name}) is not available in the target"
    return _inner_map_reason(m)


def _inner_map_reason(m: Any) -> str | None:
    if getattr(m, "holds_maps", False):
        # the inner maps it may hand out: any map of its template's type
        inner = m.inner_template
        if inner.type not in _NATIVE_INNER_TYPES:
            return (f"map {m.name} holds {MapType(inner.type).name.lower()} maps, which are not "
                    f"available in the target")
    return None


#: inner map types whose maps in the arena have a native descriptor the runtime serves
_NATIVE_INNER_TYPES = frozenset({MapType.ARRAY, MapType.PERCPU_ARRAY, MapType.HASH, MapType.PERCPU_HASH,
                                 MapType.LRU_HASH, MapType.LRU_PERCPU_HASH, MapType.RINGBUF,
                                 MapType.QUEUE, MapType.STACK, MapType.BLOOM_FILTER, MapType.LPM_TRIE})


def _calls_whose_flags_may_have(insns: list, helper_id: int, regno: int, mask: int) -> list[int]:
    """Calls of ``helper_id`` whose flags argument (register ``regno``) is not a constant without
    ``mask``.  Conservative: the last write of the register before the call, in straight-line code
    (no jump lands in between), must be a ``mov`` of an immediate."""
    call = op.BPF_JMP | op.BPF_CALL
    targets = set()
    for pc, ins in enumerate(insns):
        cls, code = ins.opcode & 0x07, ins.opcode & 0xF0
        if cls in (op.BPF_JMP, op.BPF_JMP32) and code not in (op.BPF_CALL, op.BPF_EXIT):
            targets.add(pc + (ins.imm if cls == op.BPF_JMP32 and code == op.BPF_JA else ins.off) + 1)
    out = []
    for pc, ins in enumerate(insns):
        if ins.opcode != call or ins.src != op.BPF_CALL_HELPER or ins.imm != helper_id:
            continue
        known = False
        for back in range(pc - 1, -1, -1):
            prev = insns[back]
            if back + 1 in targets or prev.opcode & 0x07 in (op.BPF_JMP, op.BPF_JMP32):
                break                                   # another path may reach the call
            if prev.opcode == 0 or prev.dst != regno:
                continue
            known = prev.opcode in (op.BPF_ALU64 | op.BPF_MOV | op.BPF_K, op.BPF_ALU | op.BPF_MOV | op.BPF_K) \
                and not (prev.imm & mask)
            break
        if not known:
            out.append(pc)
    return out


def _calls_whose_result_is_read(insns: list, helper_ids: frozenset[int]) -> list[int]:
    """Calls of ``helper_ids`` whose r0 may be read afterwards.  Conservative: the instructions
    after the call are scanned in order; r0 written first (or ``exit``: a uprobe program's return
    value is ignored) clears the call, anything else that may read r0 -- a use, a branch -- counts."""
    call, exit_ = op.BPF_JMP | op.BPF_CALL, op.BPF_JMP | op.BPF_EXIT
    out = []
    for pc, ins in enumerate(insns):
        if ins.opcode != call or ins.src != op.BPF_CALL_HELPER or ins.imm not in helper_ids:
            continue
        for nxt in insns[pc + 1:]:
            if nxt.opcode == 0:                         # the second slot of an lddw
                continue
            if nxt.opcode in (exit_, call):             # exit (result ignored) / a call (r0 overwritten)
                break
            cls, code, x = nxt.opcode & 0x07, nxt.opcode & 0xF0, nxt.opcode & op.BPF_X
            if cls in (op.BPF_JMP, op.BPF_JMP32):       # a branch: stop scanning, assume r0 is read
                out.append(pc)
                break
            if cls in (op.BPF_ALU, op.BPF_ALU64):       # reads dst (not mov), src if a register
                reads = (code != op.BPF_MOV and nxt.dst == 0) or (x and nxt.src == 0)
            elif cls == op.BPF_LDX:                     # reads its base
                reads = nxt.src == 0
            elif cls == op.BPF_ST:                      # reads its base
                reads = nxt.dst == 0
            elif cls == op.BPF_STX:                     # stx / atomics: base and value
                reads = nxt.dst == 0 or nxt.src == 0
            else:                                       # lddw
                reads = False
            if reads:
                out.append(pc)
                break
            if nxt.dst == 0 and cls in (op.BPF_LD, op.BPF_LDX, op.BPF_ALU, op.BPF_ALU64):
                break                                   # r0 written first: the result is dead
    return out


def prepare(session: Any, coll: Any, programs: list[str], *, verifier: str) -> InTargetPlan:
    """Compile the eligible ``programs`` (and the programs they tail-call) for the target, link
    them with the runtime and load the image into the target (``session`` must have
    ``enable_in_target()``'d and ``coll`` must have its maps in that arena)."""
    from ubpf_py.intarget import linker, runtime_obj
    from ubpf_py.vm.jit.target import compile_for_target

    plan = InTargetPlan()
    runtime = runtime_obj.object_bytes()
    helpers = runtime_obj.helper_ids()
    arena = session.tracer.intarget.arena
    prog_arrays = {m.handle_addr: m for m in coll.map_list if m.spec.type_name == "prog_array"}
    tables = {h: (arena.alloc(8 * m.max_entries, 64), m.max_entries) for h, m in prog_arrays.items()}
    tail_tables = {h: (buf.addr, n) for h, (buf, n) in tables.items()}
    codes = {}
    for name, lp in coll.programs.items():
        why = program_reason(lp, verifier, helpers)
        if why is None:
            try:
                codes[name] = compile_for_target(lp.instructions, name, coll.env.maps_by_addr,
                                                 tail_tables=tail_tables)
            except NotSupportedError as e:
                why = e.what
        if why is not None:
            plan.reasons[name] = why
    _drop_broken_tail_chains(coll, codes, prog_arrays, plan.reasons)
    for name in list(plan.reasons):
        if name not in programs:
            del plan.reasons[name]
    if not codes:
        return plan
    objects = [("runtime", runtime)] + [(f"prog:{n}", c.obj) for n, c in codes.items()]
    probe_link = linker.link(objects, 0x10000000)     # the layout does not depend on the base
    if probe_link.writable_range[0] != probe_link.writable_range[1]:
        raise NotSupportedError("in-target code with writable data (the image is mapped read+exec)")
    size = probe_link.size
    images: dict[int, Any] = {}

    def link(base: int) -> bytes:
        images[base] = linker.link(objects, base)
        return bytes(images[base].data)

    if any(set(c.helper_ids) & PRINTK_HELPERS for c in codes.values()):
        plan.printk_ring = _printk_ring(arena)
    printk = plan.printk_ring
    base = session.load_in_target_image(link, size, printk_ring=printk.handle_addr if printk else 0)
    image = images[base]
    session.tracer.intarget.dl_notify = image.symbols.get("ubpf_dl_notify", 0)   # dlopen without an int3
    for name, code in codes.items():
        plan.entries[name] = image.addr(code.entry)
    by_exe = {id(coll.programs[n].executable): n for n in codes}
    for h, (buf, n) in tables.items():
        words = buf.view.cast("Q")
        for i in range(n):
            exe = prog_arrays[h].program_at(i)
            if exe is not None and id(exe) in by_exe:
                words[i] = image.addr(codes[by_exe[id(exe)]].tail_entry)
    plan.image_addr, plan.image_size = base, size
    return plan


def _drop_broken_tail_chains(coll: Any, codes: dict[str, Any], prog_arrays: dict[int, Any],
                             reasons: dict[str, str]) -> None:
    """A program whose prog arrays hold a program that cannot run in the target cannot either
    (its tail call would miss in the target where the tracer's would hit)."""
    by_exe = {id(lp.executable): name for name, lp in coll.programs.items()}
    changed = True
    while changed:
        changed = False
        for name in list(codes):
            handles = {h for h in codes[name].layout.map_consts if h in prog_arrays}
            handles |= {ins.imm64 & ((1 << 64) - 1) for ins in coll.programs[name].instructions
                        if ins.opcode == LDDW and (ins.imm64 & ((1 << 64) - 1)) in prog_arrays}
            for h in handles:
                m = prog_arrays[h]
                for i in range(m.max_entries):
                    exe = m.program_at(i)
                    target = by_exe.get(id(exe)) if exe is not None else None
                    if exe is not None and target not in codes:
                        reasons[name] = (f"its tail call target {target or 'a program'} in {m.spec.name}[{i}] "
                                         f"cannot run in the target")
                        del codes[name]
                        changed = True
                        break
                if name not in codes:
                    break


#: the internal ring buffer in-target printk records go through (not one of the object's maps)
PRINTK_RING = ".ubpf_printk"
PRINTK_RING_SIZE = 4 << 20
#: bpf_trace_printk, bpf_trace_vprintk
PRINTK_HELPERS = frozenset({6, 177})


def _printk_ring(arena: Any) -> Any:
    from ubpf_py.maps import create_map
    from ubpf_py.maps.consts import RINGBUF
    from ubpf_py.obj.spec import MapSpec

    return create_map(MapSpec(PRINTK_RING, RINGBUF, 0, 0, PRINTK_RING_SIZE, internal=True),
                      alloc=arena)
