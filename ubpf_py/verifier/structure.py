"""Structural checks that need no abstract interpretation.

Before any path is walked the program must be well formed: every opcode known
(``unknown opcode``), every jump inside its own function and never into the
second slot of a lddw, every function ending in exit or a jump, every
instruction reachable, lddw pseudo sources resolvable.  This module also works
out the function boundaries, the prune points, and per-instruction register
liveness that the interpreter uses to ignore dead registers when pruning.
The kernel's messages (check_subprogs, check_cfg, resolve_pseudo_ldimm64) are
reused verbatim so tools that grep kernel logs keep working.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ubpf_py.helpers.protos import PROTOS
from ubpf_py.isa.instruction import Instruction
from ubpf_py.isa.opcodes import (
    ATOMIC_ADD,
    ATOMIC_AND,
    ATOMIC_OR,
    ATOMIC_XOR,
    BPF_ABS,
    BPF_ADD,
    BPF_ALU,
    BPF_ALU64,
    BPF_AND,
    BPF_ARSH,
    BPF_ATOMIC,
    BPF_B,
    BPF_CALL,
    BPF_CALL_HELPER,
    BPF_CMPXCHG,
    BPF_DIV,
    BPF_DW,
    BPF_END,
    BPF_EXIT,
    BPF_FETCH,
    BPF_H,
    BPF_IND,
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
    BPF_K,
    BPF_LD,
    BPF_LDX,
    BPF_LSH,
    BPF_MAY_GOTO,
    BPF_MEM,
    BPF_MEMSX,
    BPF_MOD,
    BPF_MOV,
    BPF_MUL,
    BPF_NEG,
    BPF_OR,
    BPF_PSEUDO_CALL,
    BPF_PSEUDO_FUNC,
    BPF_RSH,
    BPF_ST,
    BPF_STX,
    BPF_SUB,
    BPF_TO_BE,
    BPF_TO_LE,
    BPF_W,
    BPF_X,
    BPF_XCHG,
    BPF_XOR,
    LDDW,
    MAY_GOTO,
    SIZE_BYTES,
)


class StructureError(Exception):
    def __init__(self, msg: str, insn: int, hint: str = "") -> None:
        super().__init__(msg)
        self.msg = msg
        self.insn = insn
        self.hint = hint


def _valid_opcodes() -> frozenset[int]:
    ok: set[int] = set()
    for cls in (BPF_ALU, BPF_ALU64):
        for o in (BPF_ADD, BPF_SUB, BPF_MUL, BPF_DIV, BPF_OR, BPF_AND, BPF_LSH,
                  BPF_RSH, BPF_MOD, BPF_XOR, BPF_MOV, BPF_ARSH):
            ok.add(cls | o | BPF_K)
            ok.add(cls | o | BPF_X)
        ok.add(cls | BPF_NEG)
    ok.update({BPF_ALU | BPF_END | BPF_TO_LE, BPF_ALU | BPF_END | BPF_TO_BE,
               BPF_ALU64 | BPF_END | BPF_TO_LE})
    for cls in (BPF_JMP, BPF_JMP32):
        ok.add(cls | BPF_JA)
        for o in (BPF_JEQ, BPF_JGT, BPF_JGE, BPF_JSET, BPF_JNE, BPF_JSGT, BPF_JSGE,
                  BPF_JLT, BPF_JLE, BPF_JSLT, BPF_JSLE):
            ok.add(cls | o | BPF_K)
            ok.add(cls | o | BPF_X)
    ok.update({BPF_JMP | BPF_CALL, BPF_JMP | BPF_EXIT, MAY_GOTO})
    ok.add(LDDW)
    for sz in (BPF_B, BPF_H, BPF_W):
        ok.add(BPF_LD | BPF_ABS | sz)
        ok.add(BPF_LD | BPF_IND | sz)
        ok.add(BPF_LDX | BPF_MEMSX | sz)
    for sz in (BPF_B, BPF_H, BPF_W, BPF_DW):
        ok.add(BPF_LDX | BPF_MEM | sz)
        ok.add(BPF_ST | BPF_MEM | sz)
        ok.add(BPF_STX | BPF_MEM | sz)
    ok.add(BPF_STX | BPF_ATOMIC | BPF_W)
    ok.add(BPF_STX | BPF_ATOMIC | BPF_DW)
    return frozenset(ok)


VALID_OPCODES = _valid_opcodes()
ATOMIC_OPS = {ATOMIC_ADD, ATOMIC_OR, ATOMIC_AND, ATOMIC_XOR,
              ATOMIC_ADD | BPF_FETCH, ATOMIC_OR | BPF_FETCH, ATOMIC_AND | BPF_FETCH,
              ATOMIC_XOR | BPF_FETCH, BPF_XCHG, BPF_CMPXCHG}
_CLASS_NAME = {BPF_ALU: "BPF_ALU", BPF_ALU64: "BPF_ALU", BPF_LDX: "BPF_LDX",
               BPF_ST: "BPF_ST", BPF_STX: "BPF_STX"}


def _cond_jump_opcodes() -> frozenset[int]:
    return frozenset(c for c in VALID_OPCODES if c & 0x07 in (BPF_JMP, BPF_JMP32)
                     and c & 0xF0 not in (BPF_JA, BPF_CALL, BPF_EXIT))


#: the valid conditional jumps, and those with the two unconditional ones (ja, gotol)
_COND_JUMP_OPCODES = _cond_jump_opcodes()
_JUMP_OPCODES = _COND_JUMP_OPCODES | {BPF_JMP | BPF_JA, BPF_JMP32 | BPF_JA}


def is_cond_jump(code: int) -> bool:
    c = code & 0x07
    o = code & 0xF0
    return c in (BPF_JMP, BPF_JMP32) and o not in (BPF_JA, BPF_CALL, BPF_EXIT)


def jump_target(i: int, ins: Instruction) -> int:
    if ins.opcode == BPF_JMP32 | BPF_JA:
        return i + ins.imm + 1
    return i + ins.off + 1


def check_fields(i: int, ins: Instruction) -> None:
    """Reserved-field checks (the kernel does these in do_check; we do them up front)."""
    code = ins.opcode
    cls = code & 0x07
    if ins.dst > 10 or (ins.src > 10 and not (code == LDDW or code == BPF_JMP | BPF_CALL)):
        raise StructureError(f"R{max(ins.dst, ins.src)} is invalid", i, "registers are r0..r10")
    if cls == BPF_LD and code != LDDW:
        raise StructureError("BPF_LD_[ABS|IND] instructions not allowed for this program type", i,
                             "legacy packet loads are for socket filters, not uprobes")
    if cls in (BPF_ALU, BPF_ALU64):
        o = code & 0xF0
        name = "BPF_ALU"
        if o == BPF_NEG:
            if ins.src or ins.off or ins.imm:
                raise StructureError("BPF_NEG uses reserved fields", i)
        elif o == BPF_END:
            if ins.src or ins.off or ins.imm not in (16, 32, 64):
                raise StructureError("BPF_END uses reserved fields", i)
        elif o == BPF_MOV:
            if code & BPF_X:
                allowed = (0, 8, 16, 32) if cls == BPF_ALU64 else (0, 8, 16)
                if ins.imm or ins.off not in allowed:
                    raise StructureError("BPF_MOV uses reserved fields", i)
            elif ins.src or ins.off:
                raise StructureError("BPF_MOV uses reserved fields", i)
        else:
            allowed_off = (0, 1) if o in (BPF_DIV, BPF_MOD) else (0,)
            if ins.off not in allowed_off or (code & BPF_X and ins.imm) or \
                    (not code & BPF_X and ins.src):
                raise StructureError(f"{name} uses reserved fields", i)
    elif cls == BPF_LDX:
        if ins.imm:
            raise StructureError("BPF_LDX uses reserved fields", i)
    elif cls == BPF_ST:
        if ins.src:
            raise StructureError("BPF_ST uses reserved fields", i)
    elif cls == BPF_STX:
        if code & 0xE0 == BPF_ATOMIC:
            if ins.imm not in ATOMIC_OPS:
                raise StructureError(f"BPF_ATOMIC uses invalid atomic opcode {ins.imm:02x}", i)
        elif ins.imm:
            raise StructureError("BPF_STX uses reserved fields", i)
    elif cls in (BPF_JMP, BPF_JMP32):
        o = code & 0xF0
        if code == MAY_GOTO:
            if ins.src != BPF_MAY_GOTO or ins.dst or ins.imm:
                raise StructureError(f"invalid may_goto imm {ins.imm}", i)
        elif o == BPF_CALL:
            if ins.off or ins.dst or ins.src not in (0, 1, 2):
                raise StructureError("BPF_CALL uses reserved fields", i)
        elif o == BPF_EXIT:
            if ins.src or ins.dst or ins.off or ins.imm:
                raise StructureError("BPF_EXIT uses reserved fields", i)
        elif o == BPF_JA:
            if ins.src or ins.dst or (cls == BPF_JMP and ins.imm) or (cls == BPF_JMP32 and ins.off):
                raise StructureError("BPF_JA uses reserved fields", i)
        elif code & BPF_X:
            if ins.imm:
                raise StructureError("BPF_JMP/JMP32 uses reserved fields", i)
        elif ins.src:
            raise StructureError("BPF_JMP/JMP32 uses reserved fields", i)


@dataclass
class Cfg:
    n: int
    #: first instruction of every function, sorted (0 first)
    subprogs: list[int]
    #: function start -> end (exclusive)
    ends: dict[int, int]
    #: starts of functions used as callbacks (lddw src=4)
    callbacks: set[int]
    prune_points: set[int]
    #: live-in register bit sets per instruction
    live_in: list[int] = field(default_factory=list)
    #: per instruction, the 8-byte stack slots (bit k = bytes [k*8-512, k*8-504)) of the
    #: current frame that may still be read; STACK_ALL when unknown
    stack_live: list[int] = field(default_factory=list)
    #: instruction -> function start
    owner: list[int] = field(default_factory=list)
    #: ``precision_demand``'s graph, built on first use
    demand_graph: tuple | None = None
    #: successors per instruction and the lddw second slots (for recomputing liveness)
    succ: list[tuple[int, ...]] = field(default_factory=list)
    second: set[int] = field(default_factory=set)
    #: prune points the kernel does not have (fall-throughs of conditional jumps): a
    #: checkpoint there does not count for the kernel's spacing of checkpoints
    extra_points: set[int] = field(default_factory=set)
    #: (stack slots used, stack slots defined) per instruction, as ``_stack_use_def``
    stack_ud: list[tuple[int, int]] = field(default_factory=list)
    #: (insn, is a helper call) whose stack reads ``observed_stack_liveness`` learns in the walk
    observed_sites: list[tuple[int, bool]] | None = None
    #: predecessors per instruction (the backward analyses run several times per program)
    preds: list[list[int]] = field(default_factory=list)

    def func_of(self, insn: int) -> int:
        return self.owner[insn]


#: what an instruction does to the control flow, by opcode (valid opcodes only): the next
#: instruction (_PLAIN), a conditional jump (_COND, may_goto too), ja (_JA), gotol (_JA32),
#: exit, lddw (two slots) and call.  ``analyse`` dispatches on it once per instruction.
_PLAIN, _COND, _JA, _JA32, _EXIT, _LDDW, _CALL = range(7)
_FLOW = {c: (_COND if c in _COND_JUMP_OPCODES else _JA if c == BPF_JMP | BPF_JA
             else _JA32 if c == BPF_JMP32 | BPF_JA else _EXIT if c == BPF_JMP | BPF_EXIT
             else _LDDW if c == LDDW else _CALL if c == BPF_JMP | BPF_CALL else _PLAIN)
         for c in VALID_OPCODES}


def analyse(insns: list[Instruction], function_starts: set[int] | None = None) -> Cfg:
    """Run every structural check and return the control-flow facts.

    The checks report what the kernel's would, in its order: opcodes and lddw/call
    encodings first (in instruction order), then function starts inside a lddw, reserved
    fields, jumps leaving their function and function ends, and reachability last.  One pass
    over the instructions does the first group and collects the jumps and calls; the later
    checks look only at those (this runs once per program verified: it is kept cheap)."""
    n = len(insns)
    if n == 0:
        raise StructureError("empty program", 0, "the program has no instructions")
    second_slot = set()
    subprogs = {0}
    callbacks: set[int] = set()
    flow = _FLOW
    succ: list[tuple[int, ...]] = [()] * n
    #: (insn, target, conditional) per jump, and the call instructions, in instruction order
    jumps: list[tuple[int, int, bool]] = []
    calls: list[int] = []
    i = 0
    while i < n:
        ins = insns[i]
        kind = flow.get(ins.opcode)
        if kind == _PLAIN:
            succ[i] = (i + 1,)
        elif kind == _COND:
            t = i + ins.off + 1
            succ[i] = (i + 1, t)
            jumps.append((i, t, True))
        elif kind == _CALL:
            succ[i] = (i + 1,)
            calls.append(i)
            if ins.src == BPF_PSEUDO_CALL:
                t = i + ins.imm + 1
                if not 0 <= t < n:
                    raise StructureError(f"jump out of range from insn {i} to {t}", i)
                subprogs.add(t)
        elif kind == _LDDW:
            if i + 1 >= n or insns[i + 1].opcode != 0 or insns[i + 1].dst or insns[i + 1].src \
                    or insns[i + 1].off:
                raise StructureError("invalid bpf_ld_imm64 insn", i,
                                     "lddw needs a second slot with opcode 0")
            if ins.off:
                raise StructureError("invalid bpf_ld_imm64 insn", i)
            if ins.src == BPF_PSEUDO_FUNC:
                t = i + ins.imm + 1
                if not 0 <= t < n:
                    raise StructureError("call to invalid destination", i)
                subprogs.add(t)
                callbacks.add(t)
            succ[i] = (i + 2,)
            second_slot.add(i + 1)
            i += 2
            continue
        elif kind in (_JA, _JA32):
            t = i + (ins.off if kind == _JA else ins.imm) + 1
            succ[i] = (t,)
            jumps.append((i, t, False))
        elif kind is None:
            raise StructureError(f"unknown opcode {ins.opcode:02x}", i, "not a BPF instruction")
        i += 1
    if function_starts:
        subprogs.update(s for s in function_starts if 0 <= s < n)
    starts = sorted(subprogs)
    for s in starts:
        if s in second_slot:
            raise StructureError(f"jump into the middle of ldimm64 insn {s - 1}", s - 1)
    ends = {s: (starts[k + 1] if k + 1 < len(starts) else n) for k, s in enumerate(starts)}
    owner = [0] * n
    for s in starts:
        owner[s:ends[s]] = [s] * (ends[s] - s)
    for i, ins in enumerate(insns):
        if i in second_slot:
            continue
        check_fields(i, ins)
    # jumps stay within their function; every function ends in exit or a jump (the first
    # problem in instruction order is reported, a jump's before its function's end)
    bad_jump = next(((i, t) for i, t, _ in jumps if not owner[i] <= t < ends[owner[i]]), None)
    bad_end = None
    for s in starts:
        last = ends[s] - 1
        i = last - 1 if last in second_slot else last
        if flow[insns[i].opcode] not in (_EXIT, _JA, _JA32) and (bad_end is None or i < bad_end):
            bad_end = i
    if bad_jump is not None and (bad_end is None or bad_jump[0] <= bad_end):
        i, t = bad_jump
        raise StructureError(f"jump out of range from insn {i} to {t}", i, "the jump leaves its function")
    if bad_end is not None:
        raise StructureError("last insn is not an exit or jmp", bad_end,
                             "every function must end in exit or a jump")
    # the kernel's prune points are a conditional jump itself (one check covers both
    # successors) and its target; the fall-through too here (more chances to prune, fewer
    # insns), an extra point that the checkpoint spacing ignores
    prune: set[int] = set(starts)
    fallthrough: set[int] = set()
    for i, t, cond in jumps:
        if cond:
            prune.add(i)
            fallthrough.add(i + 1)
        prune.add(t)
    for i in calls:
        prune.add(i + 1)
        if insns[i].src == BPF_PSEUDO_CALL:
            prune.add(i)
    # reachability, function by function
    for s in starts:
        seen = {s}
        todo = [s]
        while todo:
            j = todo.pop()
            for t in succ[j]:
                if t in second_slot:
                    raise StructureError(f"jump into the middle of ldimm64 insn {t - 1}", j)
                if t not in seen:
                    seen.add(t)
                    todo.append(t)
        if len(seen) < ends[s] - s:
            for j in range(s, ends[s]):
                if j not in seen and j not in second_slot:
                    raise StructureError(f"unreachable insn {j}", j, "dead code; the kernel refuses it too")
    cfg = Cfg(n, starts, ends, callbacks, prune | fallthrough, owner=owner)
    cfg.extra_points = fallthrough - prune
    preds: list[list[int]] = [[] for _ in range(n)]
    for i in range(n):
        for t in succ[i]:
            if t < n:
                preds[t].append(i)
    cfg.succ, cfg.second, cfg.preds = succ, second_slot, preds
    cfg.live_in, cfg.stack_live = _liveness(insns, cfg)
    return cfg


STACK_ALL = (1 << 64) - 1
#: helper id -> number of parameters (from the prototypes the checker uses)
_HELPER_NPARAMS = {hid: len(p.args) for hid, p in PROTOS.items()}
#: helper id -> argument kinds (``precision_demand``'s ``helper_args``)
HELPER_ARGS = {hid: p.args for hid, p in PROTOS.items()}
#: helpers that read or write no memory through their arguments (their calls keep stack slots dead)
_NO_MEMORY_HELPERS = frozenset({5, 7, 8, 14, 15, 35, 42, 80, 109, 117, 118, 123, 125, 160, 173, 174, 208})


def _slots(off: int, size: int) -> int:
    bits = 0
    for a in range(off, off + size):
        k = (512 + a) // 8
        if 0 <= k < 64:
            bits |= 1 << k
    return bits


def _stack_use_def(ins: Instruction) -> tuple[int, int]:
    """(slots read, slots fully overwritten) by one instruction, for the current frame."""
    code = ins.opcode
    cls = code & 0x07
    if cls == BPF_LDX:
        return (_slots(ins.off, SIZE_BYTES[code & 0x18]) if ins.src == 10 else STACK_ALL), 0
    if cls in (BPF_ST, BPF_STX):
        size = SIZE_BYTES[code & 0x18]
        if cls == BPF_STX and code & 0xE0 == BPF_ATOMIC:
            return (_slots(ins.off, size) if ins.dst == 10 else STACK_ALL), 0
        if ins.dst == 10 and size == 8 and ins.off % 8 == 0:
            return 0, _slots(ins.off, 8)
        return 0, 0
    if code == BPF_JMP | BPF_CALL:
        if ins.src == 0 and ins.imm in _NO_MEMORY_HELPERS:
            return 0, 0
        return STACK_ALL, 0  # helpers and callees may read the stack through pointers
    return 0, 0


#: helpers whose stack reads all go through their memory arguments (no callbacks)
OBSERVED_HELPERS = frozenset(h for h, p in PROTOS.items() if not {"func", "stack_or_null"} & set(p.args))


def observed_stack_liveness(insns: list[Instruction], cfg: Cfg, stack_access: set[int],
                            helper_reads: dict[int, int], prev: list[int] | None = None,
                            dirty: set[int] | None = None) -> list[int]:
    """Stack-slot liveness with what the walk saw: a load through a register other than r10
    reads the stack only if some path had a stack pointer there (``stack_access``), and a
    helper call reads the slots some path passed it (``helper_reads``: call -> slot bits, all
    of them when a pointer into another frame was passed).  Like the kernel's, this is used
    for finished checkpoints only, whose paths have all been walked.  ``prev``/``dirty``: the
    result before the instructions in ``dirty`` were added to those (reads only grow)."""
    second = cfg.second
    if cfg.observed_sites is None:
        # the instructions whose stack reads depend on what the walk saw: loads and atomics
        # through a register other than r10 (False), calls of observed helpers (True)
        sites = []
        for i, ins in enumerate(insns):
            code = ins.opcode
            cls = code & 0x07
            if i in second:
                continue
            if (cls == BPF_LDX and ins.src != 10) or \
                    (cls == BPF_STX and code & 0xE0 == BPF_ATOMIC and ins.dst != 10):
                sites.append((i, False))
            elif code == BPF_JMP | BPF_CALL and ins.src == BPF_CALL_HELPER and \
                    ins.imm in OBSERVED_HELPERS:
                sites.append((i, True))
        cfg.observed_sites = sites
    ud = list(cfg.stack_ud)
    for i, helper in cfg.observed_sites:
        ud[i] = (helper_reads.get(i, 0) if helper else STACK_ALL if i in stack_access else 0), 0
    if prev is None or dirty is None:
        return _backward_liveness(cfg.succ, cfg.preds, ud)
    return _backward_liveness(cfg.succ, cfg.preds, ud, init=prev, work=[i for i in dirty if i not in second])


def _use_def(ins: Instruction) -> tuple[int, int]:
    code = ins.opcode
    cls = code & 0x07
    d, s = 1 << ins.dst, 1 << ins.src
    if cls in (BPF_ALU, BPF_ALU64):
        o = code & 0xF0
        if o == BPF_MOV:
            return (s if code & BPF_X else 0), d
        if o in (BPF_NEG, BPF_END):
            return d, d
        return d | (s if code & BPF_X else 0), d
    if cls == BPF_LDX:
        return s, d
    if cls == BPF_ST:
        return d, 0
    if cls == BPF_STX:
        if code & 0xE0 == BPF_ATOMIC:
            if ins.imm == BPF_CMPXCHG:
                return d | s | 1, 1
            return d | s, (s if ins.imm & BPF_FETCH else 0)
        return d | s, 0
    if code == LDDW:
        return 0, d
    if cls == BPF_LD:  # ABS/IND
        return (1 << 6) | s, 0x3F
    if cls in (BPF_JMP, BPF_JMP32):
        o = code & 0xF0
        if o == BPF_CALL:
            # a helper reads only its parameters (the kernel's compute_live_registers uses the
            # prototype too); other calls may read r1-r5
            n = _HELPER_NPARAMS.get(ins.imm, 5) if ins.src == BPF_CALL_HELPER else 5
            return ((1 << (n + 1)) - 2), 0x3F
        if o == BPF_EXIT:
            return 1, 0
        if o == BPF_JA or code == MAY_GOTO:
            return 0, 0
        return d | (s if code & BPF_X else 0), 0
    return 0, 0


_LIVE_SLOT0 = 16


def _liveness(insns: list[Instruction], cfg: Cfg) -> tuple[list[int], list[int]]:
    """Registers live at each instruction (bit r; r10, the frame pointer, always is) and the
    kernel's stack-slot read marks, statically: a slot no later instruction of this frame may
    read does not matter when comparing states (pointers into the stack make every slot live
    at helper and function calls, and at loads through other registers).  Both problems are
    solved in one pass (registers in bits 0-10, stack slots from bit 16); the stack's
    (use, def) per instruction stays on ``cfg`` for ``observed_stack_liveness``."""
    second = cfg.second
    n = len(insns)
    none = (0, 0)
    stack_ud = [none] * n
    both = [none] * n
    alu = (BPF_ALU, BPF_ALU64)
    for i, ins in enumerate(insns):
        if i in second:
            continue
        code = ins.opcode
        if code & 0x07 in alu:
            # the commonest instructions, inline (``_use_def``'s rule; no stack effect)
            d = 1 << ins.dst
            o = code & 0xF0
            if o == BPF_MOV:
                both[i] = ((1 << ins.src if code & BPF_X else 0), d)
            elif o in (BPF_NEG, BPF_END):
                both[i] = (d, d)
            else:
                both[i] = (d | (1 << ins.src if code & BPF_X else 0), d)
            continue
        ru, rd = _use_def(ins)
        stack_ud[i] = su_sd = _stack_use_def(ins)
        both[i] = (ru | (su_sd[0] << _LIVE_SLOT0), rd | (su_sd[1] << _LIVE_SLOT0))
    cfg.stack_ud = stack_ud
    live = _backward_liveness(cfg.succ, cfg.preds, both, always=1 << 10)
    return [x & 0x7FF for x in live], [x >> _LIVE_SLOT0 for x in live]


def _backward_liveness(succ: list[tuple[int, ...]], preds: list[list[int]], ud: list[tuple[int, int]],
                       always: int = 0, init: list[int] | None = None,
                       work: list[int] | None = None) -> list[int]:
    """Live-in bit sets per instruction: a worklist solution of live = use | (live-out & ~def)
    over the CFG (``ud``: (use bits, def bits) per instruction, nothing for lddw second slots).
    ``init``/``work``: the solution before some uses grew and the instructions whose uses
    grew; uses only grow, so the walk resumes from there to the same fixpoint."""
    n = len(ud)
    live = [0] * n if init is None else list(init)
    work = list(range(n)) if work is None else sorted(work)
    inq = [False] * n
    for i in work:
        inq[i] = True
    while work:
        i = work.pop()
        inq[i] = False
        out = 0
        for t in succ[i]:
            if t < n:
                out |= live[t]
        use, dfn = ud[i]
        new = use | (out & ~dfn) | always
        if new != live[i]:
            live[i] = new
            for p in preds[i]:
                if not inq[p]:
                    inq[p] = True
                    work.append(p)
    return live


# -- precision demand ------------------------------------------------------------------
#
# The kernel only compares a scalar's range when pruning if that scalar is
# "precise": its value later decides a branch, a memory offset, a helper size,
# or a return value.  It finds that out lazily by backtracking.  We compute an
# over-approximation statically: a backward data-flow over registers and
# r10-relative stack slots (loads through other pointers demand every slot).
# A fact is an int: bits 0-10 registers, bit 11 "every stack slot", bits
# 16-79 stack slots (slot k = bytes [k*8-512, k*8-504)).

ALL_STACK = 1 << 11
SLOT0 = _SLOT0 = 16
SLOT_MASK = ((1 << 64) - 1) << _SLOT0


def _slot_bits(off: int, size: int) -> int:
    bits = 0
    for a in (off, off + size - 1):
        k = (512 + a) // 8
        if 0 <= k < 64:
            bits |= 1 << (_SLOT0 + k)
    return bits


def _demand_graph(insns: list[Instruction], cfg: Cfg) -> tuple:
    """(lddw second slots, successors, predecessors, call sites per function) for
    ``precision_demand``; built once per program (kept on the Cfg)."""
    if cfg.demand_graph is not None:
        return cfg.demand_graph
    # the same graph ``analyse`` built (lddw second slots have no successors)
    second, succ, preds = cfg.second, cfg.succ, cfg.preds
    # call sites of each function: start -> [(call insn, resumes at)]
    sites: dict[int, list[tuple[int, int]]] = {}
    for i, ins in enumerate(insns):
        if ins.opcode == BPF_JMP | BPF_CALL and ins.src == BPF_PSEUDO_CALL:
            sites.setdefault(i + ins.imm + 1, []).append((i, i + 1))
    cb_sites = [i for i, ins in enumerate(insns)
                if ins.opcode == BPF_JMP | BPF_CALL and ins.src == 0 and ins.imm in (164, 181)]
    for s in cfg.callbacks:
        sites.setdefault(s, []).extend((c, c) for c in cb_sites)
        sites[s].extend((c, c + 1) for c in cb_sites)
    cfg.demand_graph = (second, succ, preds, sites)
    return cfg.demand_graph


def precision_demand(insns: list[Instruction], cfg: Cfg, helper_args: dict[int, tuple[str, ...]],
                     decided: set[int] | None = None, stack_access: set[int] | None = None,
                     precise_reads: dict[int, int] | None = None, *,
                     init: list[int] | None = None, dirty: set[int] | None = None) -> list[int]:
    """Per instruction: which registers / stack slots may later need exact values.

    ``decided``: the conditional jumps whose outcome the walk has found decided by the
    values (the kernel marks a branch's operands precise only then); None = all jumps.
    ``stack_access``: the loads/stores through a register other than r10 that the walk found
    pointing into the stack (only those can read or write a stack slot; the kernel knows the
    pointer's type when it backtracks); None = every such access may.
    ``precise_reads``: helper call -> stack-slot demand bits whose exact value it needs (a
    constant map key that decides whether the lookup can fail).
    ``init``/``dirty``: the fixpoint computed with smaller sets and the instructions added to
    them since; facts only grow with the sets, so the walk resumes from there.
    """
    n = cfg.n
    second, succ, preds, sites = _demand_graph(insns, cfg)
    fact = list(init) if init is not None else [0] * n

    def exit_fact(i: int) -> int:
        # r0 at a function's exit is precise if a caller needs it precisely after the call
        # (the kernel backtracks through the return); a callback's always is (checked in [0, 1])
        f = cfg.owner[i]
        out = 1 if f in cfg.callbacks else 0
        for _, resume in sites.get(f, ()):
            if resume < n:
                if fact[resume] & (SLOT_MASK | ALL_STACK):
                    out |= ALL_STACK
                out |= fact[resume] & 1
        return out

    def transfer(i: int, out: int) -> int:
        ins = insns[i]
        code = ins.opcode
        cls = code & 0x07
        d, s = 1 << ins.dst, 1 << ins.src
        if cls in (BPF_ALU, BPF_ALU64):
            o = code & 0xF0
            if o == BPF_MOV:
                res = out & ~d
                if code & BPF_X and out & d:
                    res |= s
                return res
            if code & BPF_X and out & d:
                return out | s
            return out
        if cls == BPF_LDX:
            res = out & ~d
            if out & d:
                if ins.src == 10:
                    res |= _slot_bits(ins.off, SIZE_BYTES[code & 0x18])
                elif stack_access is None or i in stack_access:
                    res |= ALL_STACK
            return res | s
        if cls in (BPF_ST, BPF_STX):
            res = out | d
            if cls == BPF_STX:
                if code & 0xE0 == BPF_ATOMIC:
                    on_stack = ins.dst == 10 or stack_access is None or i in stack_access
                    return res | s | 1 | (ALL_STACK if on_stack else 0)
                if ins.dst == 10:
                    if out & (ALL_STACK | _slot_bits(ins.off, SIZE_BYTES[code & 0x18])):
                        res |= s
                elif out & (ALL_STACK | SLOT_MASK) and (stack_access is None or i in stack_access):
                    res |= s
            return res
        if code == LDDW:
            return out & ~d
        if cls in (BPF_JMP, BPF_JMP32):
            o = code & 0xF0
            if o == BPF_EXIT:
                # the main program's return value is never checked for kprobe programs
                return 0 if cfg.owner[i] == 0 else exit_fact(i)
            if o == BPF_CALL:
                res = out & ~0x3F
                if ins.src == BPF_PSEUDO_CALL:
                    t = i + ins.imm + 1
                    return res | 0x3E | (fact[t] & ALL_STACK if 0 <= t < n else ALL_STACK)
                args = helper_args.get(ins.imm, ("x",) * 5)
                for k, kind in enumerate(args):
                    if kind != "anything":
                        res |= 1 << (k + 1)
                if precise_reads:
                    res |= precise_reads.get(i, 0)
                if ins.imm in (164, 181):
                    res |= ALL_STACK if not cfg.callbacks else 0
                    for cb in cfg.callbacks:
                        res |= fact[cb] & ALL_STACK
                return res
            if o == BPF_JA or code == MAY_GOTO:
                return out
            if decided is not None and i not in decided:
                return out
            return out | d | (s if code & BPF_X else 0)
        return out | 0x7FF

    # a worklist over the instructions whose facts may grow: all of them, or those whose
    # transfer changed since ``init``; then the exits whose callers' facts grew (an exit's fact
    # depends on the instruction after each call to its function, which is no successor), and
    # only their predecessors again, until nothing grows
    if init is not None and dirty is not None:
        work = sorted(i for i in dirty if i not in second)
    else:
        work = [i for i in range(n) if i not in second]
    ends = cfg.ends
    callees = sites.keys() | cfg.callbacks
    alu_classes = (BPF_ALU, BPF_ALU64)
    jmp_classes = (BPF_JMP, BPF_JMP32)
    no_test = (BPF_JA, BPF_CALL, BPF_EXIT)
    for _ in range(50):
        inq = bytearray(n)
        for i in work:
            inq[i] = 1
        while work:
            i = work.pop()
            inq[i] = 0
            out = 0
            for t in succ[i]:
                if t < n:
                    out |= fact[t]
            # the commonest transfers inline (the same rules as ``transfer``): this loop runs
            # over every instruction of the program once per verification
            ins = insns[i]
            code = ins.opcode
            cls = code & 0x07
            if cls in alu_classes:
                d = 1 << ins.dst
                if code & 0xF0 == BPF_MOV:
                    new = out & ~d
                    if code & BPF_X and out & d:
                        new |= 1 << ins.src
                elif code & BPF_X and out & d:
                    new = out | 1 << ins.src
                else:
                    new = out
            elif cls in jmp_classes and code & 0xF0 not in no_test and code != MAY_GOTO:
                if decided is not None and i not in decided:
                    new = out
                else:
                    new = out | 1 << ins.dst | (1 << ins.src if code & BPF_X else 0)
            else:
                new = transfer(i, out)
            old = fact[i]
            new |= old
            if new != old:
                fact[i] = new
                for p in preds[i]:
                    if not inq[p]:
                        inq[p] = 1
                        work.append(p)
                # calls into this function's start feed their callers
                if i in callees:
                    for c, _ in sites.get(i, ()):
                        if not inq[c]:
                            inq[c] = 1
                            work.append(c)
        # exits depend on callers' facts
        grown: set[int] = set()
        for f, lst in sites.items():
            for _, resume in lst:
                if resume >= n:
                    continue
                want = (ALL_STACK if fact[resume] & (SLOT_MASK | ALL_STACK) else 0) | (fact[resume] & 1)
                if want:
                    for j in range(f, ends[f]):
                        if insns[j].opcode == BPF_JMP | BPF_EXIT and want & ~fact[j]:
                            fact[j] |= want
                            grown.add(j)
        if not grown:
            break
        work = sorted(grown.union(*(preds[j] for j in grown)))
    return fact
