"""BPF bytecode -> LLVM IR text (one module may hold many programs).

Shape of the generated code, per program (``<p>`` = a prefix unique per program):

* every BPF function (the entry at index 0, each ``call`` target, each
  ``lddw src=BPF_PSEUDO_FUNC`` target) becomes
  ``i64 @<p>_f<pc>(i64 r1..r5, i64 fp, ptr rt)``: its own registers (allocas),
  ``fp`` is its r10 (a 512-byte frame below the caller's), ``rt`` the per-instance
  runtime block (``layout``).  Callback function pointers are the native
  addresses of these functions.
* ``@<p>_entry(i64 r1..r5, ptr rt)`` and ``@<p>_entry1(i64 r1, ptr rt)`` are the
  exported entry points Python calls; they start at ``rt[ENTRY_FP]``.
* helpers are called through the per-instance helper table
  (``rt[HELPERS][k]``, ``k`` = index of the helper id in ``helper_ids``), so the
  compiled code never contains a Python object address and can be cached.
* abnormal exits (fault, Python exception) set ``rt[STATUS]``; after every call
  the caller tests it and returns at once, unwinding the native frames.
"""

from __future__ import annotations

from dataclasses import dataclass

from ubpf_py.errors import InvalidInstructionError, NotSupportedError
from ubpf_py.isa.instruction import Instruction
from ubpf_py.isa.opcodes import (
    BPF_ALU,
    BPF_ALU64,
    BPF_CALL,
    BPF_CALL_HELPER,
    BPF_EXIT,
    BPF_JA,
    BPF_JEQ,
    BPF_JGE,
    BPF_JGT,
    BPF_JLE,
    BPF_JLT,
    BPF_JMP,
    BPF_JMP32,
    BPF_JNE,
    BPF_JSET,
    BPF_JSGE,
    BPF_JSGT,
    BPF_JSLE,
    BPF_JSLT,
    BPF_LD,
    BPF_LDX,
    BPF_MAX_LOOPS,
    BPF_PSEUDO_CALL,
    BPF_PSEUDO_FUNC,
    BPF_PSEUDO_KFUNC_CALL,
    BPF_ST,
    BPF_STX,
    BPF_X,
    LDDW,
    MAX_TAIL_CALLS,
    MAY_GOTO,
)
from ubpf_py.vm.jit import fastpath, layout
from ubpf_py.vm.jit.emit import FunctionEmitter, s32, s64
from ubpf_py.vm.jit.ir_alu import INTRINSICS, emit_alu
from ubpf_py.vm.jit.ir_mem import emit_mem, region_check_function

#: helper id of bpf_tail_call, which the engine implements itself
TAIL_CALL_HELPER = 12

_PSEUDO_NAMES = {1: "map fd", 2: "map value", 3: "BTF id", 5: "map index", 6: "map index value"}

_CONDS = {BPF_JEQ: "eq", BPF_JGT: "ugt", BPF_JGE: "uge", BPF_JNE: "ne", BPF_JSGT: "sgt",
          BPF_JSGE: "sge", BPF_JLT: "ult", BPF_JLE: "ule", BPF_JSLT: "slt", BPF_JSLE: "sle"}


@dataclass(frozen=True, slots=True)
class ProgramLayout:
    """What the runtime must know about a compiled program's native interface."""

    prefix: str
    #: helper ids in helper-table order (index k <-> rt[HELPERS][k])
    helper_ids: tuple[int, ...]
    #: the program makes function pointers (lddw src=4) that helpers may call back
    uses_callbacks: bool
    #: the program calls bpf_tail_call
    uses_tail_call: bool
    #: the program uses callx (dynamic helper calls)
    uses_callx: bool
    #: instruction indices of functions used as callbacks (exported as ``<p>_f<pc>``)
    callback_starts: tuple[int, ...] = ()
    #: map handle constants whose lookups have a native fast path (index k <->
    #: rt[FAST_MAPS][k]; see ``fastpath``)
    map_consts: tuple[int, ...] = ()
    #: helper ids with a native fast path at some call site (guarded by rt[FAST_FLAGS])
    fast_helpers: tuple[int, ...] = ()

    @property
    def entry(self) -> str:
        return f"{self.prefix}_entry"

    @property
    def entry1(self) -> str:
        return f"{self.prefix}_entry1"


