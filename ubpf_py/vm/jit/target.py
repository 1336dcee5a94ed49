"""Programs compiled for the traced process (in-target execution).

The same IR generator as the tracer-side JIT (``compiler``), in *target mode*:

* the code runs inside the target, so it may refer to nothing in the tracer: helpers are
  external symbols ``ubpf_helper_<id>`` that the in-target runtime (``runtime/*.c``)
  defines, map handles and values are arena addresses (the arena is mapped at the same
  address in tracer and target, so the relocated ``lddw`` immediates are valid there), and
  the runtime block (``layout``) is a per-hit ``alloca`` on the thread's runtime stack,
  filled by the entry below -- no per-instance Python state exists;
* only programs the verifier accepted in strict mode come here, so memory accesses are
  unchecked, as in the kernel;
* bpf_loop runs its callback inline, bpf_for_each_map_elem calls the runtime's map walker with
  the callback and its frame; tail calls jump through a table of program entries in
  the arena (one per prog array, filled after linking: ``tail_tables``); what needs the
  tracer (callx, other callbacks) raises ``NotSupportedError``, and the caller keeps that
  probe on the ptrace path with the reason;
* a program that uses per-CPU data (``uses_cpu``) owns a CPU id for its hit: its entry calls
  the runtime's ``ubpf_cpu_claim`` (runtime/cpuclaim.c, the kernel's migrate_disable in
  effect), puts the id in ``SLOT_CPU`` and releases it when the program returns; other
  programs get no claim code;
* code generation uses general-purpose registers only (no SSE/AVX/x87): the trampolines save
  the general registers and the flags of the interrupted thread, not its vector state;
* the result is an ELF relocatable object (position-independent, small code model) that the
  in-target linker places next to the runtime.

Entries: ``u64 <prefix>_tentry(u64 ctx, struct ubpf_hit_frame *hf)`` (what a probe runs) and
``u64 <prefix>_tcentry(u64 ctx, struct ubpf_hit_frame *hf, u64 tail_calls)`` (what a tail call
to this program runs; the count carries the kernel's limit of 33 across the chain).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import llvmlite.binding as llvm

from ubpf_py.abi.runtime import HIT_FRAME
from ubpf_py.isa.instruction import Instruction
from ubpf_py.isa.opcodes import LDDW
from ubpf_py.maps import descriptor as D
from ubpf_py.vm.jit import fastpath, layout
from ubpf_py.vm.jit.backend import Backend, backend
from ubpf_py.vm.jit.compiler import (
    FOR_EACH_HELPER,
    FOR_EACH_SYMBOL,
    LOOP_HELPER,
    TAIL_CALL_HELPER,
    ProgramLayout,
    TargetInfo,
    module_header,
    program_ir,
    target_helper_symbol,
)

#: helpers target code implements itself (no ``ubpf_helper_<id>`` runtime function): tail calls
#: and bpf_loop inline, for_each_map_elem through the runtime's walker (it needs the callback's
#: frame and runtime block, which helpers do not get)
INLINE_HELPERS = frozenset({TAIL_CALL_HELPER, LOOP_HELPER, FOR_EACH_HELPER})

#: x86-64 without any vector or x87 state (GCC's -mgeneral-regs-only)
GENERAL_REGS_ONLY = "-sse,-sse2,-sse3,-ssse3,-sse4.1,-sse4.2,-avx,-avx2,-avx512f,-mmx,-x87,+soft-float"


@dataclass(frozen=True, slots=True)
class TargetCode:
    """One program compiled for the target: an ELF relocatable object and its entry symbol."""

    name: str
    obj: bytes
    entry: str
    helper_ids: tuple[int, ...]
    layout: ProgramLayout
    #: symbol of the tail-call entry
    tail_entry: str = ""


_lock = threading.Lock()
_tm: llvm.TargetMachine | None = None
_ctx: Any = None


def _machine() -> llvm.TargetMachine:
    global _tm, _ctx
    if _tm is None:
        backend()   # initialises the native target
        target = llvm.Target.from_default_triple()
        _tm = target.create_target_machine(cpu="x86-64", features=GENERAL_REGS_ONLY, opt=2,
                                           reloc="pic", codemodel="small")
        _ctx = llvm.create_context()
    return _tm


def _fast_map_table(plan: ProgramLayout, maps_by_addr: dict[int, Any]) -> list[int]:
    """rt[FAST_MAPS] entries: native lookups/in-place updates of ARRAY and HASH-family maps
    (inline IR); ring buffer output always goes to the runtime (many producers)."""
    table = []
    for handle in plan.map_consts:
        m = maps_by_addr.get(handle)
        kind = D.KIND_NONE
        if m is not None and getattr(m, "handle_addr", None) == handle and not getattr(m, "holds_maps", True):
            kind = D.read_word(handle, D.D_KIND)
        native = handle if kind in (D.KIND_ARRAY, D.KIND_HASH) else 0
        table += [native, native, 0]   # lookup, update, ringbuf output (fastpath.MAP_HELPERS order)
    assert fastpath.MAP_GROUP == 3
    return table


def _walkable_maps(maps_by_addr: dict[int, Any]) -> frozenset[int]:
    """Handles of the maps runtime/foreach.c can walk: ARRAY and HASH-family descriptors."""
    out = set()
    for handle, m in maps_by_addr.items():
        if getattr(m, "handle_addr", None) == handle and not getattr(m, "holds_maps", True) \
                and D.read_word(handle, D.D_KIND) in (D.KIND_ARRAY, D.KIND_HASH):
            out.add(handle)
    return frozenset(out)


#: bpf_get_smp_processor_id
SMP_PROCESSOR_ID = 8
#: the runtime's CPU-id claim (runtime/cpuclaim.c)
CLAIM_SYMBOL = "ubpf_cpu_claim"


def uses_cpu(insns: list[Instruction], plan: ProgramLayout, maps_by_addr: dict[int, Any]) -> bool:
    """Whether a hit of this program must own a CPU id (runtime/cpuclaim.c): it refers to a
    per-CPU map (or to a map of maps while the collection has per-CPU maps that could be inner
    maps), or asks for its CPU number (which programs use to pick their own slot of a map).
    Anything else pays nothing for the claim."""
    if SMP_PROCESSOR_ID in plan.helper_ids:
        return True
    percpu_any = any(getattr(m, "percpu", False) for m in maps_by_addr.values())
    for ins in insns:
        if ins.opcode != LDDW or ins.src != 0:
            continue
        m = maps_by_addr.get(ins.imm64)
        if m is not None and (getattr(m, "percpu", False) or (percpu_any and getattr(m, "holds_maps", False))):
            return True
    return False


def _claim_ir(claim: bool) -> tuple[str, str]:
    """IR of the entry before and after the program's call: nothing, or own a CPU id for the hit
    unless an earlier program of the tail-call chain already owns one (HIT_FRAME.cpu_owner
    non-zero; the trampoline zeroes it per hit), and release it (a store) when the program
    returns -- only the entry that claimed releases, so tail calls keep the id."""
    if not claim:
        return "  %cpu = add i64 0, 0\n", "  ret i64 %r\n"
    before = f"""  %ownp = inttoptr i64 %hfo to ptr
  %held = load i64, ptr %ownp
  %need = icmp eq i64 %held, 0
  br i1 %need, label %claim, label %have
