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

from ubpf_py.isa.instruction import Instruction
from ubpf_py.maps import descriptor as D
from ubpf_py.sysinfo import cpu_has
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
        llvm.initialize_native_asmparser()   # inline asm (rdpid) in target code
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


def _entry_ir(p: str, table: list[int], cpu: str) -> str:
    n = layout.NUM_SLOTS
    rows = ", ".join(f"i64 {v if v < 1 << 63 else v - (1 << 64)}" for v in table) or "i64 0"
    count = max(1, len(table))
    if cpu == "rdpid":
        cpu_ir = ('  %aux = call i64 asm sideeffect "rdpid $0", "=r"()\n'
                  '  %cpu = and i64 %aux, 4095\n')
    elif cpu == "rdtscp":
        cpu_ir = ('  %aux32 = call i32 asm sideeffect "rdtscp", "={ecx},~{eax},~{edx}"()\n'
                  '  %aux = zext i32 %aux32 to i64\n  %cpu = and i64 %aux, 4095\n')
    else:
        cpu_ir = "  %cpu = add i64 0, 0\n"
    return f"""
@{p}_fastmaps = internal constant [{count} x i64] [{rows}], align 8
define i64 @{p}_tentry(i64 %ctx, i64 %hf) {{
  %r = call i64 @{p}_tcentry(i64 %ctx, i64 %hf, i64 0)
  ret i64 %r
}}
define i64 @{p}_tcentry(i64 %ctx, i64 %hf, i64 %tail_calls) "no-builtins" {{
  %rt = alloca [{n} x i64], align 16
  %stk = alloca [{layout.STACK_TOTAL} x i8], align 16
  %lo = ptrtoint ptr %stk to i64
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
{cpu_ir}  %s5 = getelementptr i64, ptr %rt, i64 {layout.SLOT_CPU}
  store i64 %cpu, ptr %s5
  %r = call i64 @{p}_f0(i64 %ctx, i64 0, i64 0, i64 0, i64 0, i64 %fp, ptr %rt)
  ret i64 %r
}}
"""


def target_ir(insns: list[Instruction], prefix: str, maps_by_addr: dict[int, Any],
              tail_tables: dict[int, tuple[int, int]] | None = None) -> tuple[str, ProgramLayout]:
    """The whole LLVM module (text) of one program compiled for the target."""
    body, plan = program_ir(insns, prefix, checked=False,
                            target=TargetInfo(dict(tail_tables or {}), _walkable_maps(maps_by_addr)))
    percpu = any(getattr(maps_by_addr.get(h), "percpu", False) for h in plan.map_consts)
    cpu = ("rdpid" if cpu_has("rdpid") else "rdtscp") if percpu else "none"
    decls = "".join(f"declare i64 @{target_helper_symbol(h)}(i64, i64, i64, i64, i64, i64)\n"
                    for h in plan.helper_ids if h not in INLINE_HELPERS)
    if FOR_EACH_HELPER in plan.helper_ids:
        decls += f"declare i64 @{FOR_EACH_SYMBOL}(i64, i64, i64, i64, i64, ptr, i64)\n"
    text = module_header() + decls + body + _entry_ir(prefix, _fast_map_table(plan, maps_by_addr), cpu)
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