def _is_real(insns: list[Instruction], i: int) -> bool:
    """False for the second slot of a lddw."""
    return not (i > 0 and insns[i - 1].opcode == LDDW)


def scan_program(insns: list[Instruction]) -> tuple[list[int], list[int], list[int], bool]:
    """Function starts, helper ids, callback starts, uses_callx; rejects what the JIT cannot run."""
    n = len(insns)
    if n == 0:
        raise InvalidInstructionError(0, "program is empty")
    starts = {0}
    helpers: set[int] = set()
    callbacks: set[int] = set()
    callx = False
    for i, ins in enumerate(insns):
        if not _is_real(insns, i):
            continue
        op = ins.opcode
        if op == LDDW:
            if i + 1 >= n:
                raise InvalidInstructionError(i, "lddw is missing its second slot")
            if ins.src == BPF_PSEUDO_FUNC:
                target = i + ins.imm + 1
                _check_target(insns, i, target, "function pointer")
                starts.add(target)
                callbacks.add(target)
            elif ins.src != 0:
                what = _PSEUDO_NAMES.get(ins.src, f"pseudo source {ins.src}")
                raise NotSupportedError(f"lddw with {what} (src={ins.src}); load the program "
                                        "through live.Collection so maps become addresses")
        elif op == BPF_JMP | BPF_CALL:
            if ins.src == BPF_PSEUDO_CALL:
                target = i + ins.imm + 1
                _check_target(insns, i, target, "call")
                starts.add(target)
            elif ins.src == BPF_PSEUDO_KFUNC_CALL:
                raise NotSupportedError("kfunc calls")
            elif ins.src == BPF_CALL_HELPER:
                helpers.add(ins.imm)
            else:
                raise InvalidInstructionError(i, f"call with unknown source {ins.src}")
        elif op == BPF_JMP | BPF_CALL | BPF_X:
            callx = True
    return sorted(starts), sorted(helpers), sorted(callbacks), callx


def _check_target(insns: list[Instruction], pc: int, target: int, what: str) -> None:
    if not 0 <= target < len(insns) or not _is_real(insns, target):
        raise InvalidInstructionError(pc, f"{what} target {target} is not an instruction")


@dataclass(frozen=True, slots=True)
class TargetInfo:
    """What code compiled for the traced process needs to know (``vm.jit.target``)."""

    #: prog-array map handle -> (address of its table of program entries in the arena, max_entries)
    tail_tables: dict[int, tuple[int, int]]
    #: map handles the runtime's for_each can walk (ARRAY and HASH-family descriptors); a
    #: bpf_for_each_map_elem on another constant map is NotSupportedError.  None: not checked
    for_each_maps: frozenset[int] | None = None


#: bpf_loop: compiled inline in target code (the callback is a BPF function of the same module)
LOOP_HELPER = 181
#: bpf_for_each_map_elem: in target code a call of the runtime's ``ubpf_for_each_elem``, which
#: calls the callback (a BPF function of the same module) with its frame and runtime block
FOR_EACH_HELPER = 164
FOR_EACH_SYMBOL = "ubpf_for_each_elem"


def program_ir(insns: list[Instruction], prefix: str, checked: bool | int,
               target: TargetInfo | None = None) -> tuple[str, ProgramLayout]:
    """IR text for one program (without the shared module header) and its layout.
    ``checked``: mode bits ``layout.CHECK_MEMORY`` (True) and ``layout.BUDGET`` (every backward
    jump counts down ``rt[SLOT_BUDGET]``, reset at entry; at zero the program faults).

    ``target``: code for the traced process (``vm.jit.target`` adds its entry): helpers are
    direct calls of the in-target runtime, bpf_loop and tail calls are compiled inline,
    for_each_map_elem calls the runtime's walker with the callback's frame, and
    what only the tracer can do (callx, other callbacks) raises ``NotSupportedError``."""
    starts, helper_ids, callbacks, callx = scan_program(insns)
    helper_index = {h: k for k, h in enumerate(helper_ids)}
    bounds = [*starts, len(insns)]
    parts = []
    fast = _FastSites()
    for k, start in enumerate(starts):
        parts.append(_function_ir(insns, prefix, start, bounds[k + 1], start in callbacks,
                                  helper_index, checked, fast, target))
    if not target:
        parts.append(_entries_ir(prefix, bool(checked & layout.BUDGET)))
    plan = ProgramLayout(prefix, tuple(helper_ids), bool(callbacks), TAIL_CALL_HELPER in helper_index,
                         callx, tuple(callbacks), tuple(fast.maps), tuple(sorted(fast.helpers)))
    return "\n".join(parts), plan