claim:
  %rc = call i64 @{CLAIM_SYMBOL}(i64 %hf)
  %ok = icmp eq i64 %rc, 0
  br i1 %ok, label %have, label %skip
skip:
  ret i64 0
have:
  %cpup = inttoptr i64 %hfc to ptr
  %cpu = load i64, ptr %cpup
"""
    after = """  br i1 %need, label %release, label %done
release:
  %word = load i64, ptr %ownp
  %wordp = inttoptr i64 %word to ptr
  store atomic i64 0, ptr %wordp release, align 8
  store i64 0, ptr %ownp
  ret i64 %r
done:
  ret i64 %r
"""
    return before, after


def _entry_ir(p: str, table: list[int], claim: bool) -> str:
    n = layout.NUM_SLOTS
    rows = ", ".join(f"i64 {v if v < 1 << 63 else v - (1 << 64)}" for v in table) or "i64 0"
    count = max(1, len(table))
    before, after = _claim_ir(claim)
    return f"""
@{p}_fastmaps = internal constant [{count} x i64] [{rows}], align 8
define i64 @{p}_tentry(i64 %ctx, i64 %hf) {{
  %r = call i64 @{p}_tcentry(i64 %ctx, i64 %hf, i64 0)
  ret i64 %r
}}
define i64 @{p}_tcentry(i64 %ctx, i64 %hf, i64 %tail_calls) "no-builtins" {{
  %rt = alloca [{n} x i64], align 16
  %stk = alloca [{layout.STACK_TOTAL} x i8], align 16
  %hfo = add i64 %hf, {HIT_FRAME.off("cpu_owner")}
  %hfc = add i64 %hf, {HIT_FRAME.off("cpu")}
{before}  %lo = ptrtoint ptr %stk to i64
  %fp = add i64 %lo, {layout.STACK_TOTAL}
  store i64 0, ptr %rt
  %s1 = getelementptr i64, ptr %rt, i64 {layout.SLOT_STACK_LO}
  store i64 %lo, ptr %s1
  %s2 = getelementptr i64, ptr %rt, i64 {layout.SLOT_FAST_MAPS}
  %tab = ptrtoint ptr @{p}_fastmaps to i64
  store i64 %tab, ptr %s2
  %s3 = getelementptr i64, ptr %rt, i64 {layout.SLOT_FAST_FLAGS}
  store i64 0, ptr %s3
  %s4 = getelementptr i64, ptr %rt, i64 {layout.SLOT_HIT_FRAME}
  store i64 %hf, ptr %s4
  %s6 = getelementptr i64, ptr %rt, i64 {layout.SLOT_TAIL_COUNT}
  store i64 %tail_calls, ptr %s6
  %s5 = getelementptr i64, ptr %rt, i64 {layout.SLOT_CPU}
  store i64 %cpu, ptr %s5
  %r = call i64 @{p}_f0(i64 %ctx, i64 0, i64 0, i64 0, i64 0, i64 %fp, ptr %rt)
{after}}}
"""


def target_ir(insns: list[Instruction], prefix: str, maps_by_addr: dict[int, Any],
              tail_tables: dict[int, tuple[int, int]] | None = None) -> tuple[str, ProgramLayout]:
    """The whole LLVM module (text) of one program compiled for the target."""
    body, plan = program_ir(insns, prefix, checked=False,
                            target=TargetInfo(dict(tail_tables or {}), _walkable_maps(maps_by_addr)))
    claim = uses_cpu(insns, plan, maps_by_addr)
    decls = f"declare i64 @{CLAIM_SYMBOL}(i64)\n" if claim else ""
    decls += "".join(f"declare i64 @{target_helper_symbol(h)}(i64, i64, i64, i64, i64, i64)\n"
                    for h in plan.helper_ids if h not in INLINE_HELPERS)
    if FOR_EACH_HELPER in plan.helper_ids:
        decls += f"declare i64 @{FOR_EACH_SYMBOL}(i64, i64, i64, i64, i64, ptr, i64)\n"
    text = module_header() + decls + body + _entry_ir(prefix, _fast_map_table(plan, maps_by_addr), claim)
    return text, plan


def compile_for_target(insns: list[Instruction], name: str, maps_by_addr: dict[int, Any],
                       level: str = "O2", tail_tables: dict[int, tuple[int, int]] | None = None) -> TargetCode:
    """Compile one verified program into an ELF relocatable object for the target."""
    prefix = "p_" + "".join(c if c.isalnum() else "_" for c in name)
    text, plan = target_ir(insns, prefix, maps_by_addr, tail_tables)
    with _lock:
        tm = _machine()
        mod = llvm.parse_assembly(text, _ctx)
        mod.triple = tm.triple
        mod.data_layout = str(tm.target_data)
        for fn in mod.functions:   # no loop-to-memcpy rewrites: the target has no libc to call
            if not fn.is_declaration:
                fn.add_function_attribute("nounwind")
        Backend._optimise(mod, level, tm)
        obj = tm.emit_object(mod)
    return TargetCode(name, obj, f"{prefix}_tentry", plan.helper_ids, plan, f"{prefix}_tcentry")