def module_header() -> str:
    """Declarations shared by every program in a module (once per module)."""
    return INTRINSICS + region_check_function() + fastpath.fast_functions()


class _FastSites:
    """Fast-path call sites found while emitting one program."""

    __slots__ = ("helpers", "maps")

    def __init__(self) -> None:
        #: map handle constant -> index in rt[FAST_MAPS]
        self.maps: dict[int, int] = {}
        self.helpers: set[int] = set()

    def map_index(self, handle: int) -> int:
        return self.maps.setdefault(handle, len(self.maps))


def _entries_ir(p: str, budgeted: bool = False) -> str:
    ef = layout.SLOT_ENTRY_FP
    reset = ""
    if budgeted:
        reset = f"""
  %bip = getelementptr i64, ptr %rt, i64 {layout.SLOT_BUDGET_INIT}
  %bi = load i64, ptr %bip
  %bp = getelementptr i64, ptr %rt, i64 {layout.SLOT_BUDGET}
  store i64 %bi, ptr %bp"""
    return f"""
define i64 @{p}_entry(i64 %a1, i64 %a2, i64 %a3, i64 %a4, i64 %a5, ptr %rt) {{{reset}
  %fpp = getelementptr i64, ptr %rt, i64 {ef}
  %fp = load i64, ptr %fpp
  %r = call i64 @{p}_f0(i64 %a1, i64 %a2, i64 %a3, i64 %a4, i64 %a5, i64 %fp, ptr %rt)
  ret i64 %r
}}
define i64 @{p}_entry1(i64 %a1, ptr %rt) {{{reset}
  %fpp = getelementptr i64, ptr %rt, i64 {ef}
  %fp = load i64, ptr %fpp
  %r = call i64 @{p}_f0(i64 %a1, i64 0, i64 0, i64 0, i64 0, i64 %fp, ptr %rt)
  ret i64 %r
}}
"""


def _labels(insns: list[Instruction], start: int, end: int) -> set[int]:
    """Instruction indices that begin a basic block."""
    labels = {start}
    for i in range(start, end):
        ins = insns[i]
        if not _is_real(insns, i):
            continue
        cls = ins.opcode & 0x07
        if cls not in (BPF_JMP, BPF_JMP32):
            continue
        code = ins.opcode & 0xF0
        if code in (BPF_CALL,):
            continue
        if code != BPF_EXIT and code != BPF_JA and i + 1 >= end:
            raise InvalidInstructionError(i, "conditional jump falls off the end of the function")
        labels.add(i + 1)
        if code == BPF_EXIT:
            continue
        target = i + (ins.imm if cls == BPF_JMP32 and code == BPF_JA else ins.off) + 1
        if not start <= target < end or not _is_real(insns, target):
            raise InvalidInstructionError(i, f"jump target {target} is outside the function "
                                             f"[{start}, {end})")
        labels.add(target)
    return labels


def _function_ir(insns: list[Instruction], p: str, start: int, end: int, exported: bool,
                 helper_index: dict[int, int], checked: bool | int, fast: _FastSites,
                 target: bool | TargetInfo | None = None) -> str:
    f = FunctionEmitter(bool(checked & layout.CHECK_MEMORY), start, target)
    budgeted = bool(checked & layout.BUDGET)
    labels = _labels(insns, start, end)
    attrs = " noinline" if start == 0 else ""
    e = f.emit
    linkage = "" if exported else "internal "
    e(f"define {linkage}i64 @{p}_f{start}(i64 %a1, i64 %a2, i64 %a3, i64 %a4, i64 %a5, i64 %fp, "
      f"ptr %rt){attrs} {{")
    e("entry:")
    for r in range(10):
        e(f"  %R{r} = alloca i64")
    for r in range(10):
        f.put(r, f"%a{r}" if 1 <= r <= 5 else "0")
    if any(insns[i].opcode == MAY_GOTO and _is_real(insns, i) for i in range(start, end)):
        # may_goto's budget: one counter per call of this function, like the kernel's hidden
        # stack slot that the function's prologue sets to BPF_MAX_LOOPS
        e("  %MG = alloca i64")
        e(f"  store i64 {BPF_MAX_LOOPS}, ptr %MG")
    e(f"  %slop = getelementptr i64, ptr %rt, i64 {layout.SLOT_STACK_LO}")
    e("  %slo = load i64, ptr %slop")
    if checked & layout.CHECK_MEMORY:
        for name, slot in (("rcs", layout.SLOT_RCACHE_START), ("rcl", layout.SLOT_RCACHE_LIMIT),
                           ("wcs", layout.SLOT_WCACHE_START), ("wcl", layout.SLOT_WCACHE_LIMIT)):
            e(f"  %{name} = getelementptr i64, ptr %rt, i64 {slot}")
    if helper_index and target:
        e(f"  %hfp = getelementptr i64, ptr %rt, i64 {layout.SLOT_HIT_FRAME}")
        e("  %hf = load i64, ptr %hfp")
    elif helper_index:
        e(f"  %htp = getelementptr i64, ptr %rt, i64 {layout.SLOT_HELPERS}")
        e("  %htabi = load i64, ptr %htp")
        e("  %htab = inttoptr i64 %htabi to ptr")
    f.flush()
    e(f"  br label %L{start}")
    terminated = True
    for pc in range(start, end):
        if not _is_real(insns, pc):
            continue
        if pc in labels:
            if not terminated:
                f.flush()
                e(f"  br label %L{pc}")
            f.label(f"L{pc}")
        f.pc = pc
        if budgeted and _is_back_edge(insns[pc], pc):
            _budget_tick(f, pc)
        terminated = _emit_insn(f, insns, pc, p, helper_index, fast)
    if not terminated:
        raise InvalidInstructionError(end - 1, "execution falls off the end of the function")
    e("unwind:")
    e("  ret i64 0")
    e("}")
    return "\n".join(f.lines)


def _emit_insn(f: FunctionEmitter, insns: list[Instruction], pc: int, p: str,
               helper_index: dict[int, int], fast: _FastSites) -> bool:
    """Emit one instruction; True if it ended the basic block."""
    ins = insns[pc]
    cls = ins.opcode & 0x07
    if cls in (BPF_ALU, BPF_ALU64):
        emit_alu(f, ins)
        return False
    if cls in (BPF_LDX, BPF_ST, BPF_STX):
        emit_mem(f, ins)
        return False
    if cls == BPF_LD:
        if ins.opcode != LDDW:
            raise NotSupportedError("legacy packet access (ld_abs/ld_ind)")
        if ins.src == BPF_PSEUDO_FUNC:
            f.put(ins.dst, f.op(f"ptrtoint ptr @{p}_f{pc + ins.imm + 1} to i64"))
        else:
            f.put(ins.dst, str(s64(ins.imm64)))
        return False
    return _emit_jmp(f, ins, cls, pc, p, helper_index, fast)


def _emit_jmp(f: FunctionEmitter, ins: Instruction, cls: int, pc: int, p: str,
              helper_index: dict[int, int], fast: _FastSites) -> bool:
    code = ins.opcode & 0xF0
    if code == BPF_EXIT and cls == BPF_JMP and not ins.opcode & BPF_X:
        f.emit(f"  ret i64 {f.get(0)}")
        return True
    if code == BPF_CALL and cls == BPF_JMP:
        if ins.src == BPF_CALL_HELPER and not ins.opcode & BPF_X and ins.imm in fastpath.FAST_HELPERS:
            _emit_fast_call(f, ins, pc, p, helper_index, fast)
        else:
            _emit_call(f, ins, pc, p, helper_index)
        return False
    if code == BPF_JA:
        if ins.opcode & BPF_X:
            raise InvalidInstructionError(pc, f"unknown jump opcode 0x{ins.opcode:02x}")
        target = pc + (ins.imm if cls == BPF_JMP32 else ins.off) + 1
        f.flush()
        f.emit(f"  br label %L{target}")
        return True
    if ins.opcode == MAY_GOTO:
        # the kernel's rewrite: if (budget == 0) goto target; budget -= 1
        left = f.op("load i64, ptr %MG")
        done = f.op(f"icmp eq i64 {left}, 0")
        dec = f.op(f"sub i64 {left}, 1")
        f.emit(f"  store i64 {f.op(f'select i1 {done}, i64 0, i64 {dec}')}, ptr %MG")
        f.flush()
        f.emit(f"  br i1 {done}, label %L{pc + ins.off + 1}, label %L{pc + 1}")
        return True
    if code != BPF_JSET and code not in _CONDS:
        raise InvalidInstructionError(pc, f"unknown jump opcode 0x{ins.opcode:02x}")
    if cls == BPF_JMP:
        ty, a = "i64", f.get(ins.dst)
        b = f.get(ins.src) if ins.opcode & BPF_X else str(s64(ins.imm))
    else:
        ty, a = "i32", f.get32(ins.dst)
        b = f.get32(ins.src) if ins.opcode & BPF_X else str(s32(ins.imm))
    if code == BPF_JSET:
        both = f.op(f"and {ty} {a}, {b}")
        cond = f.op(f"icmp ne {ty} {both}, 0")
    else:
        cond = f.op(f"icmp {_CONDS[code]} {ty} {a}, {b}")
    f.flush()
    f.emit(f"  br i1 {cond}, label %L{pc + ins.off + 1}, label %L{pc + 1}")
    return True


def _is_back_edge(ins: Instruction, pc: int) -> bool:
    """A jump whose target is at or before it (every loop has one)."""
    cls = ins.opcode & 0x07
    if cls not in (BPF_JMP, BPF_JMP32):
        return False
    code = ins.opcode & 0xF0
    if code in (BPF_EXIT, BPF_CALL):
        return False
    off = ins.imm if (code == BPF_JA and cls == BPF_JMP32) else ins.off
    return off < 0


def _budget_tick(f: FunctionEmitter, pc: int) -> None:
    """Count one back-edge; fault (FAULT_BUDGET, at this pc) when the budget is used up.
    Counted whether or not a conditional jump is taken: a bound, not an exact count."""
    f.flush()
    bp = f.op(f"getelementptr i64, ptr %rt, i64 {layout.SLOT_BUDGET}")
    left = f.op(f"load i64, ptr {bp}")
    nleft = f.op(f"sub i64 {left}, 1")
    f.emit(f"  store i64 {nleft}, ptr {bp}")
    out = f.op(f"icmp eq i64 {nleft}, 0")
    f.n += 1
    n = f.n
    f.emit(f"  br i1 {out}, label %budget{n}, label %go{n}")
    f.emit(f"budget{n}:")
    f.emit(f"  call void @bpf_fault(ptr %rt, i64 {pc}, i64 0, i64 {layout.FAULT_BUDGET << 16})")
    f.emit("  br label %unwind")
    f.emit(f"go{n}:")


def _status_check(f: FunctionEmitter) -> None:
    """After any call: leave at once if something below set STATUS."""
    st = f.op("load i64, ptr %rt")
    bad = f.op(f"icmp ne i64 {st}, 0")
    f.n += 1
    f.emit(f"  br i1 {bad}, label %unwind, label %c{f.n}")
    f.emit(f"c{f.n}:")


def _fn_from_slot(f: FunctionEmitter, table: str, index: int) -> str:
    """A function pointer loaded from slot ``index`` of an i64 table (helper table, runtime block)."""
    slot = f.op(f"getelementptr i64, ptr {table}, i64 {index}")
    return f.op(f"inttoptr i64 {f.op(f'load i64, ptr {slot}')} to ptr")


def _emit_call(f: FunctionEmitter, ins: Instruction, pc: int, p: str,
               helper_index: dict[int, int]) -> None:
    args = ", ".join(f"i64 {f.get(r)}" for r in range(1, 6))
    if ins.opcode & BPF_X:  # callx: helper id in the dst register
        if f.target:
            raise NotSupportedError("callx (dynamic helper calls) in the traced process")
        hid = f.get(ins.dst)
        fn = _fn_from_slot(f, "%rt", layout.SLOT_CALLX_FN)
        _store_cur_fp(f)
        f.put(0, f.op(f"call i64 {fn}(i64 {hid}, {args})"))
        _status_check(f)
        return
    if ins.src == BPF_PSEUDO_CALL:
        target = pc + ins.imm + 1
        nfp = f.op(f"sub i64 %fp, {layout.FRAME_SIZE}")
        lowest = f.op(f"add i64 %slo, {layout.FRAME_SIZE}")
        deep = f.op(f"icmp ult i64 {nfp}, {lowest}")
        f.n += 1
        n = f.n
        f.emit(f"  br i1 {deep}, label %deep{n}, label %call{n}")
        f.emit(f"deep{n}:")
        if not f.target:   # in the target (verified code only) a too-deep call just returns 0
            info = layout.FAULT_CALL_DEPTH << 16
            f.emit(f"  call void @bpf_fault(ptr %rt, i64 {pc}, i64 0, i64 {info})")
        f.emit("  br label %unwind")
        f.emit(f"call{n}:")
        f.put(0, f.op(f"call i64 @{p}_f{target}({args}, i64 {nfp}, ptr %rt)"))
        _status_check(f)
        return
    if f.target:
        if ins.imm == TAIL_CALL_HELPER:
            _emit_target_tail_call(f, pc, p)
        elif ins.imm == LOOP_HELPER:
            _emit_target_loop(f)
        elif ins.imm == FOR_EACH_HELPER:
            _emit_target_for_each(f)
        else:
            f.put(0, f.op(f"call i64 @{target_helper_symbol(ins.imm)}({args}, i64 %hf)"))
        return
    fn = _fn_from_slot(f, "%htab", helper_index[ins.imm])
    _store_cur_fp(f)
    result = f.op(f"call i64 {fn}({args})")
    if ins.imm != TAIL_CALL_HELPER:
        f.put(0, result)
        _status_check(f)
        return
    # bpf_tail_call: on a hit the trampoline already ran the target; this frame returns its r0
    _status_check(f)
    hitp = f.op(f"getelementptr i64, ptr %rt, i64 {layout.SLOT_TAIL_HIT}")
    hit = f.op(f"load i64, ptr {hitp}")
    taken = f.op(f"icmp ne i64 {hit}, 0")
    f.n += 1
    n = f.n
    f.emit(f"  br i1 {taken}, label %tail{n}, label %miss{n}")
    f.emit(f"tail{n}:")
    f.emit(f"  store i64 0, ptr {hitp}")
    f.emit(f"  ret i64 {result}")
    f.emit(f"miss{n}:")


def _emit_fast_call(f: FunctionEmitter, ins: Instruction, pc: int, p: str,
                    helper_index: dict[int, int], fast: _FastSites) -> None:
    """A helper call with a native fast path (``fastpath``) and the trampoline call as
    the fallback; the per-instance guard picks one at run time."""
    hid = ins.imm
    if f.target and hid not in (1, 2):
        # in the target, facts, clocks and ring buffers are the runtime's (multi-producer) helpers
        _emit_call(f, ins, pc, p, helper_index)
        return
    for r in range(1, 6):   # load the arguments here: both branches use them
        f.get(r)
    if hid in fastpath.MAP_HELPERS:
        r1 = f.get(1)
        if not r1.lstrip("-").isdigit() or int(r1) == 0:
            _emit_call(f, ins, pc, p, helper_index)   # map not known at compile time
            return
        # rt[FAST_MAPS] has MAP_GROUP entries per map: lookups, updates, ringbuf output
        k = fastpath.MAP_GROUP * fast.map_index(int(r1) & ((1 << 64) - 1)) + fastpath.MAP_HELPERS[hid]
        tp = f.op(f"getelementptr i64, ptr %rt, i64 {layout.SLOT_FAST_MAPS}")
        ti = f.op(f"load i64, ptr {tp}")
        tab = f.op(f"inttoptr i64 {ti} to ptr")
        dp = f.op(f"getelementptr i64, ptr {tab}, i64 {k}")
        guard = f.op(f"load i64, ptr {dp}")
        on = f.op(f"icmp ne i64 {guard}, 0")
    else:
        fast.helpers.add(hid)
        fp = f.op(f"getelementptr i64, ptr %rt, i64 {layout.SLOT_FAST_FLAGS}")
        flags = f.op(f"load i64, ptr {fp}")
        bit = f.op(f"and i64 {flags}, {fastpath.FAST_BITS[hid]}")
        on = f.op(f"icmp ne i64 {bit}, 0")
    f.n += 1
    n = f.n
    f.emit(f"  br i1 {on}, label %fast{n}, label %slow{n}")
    f.emit(f"fast{n}:")
    if hid == 1:
        chk = "true" if f.checked else "false"
        fv = f.op(f"call i64 @bpf_fast_lookup(i64 {guard}, i64 {f.get(2)}, ptr %rt, i64 {pc}, i1 {chk})")
        if f.checked:   # a refused key read set STATUS
            _status_check(f)
    elif hid in (2, 130):
        chk = "true" if f.checked else "false"
        fn = "bpf_fast_update" if hid == 2 else "bpf_fast_rb_output"
        fv = f.op(f"call i64 @{fn}(i64 {guard}, i64 {f.get(2)}, i64 {f.get(3)}, "
                  f"i64 {f.get(4)}, ptr %rt, i64 {pc}, i1 {chk})")
        if f.checked:
            _status_check(f)
        back = f.op(f"icmp eq i64 {fv}, {fastpath.UPDATE_FALLBACK}")
        f.emit(f"  br i1 {back}, label %slow{n}, label %fastend{n}")
    elif hid in fastpath.FACT_SLOTS:
        sp = f.op(f"getelementptr i64, ptr %rt, i64 {fastpath.FACT_SLOTS[hid]}")
        fv = f.op(f"load i64, ptr {sp}")
    elif hid in fastpath.CLOCK_IDS:
        fv = f.op(f"call i64 @bpf_fast_clock(ptr %rt, i32 {fastpath.CLOCK_IDS[hid]})")
    else:
        fv = f.op("call i64 @bpf_fast_prandom(ptr %rt)")
    if hid not in (2, 130):
        f.emit(f"  br label %fastend{n}")
    f.emit(f"fastend{n}:")
    f.emit(f"  br label %join{n}")
    f.emit(f"slow{n}:")
    saved = dict(f.vals)
    _emit_call(f, ins, pc, p, helper_index)
    sv = f.vals[0]
    f.vals.clear()
    f.vals.update(saved)
    f.emit(f"  br label %slowend{n}")
    f.emit(f"slowend{n}:")
    f.emit(f"  br label %join{n}")
    f.emit(f"join{n}:")
    f.put(0, f.op(f"phi i64 [{fv}, %fastend{n}], [{sv}, %slowend{n}]"))


def _emit_target_tail_call(f: FunctionEmitter, pc: int, p: str) -> None:
    """bpf_tail_call in target code: the prog array's table (arena) holds the targets' entries
    ``u64 tcentry(ctx, hit_frame, tail_calls)``; a hit makes this frame return the target's r0,
    a miss (empty slot, index out of range, 33 calls taken) continues with r0 unchanged."""
    r2 = f.get(2)
    if not r2.lstrip("-").isdigit() or (int(r2) & ((1 << 64) - 1)) not in f.target.tail_tables:
        raise NotSupportedError("a tail call through a prog array not known at compile time, in the traced process")
    table, entries = f.target.tail_tables[int(r2) & ((1 << 64) - 1)]
    r1 = f.get(1)
    idx = f.op(f"and i64 {f.get(3)}, 4294967295")
    f.n += 1
    n = f.n
    inb = f.op(f"icmp ult i64 {idx}, {entries}")
    f.emit(f"  br i1 {inb}, label %tcslot{n}, label %tcmiss{n}")
    f.emit(f"tcslot{n}:")
    slotp = f.op(f"getelementptr i64, ptr inttoptr (i64 {table} to ptr), i64 {idx}")
    ent = f.op(f"load atomic i64, ptr {slotp} unordered, align 8")
    cntp = f.op(f"getelementptr i64, ptr %rt, i64 {layout.SLOT_TAIL_COUNT}")
    cnt = f.op(f"load i64, ptr {cntp}")
    have = f.op(f"icmp ne i64 {ent}, 0")
    room = f.op(f"icmp ult i64 {cnt}, {MAX_TAIL_CALLS}")
    go = f.op(f"and i1 {have}, {room}")
    f.emit(f"  br i1 {go}, label %tchit{n}, label %tcmiss{n}")
    f.emit(f"tchit{n}:")
    fn = f.op(f"inttoptr i64 {ent} to ptr")
    more = f.op(f"add i64 {cnt}, 1")
    res = f.op(f"call i64 {fn}(i64 {r1}, i64 %hf, i64 {more})")
    f.emit(f"  ret i64 {res}")
    f.emit(f"tcmiss{n}:")


def _emit_target_loop(f: FunctionEmitter) -> None:
    """bpf_loop(nr_loops, callback, ctx, flags) in target code: the callback (a BPF function
    of this program, by address) runs in a frame below the caller's, as the kernel's does;
    returns the iterations run, -EINVAL for flags, -E2BIG above BPF_MAX_LOOPS."""
    nloops = f.op(f"and i64 {f.get(1)}, 4294967295")
    fn = f.op(f"inttoptr i64 {f.get(2)} to ptr")
    ctx, flags = f.get(3), f.get(4)
    f.n += 1
    n = f.n
    badf = f.op(f"icmp ne i64 {flags}, 0")
    big = f.op(f"icmp ugt i64 {nloops}, {BPF_MAX_LOOPS}")
    empty = f.op(f"icmp eq i64 {nloops}, 0")
    nfp = f.op(f"sub i64 %fp, {layout.FRAME_SIZE}")
    e = f.emit
    e(f"  br label %lpstart{n}")
    e(f"lpstart{n}:")
    e(f"  br i1 {badf}, label %lpend{n}, label %lpchk{n}")
    e(f"lpchk{n}:")
    e(f"  br i1 {big}, label %lpend{n}, label %lpchk2{n}")
    e(f"lpchk2{n}:")
    e(f"  br i1 {empty}, label %lpend{n}, label %lpbody{n}")
    e(f"lpbody{n}:")
    e(f"  %lpi{n} = phi i64 [0, %lpchk2{n}], [%lpnext{n}, %lpcont{n}]")
    ret = f.op(f"call i64 {fn}(i64 %lpi{n}, i64 {ctx}, i64 0, i64 0, i64 0, i64 {nfp}, ptr %rt)")
    e(f"  %lpnext{n} = add i64 %lpi{n}, 1")
    stop = f.op(f"icmp ne i64 {ret}, 0")
    e(f"  br i1 {stop}, label %lpend{n}, label %lpcont{n}")
    e(f"lpcont{n}:")
    last = f.op(f"icmp uge i64 %lpnext{n}, {nloops}")
    e(f"  br i1 {last}, label %lpend{n}, label %lpbody{n}")
    e(f"lpend{n}:")
    f.put(0, f.op(f"phi i64 [-22, %lpstart{n}], [-7, %lpchk{n}], [0, %lpchk2{n}], "
                  f"[%lpnext{n}, %lpbody{n}], [%lpnext{n}, %lpcont{n}]"))


def _emit_target_for_each(f: FunctionEmitter) -> None:
    """bpf_for_each_map_elem(map, callback, ctx, flags) in target code: the runtime walks the
    map (runtime/foreach.c) and calls the callback in a frame below the caller's, as bpf_loop's
    inline loop does; a constant map the runtime cannot walk keeps the program in the tracer."""
    r1 = f.get(1)
    known = f.target.for_each_maps
    if known is not None and r1.lstrip("-").isdigit() and (int(r1) & ((1 << 64) - 1)) not in known:
        raise NotSupportedError("bpf_for_each_map_elem on a map the in-target runtime cannot walk "
                                "(only array and hash maps), in the traced process")
    nfp = f.op(f"sub i64 %fp, {layout.FRAME_SIZE}")
    args = ", ".join(f"i64 {f.get(r)}" for r in range(1, 5))
    f.put(0, f.op(f"call i64 @{FOR_EACH_SYMBOL}({args}, i64 {nfp}, ptr %rt, i64 %hf)"))


def target_helper_symbol(helper_id: int) -> str:
    """The in-target runtime's function for kernel helper ``helper_id`` (runtime/*.c)."""
    return f"ubpf_helper_{helper_id}"


def _store_cur_fp(f: FunctionEmitter) -> None:
    """Before a helper call: where callbacks must put their frame, and the pc for fault reports."""
    slot = f.op(f"getelementptr i64, ptr %rt, i64 {layout.SLOT_CUR_FP}")
    f.emit(f"  store i64 %fp, ptr {slot}")
    slot = f.op(f"getelementptr i64, ptr %rt, i64 {layout.SLOT_CALL_PC}")
    f.emit(f"  store i64 {f.pc}, ptr {slot}")
