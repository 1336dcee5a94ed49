"""Abstract interpretation of every path through a program (the kernel's do_check).

The walk is depth first: at a conditional jump whose outcome is not known the
taken side is pushed and the fall-through side continues.  At prune points
(jump targets, after calls) the current state is compared with states already
proven safe there; if one of them covers it, the path stops.  A state equal to
one still being explored on the same path is an infinite loop.  Bounded loops
are simply unrolled until they exit, as the kernel does, under the
1,000,000-instruction budget.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ubpf_py.isa import opcodes as op
from ubpf_py.isa.instruction import Instruction
from ubpf_py.obj.spec import MapSpec, ProgramSpec
from ubpf_py.verifier import alu as A
from ubpf_py.verifier import arith as AR
from ubpf_py.verifier import btfptr as BP
from ubpf_py.verifier import calls as C
from ubpf_py.verifier import globalfuncs as G
from ubpf_py.verifier import mapfields as MF
from ubpf_py.verifier import memory as M
from ubpf_py.verifier import state as S
from ubpf_py.verifier.memory import Reject
from ubpf_py.verifier.scalar import Scalar
from ubpf_py.verifier.stackdepth import check_stack_depth
from ubpf_py.verifier.state import Checkpoint, Reg, VerifierState
from ubpf_py.verifier.structure import ALL_STACK as ALL_STACK_DEMAND
from ubpf_py.verifier.structure import (
    HELPER_ARGS,
    SLOT0,
    STACK_ALL,
    Cfg,
    is_cond_jump,
    jump_target,
    observed_stack_liveness,
    precision_demand,
)

COMPLEXITY_LIMIT = 1_000_000
JMP_SEQ_LIMIT = 8192
_HELPER_CALLBACKS = (164, 181)
_FAST_K64 = AR.FAST_K64
_ALU_CLASSES = (op.BPF_ALU, op.BPF_ALU64)
_LDX, _STX, _ST, _LDDW = op.BPF_LDX, op.BPF_STX, op.BPF_ST, op.LDDW
_JMP_CLASSES = (op.BPF_JMP, op.BPF_JMP32)
_JA64, _JA, _CALL, _EXIT, _MAY_GOTO = op.BPF_JMP | op.BPF_JA, op.BPF_JA, op.BPF_CALL, op.BPF_EXIT, op.MAY_GOTO
_SIZE_BYTES = op.SIZE_BYTES
#: pointer types a comparison with 0 decides (the kernel's reg_not_null)
_NOT_NULL = frozenset({S.MAP_VALUE, S.MAP_KEY, S.MEM, S.RINGBUF_MEM, S.TRUSTED_BTF_PTR})


@dataclass
class Failure:
    msg: str
    insn: int
    hint: str
    extra: list[str]
    state: VerifierState | None
    trail: tuple | None


@dataclass
class Stats:
    processed: int = 0
    states: int = 0
    max_states_per_insn: int = 0
    stack_depth: dict[int, int] = field(default_factory=dict)


class Checker:
    def __init__(self, prog: ProgramSpec, maps: list[MapSpec], cfg: Cfg, global_funcs: dict[int, G.GlobalFunc],
                 log_level: int = 1, time_budget: float = 30.0) -> None:
        self.prog = prog
        self.insns: list[Instruction] = prog.instructions
        A.reset_memo()
        S.reset_memo()
        # inner map templates of map-in-maps get indexes after the object's maps: a lookup
        # in the outer map gives a pointer to (a map like) the template
        self.maps = list(maps)
        self.n_object_maps = len(maps)
        self.map_field_loads: dict[int, tuple[tuple, int]] = {}
        self.btf_loads: dict[int, set[tuple]] = {}
        self.inner_of: dict[int, int] = {}
        for i, m in enumerate(maps):
            if m.type in M.MAP_IN_MAP and m.inner is not None:
                self.inner_of[i] = len(self.maps)
                self.maps.append(m.inner)
        self.cfg = cfg
        self.sleepable = prog.sleepable
        self.global_funcs = global_funcs
        self.log_level = log_level
        self.trace: list[str] = []
        self.stats = Stats()
        self.explored: dict[int, list[Checkpoint]] = {}
        self.open_sigs: dict[int, dict[S.Signature, Checkpoint]] = {}
        #: hashes of the top frame's registers of the open checkpoints per instruction (a cheap
        #: pre-check before the full signature of the infinite-loop test)
        self.open_fps: dict[int, dict[int, int]] = {}
        self.jumps = 0
        #: (insns, jumps) processed at the last checkpoint at one of the kernel's prune points
        self._last_cp = (0, 0)
        self.time_budget = time_budget
        self.test_mem_size: int | None = None
        self.pending: list[tuple[VerifierState, int, tuple | None]] = []
        self.id_gen = 0
        self.in_global = False
        self.callees: dict[int, set[int]] = {}
        self.loop_ok = {i for i, ins in enumerate(self.insns)
                        if ins.opcode == op.BPF_JMP | op.BPF_CALL and ins.src == 0
                        and ins.imm in _HELPER_CALLBACKS}
        #: may_goto instructions: like callback calls, a state there may be pruned against an
        #: ancestor still being explored (the kernel's loop handling for may_goto)
        self.may_gotos = {i for i, ins in enumerate(self.insns) if ins.opcode == op.MAY_GOTO}
        #: per may_goto: the open checkpoints still tried for pruning (newest last)
        self.may_goto_open: dict[int, list[Checkpoint]] = {}
        self.loop_ok |= self.may_gotos
        self._cur_trail: tuple | None = None
        self.visit_points = cfg.prune_points | self.loop_ok
        #: instructions some path reached (the rest is dead code, as the kernel sees it)
        self.seen = bytearray(len(self.insns))
        self._to_verify: list[int] = []
        self._helper_args = HELPER_ARGS
        #: conditional jumps some path found decided by scalar values; precision demand is
        #: recomputed when this grows.  A checkpoint is used for pruning only once every
        #: path below it is finished, so every jump its paths decided is in here by then.
        self.decided: set[int] = set()
        #: loads/stores some path made through a stack pointer other than r10 (the others never
        #: touch the stack, so their values do not make stack slots precise); same argument
        self.stack_access: set[int] = set()
        #: stack slots each helper call was seen to read (``structure.observed_stack_liveness``)
        self.helper_reads: dict[int, int] = {}
        #: helper calls -> stack slots (precision-demand bits) whose exact value they need
        self.precise_reads: dict[int, int] = {}
        self._helper_pc = -1
        self._slots_dirty = True
        #: observed stack liveness (``structure.observed_stack_liveness``), computed when first
        #: needed, and the instructions whose stack reads grew since
        self.stack_live: list[int] | None = None
        self._slots_new: set[int] = set()
        self._demand_dirty = False
        #: instructions added to ``decided``/``stack_access`` since ``demand`` was computed
        self._demand_new: set[int] = set()
        #: precision demand per instruction, computed when first needed (a program that never
        #: compares states never needs it), then kept up to date as the sets above grow
        self.demand: list[int] | None = None
        #: ``_live_masks`` of multi-frame states by (insn, call chain)
        self._mask_cache: dict[tuple, list[tuple[int, int, int]]] = {}
        self._verified: set[int] = set()

    # -- bookkeeping used by the other modules -------------------------------------
    def new_id(self) -> int:
        self.id_gen += 1
        return self.id_gen

    def note_stack(self, frame: S.Frame, depth: int) -> None:
        d = self.stats.stack_depth
        if depth > d.get(frame.subprog, 0):
            d[frame.subprog] = depth

    def enter_function(self, start: int) -> None:
        self.stats.stack_depth.setdefault(start, 0)

    def push(self, st: VerifierState, pc: int) -> None:
        if len(self.pending) > JMP_SEQ_LIMIT:
            raise Reject(f"The sequence of {len(self.pending)} jumps is too complex.",
                         "too many branches are waiting to be explored; simplify the control flow")
        if st.parent is not None:
            st.parent.branches += 1
        self.pending.append((st, pc, self._cur_trail))

    def check_global_call(self, st: VerifierState, pc: int, target: int) -> None:
        G.check_call(self, st, target)
        caller_sub = self.cfg.func_of(pc)
        self.callees.setdefault(caller_sub, set()).add(target)
        if target not in self._verified:
            self._verified.add(target)
            self._to_verify.append(target)

    # -- the walk --------------------------------------------------------------------
    def run(self) -> Failure | None:
        st = VerifierState([S.new_frame(0, -1, 0)])
        if self.test_mem_size is None:
            st.frames[-1].regs[1] = Reg(S.CTX, Scalar.const(0))
        else:  # a bpf_conformance-style run: r1 = packet-like memory, r2 = its length
            st.frames[-1].regs[1] = Reg(S.MEM, Scalar.const(0), size=self.test_mem_size)
            st.frames[-1].regs[2] = S.const_reg(self.test_mem_size)
        bad = C.abnormal_return_in_subprog(self.insns, self.cfg.func_of, bool(self.prog.func_info))
        if bad:
            return Failure(bad[0], bad[1], "build the object with BTF (clang -g) so subprograms carry func_info",
                           [], None, None)
        self.enter_function(0)
        fail = self._explore(st, 0)
        if fail:
            return fail
        while self._to_verify:
            start = self._to_verify.pop()
            self.in_global = True
            st = VerifierState([S.new_frame(0, -1, start)])
            G.entry_regs(self, st.cur, self.global_funcs[start])
            self.enter_function(start)
            self.explored.clear()
            self.open_sigs.clear()
            self.open_fps.clear()
            self.may_goto_open.clear()
            fail = self._explore(st, start)
            if fail:
                return fail
        return self._check_stack_depth()

    def _explore(self, st: VerifierState, pc: int) -> Failure | None:
        self.deadline = time.monotonic() + self.time_budget
        self.pending = [(st, pc, None)]
        while self.pending:
            st, pc, trail = self.pending.pop()
            self._cur_trail = trail
            try:
                self._walk(st, pc)
            except Reject as e:
                return Failure(e.msg, self._fail_pc, e.hint, e.extra, st, self._cur_trail)
        return None

    def _walk(self, st: VerifierState, pc: int) -> None:
        insns = self.insns
        prune = self.visit_points
        stats = self.stats
        level2 = self.log_level >= 2
        seen = self.seen
        # the path's last instructions, for error reports; kept local and published in
        # ``_cur_trail`` where it is read: by ``push`` (jumps and calls) and on a rejection
        trail = self._cur_trail
        try:
            while True:
                seen[pc] = 1
                processed = stats.processed = stats.processed + 1
                if processed > COMPLEXITY_LIMIT:
                    raise Reject(f"BPF program is too large. Processed {processed} insn",
                                 "the verifier explored 1,000,000 instructions without finishing; "
                                 "simplify loops or branches")
                if pc in prune and self._visit(st, pc):
                    self._path_done(st)
                    return
                if not processed & 0x3FFF and time.monotonic() > self.deadline:
                    raise Reject(f"verification exceeded the {self.time_budget:g} s time budget after "
                                 f"{stats.processed} insns", "the kernel would keep going up to 1,000,000 "
                                 "instructions; simplify loops or raise the budget")
                trail = (pc, trail)
                ins = insns[pc]
                if level2:
                    from ubpf_py.verifier.log import format_insn
                    self.trace.append(f"{pc}: {format_insn(ins, pc)} ; {describe_regs(st)}")
                code = ins.opcode
                cls = code & 0x07
                if code in _FAST_K64:
                    # r = constant OP immediate, 64-bit: the commonest loop step, done inline
                    regs = st.frames[-1].regs
                    d = regs[ins.dst]
                    if d.type == S.SCALAR and d.val.var.mask == 0 and ins.dst != 10:
                        a = d.val.var.value
                        b = ins.imm & 0xFFFFFFFFFFFFFFFF
                        o = code & 0xF0
                        r = (a + b) if o == op.BPF_ADD else (a - b) if o == op.BPF_SUB else \
                            (a & b) if o == op.BPF_AND else (a | b) if o == op.BPF_OR else (a ^ b)
                        regs[ins.dst] = Reg(S.SCALAR, Scalar.const(r))
                    else:
                        AR.check_alu(self, st, ins)
                    pc += 1
                elif cls in _ALU_CLASSES:
                    AR.check_alu(self, st, ins)
                    pc += 1
                elif cls == _LDX:
                    AR.read_reg(st, ins.src)
                    AR.check_dst(ins.dst)
                    sext = code & 0xE0 == op.BPF_MEMSX
                    size = _SIZE_BYTES[code & 0x18]
                    regs = st.frames[-1].regs
                    src = regs[ins.src]
                    if src.type == S.STACK and ins.src != 10:
                        self._stack_access(pc)
                    if src.type == S.MAP_PTR:
                        r = MF.check_read(self, src, ins.src, src.off + ins.off, size, False, sext, pc)
                    elif src.type in S.BTF_PTR_NON_NULL:
                        r = BP.check_access(self, src, ins.src, src.off + ins.off, size, False, sext, pc)
                    else:
                        r = M.check_access(self, st, ins.src, ins.off, size, False, sext=sext)
                    st.frames[-1].regs[ins.dst] = r
                    pc += 1
                elif cls in _JMP_CLASSES:
                    self._cur_trail = trail
                    o = code & 0xF0
                    self.jumps += 1   # the kernel's jmps_processed counts calls and exits too
                    if code == _JA64:
                        pc += ins.off + 1
                    elif o == _CALL:
                        pc = self._call(st, pc, ins)
                    elif o == _EXIT:
                        nxt = C.check_exit(self, st, pc)
                        if nxt is None:
                            self._path_done(st)
                            return
                        pc = nxt
                    elif o == _JA:
                        pc = jump_target(pc, ins)
                    elif code == _MAY_GOTO:
                        pc = self._may_goto(st, pc, ins)
                    else:
                        pc = self._cond(st, pc, ins)
                        if pc < 0:
                            self._path_done(st)
                            return
                elif cls == _STX:
                    self._no_map_ptr_write(st, ins, pc)
                    self._store(st, ins)
                    pc += 1
                elif cls == _ST:
                    self._no_map_ptr_write(st, ins, pc)
                    M.check_access(self, st, ins.dst, ins.off, _SIZE_BYTES[code & 0x18], True,
                                   value=S.const_reg(ins.imm))
                    pc += 1
                elif code == _LDDW:
                    self._lddw(st, pc, ins)
                    seen[pc + 1] = 1
                    pc += 2
                else:  # BPF_LD
                    raise Reject("BPF_LD_[ABS|IND] instructions not allowed for this program type")
        except Reject:
            self._fail_pc = pc   # the instruction being checked (set here, not per insn)
            self._cur_trail = trail
            raise

    # -- pruning -----------------------------------------------------------------------
    def _live_masks(self, st: VerifierState, pc: int) -> list[tuple[int, int, int]]:
        """Per frame: (live registers, precision demand, live stack slots).  The stacks of
        caller frames stay fully live: the callee may read them through pointers."""
        if self.demand is None:
            self._mask_cache.clear()
            self._demand_dirty = False
            self._demand_new = set()
            self.demand = precision_demand(self.insns, self.cfg, self._helper_args, self.decided,
                                           self.stack_access, self.precise_reads)
        elif self._demand_dirty:
            self._mask_cache.clear()
            self._demand_dirty = False
            self.demand = precision_demand(self.insns, self.cfg, self._helper_args, self.decided,
                                           self.stack_access, self.precise_reads, init=self.demand,
                                           dirty=self._demand_new)
            self._demand_new = set()
        if self._slots_dirty:
            self._mask_cache.clear()
            self._slots_dirty = False
            self.stack_live = observed_stack_liveness(self.insns, self.cfg, self.stack_access, self.helper_reads,
                                                      self.stack_live, self._slots_new)
            self._slots_new = set()
        live = self.cfg.live_in
        demand = self.demand
        frames = st.frames
        if len(frames) == 1:
            return [(live[pc], demand[pc], self.stack_live[pc])]
        # several frames: the same for every state at pc with the same call chain, until the
        # facts above grow (``_mask_cache`` is then emptied)
        key = (pc, *[(f.callsite, f.in_callback) for f in frames[1:]])
        out = self._mask_cache.get(key)
        if out is not None:
            return out
        out = self._mask_cache[key] = []
        n = len(live)
        for i in range(len(frames)):
            if i == len(frames) - 1:
                out.append((live[pc], demand[pc], self.stack_live[pc]))
                continue
            callee = frames[i + 1]
            if callee.in_callback:
                r = callee.callsite
                out.append((live[r], demand[r], STACK_ALL))
            elif callee.callsite + 1 < n:
                r = callee.callsite + 1
                out.append(((live[r] & ~0x3F) | 0x400, demand[r] & ~0x3F, STACK_ALL))
            else:
                out.append((0x400, 0, STACK_ALL))
        return out

    def _visit(self, st: VerifierState, pc: int) -> bool:
        """Prune point: stop if a finished state covers this one; detect loops; checkpoint."""
        lst = self.explored.get(pc)
        if not lst and not self.open_fps.get(pc) and pc not in self.loop_ok:
            # a third of the visits: nothing to compare with here, only the checkpoint spacing
            # below decides (no open checkpoint here, so the out-of-loop rule)
            insns, jumps = self._last_cp
            if self.jumps - jumps < 2 or self.stats.processed - insns < 8:
                return False
        loop_ok = pc in self.loop_ok
        masks = None
        candidates = lst or []
        if loop_ok:
            if pc in self.may_gotos:
                # the kernel: an ancestor at a different may_goto depth (an earlier iteration);
                # like the kernel, one that missed 64 times more than it hit is dropped
                keep = self.may_goto_open.setdefault(pc, [])
                keep[:] = [cp for cp in keep if cp.branches and cp.misses <= 64 * cp.hits + 64]
                depth = st.may_goto_depth
                opened = [cp for cp in keep if cp.state.may_goto_depth != depth]
            else:
                opened = self.open_sigs.get(pc, {}).values()
            candidates = [*candidates, *opened]
        for cp in candidates:
            if masks is None:
                masks = self._live_masks(st, pc)
            if S.subsumes(cp.state, st, masks):
                cp.hits += 1
                return True
            cp.misses += 1
        sigs = self.open_sigs.get(pc)
        fps = self.open_fps.get(pc)
        # an identical open state is possible only if the current frame's registers match one
        # (registers are immutable and cache their hash: equal states, equal fingerprints)
        fp = S.regs_fp(st.frames[-1].regs) if fps or loop_ok else 0
        maybe_loop = bool(fps) and fp in fps
        sig = S.Signature(st, fp) if maybe_loop or loop_ok else None
        if not loop_ok:
            cp = sigs.get(sig) if sig is not None and sigs else None
            if cp is not None and cp.branches > 0:
                raise Reject(f"infinite loop detected at insn {pc}",
                             "this loop comes back to the same state: it can never exit")
            # the kernel's checkpoint heuristic, inline (this runs at every prune point): a new
            # checkpoint needs 2 jumps and 8 insns since the last; inside a loop (a checkpoint at
            # this instruction is still open) 20 jumps or 100 insns, since successive iterations
            # differ and rarely help pruning
            # The spacing counts from the last checkpoint at one of the kernel's own prune
            # points: checkpoints at our extra points (fall-throughs of conditional jumps) never
            # keep one from where the kernel would have it, so pruning stays at least as strong
            insns, jumps = self._last_cp
            if sigs:
                if self.jumps - jumps < 20 and self.stats.processed - insns < 100:
                    return False
            elif self.jumps - jumps < 2 or self.stats.processed - insns < 8:
                return False
            if not fps:
                fp = S.regs_fp(st.frames[-1].regs)
        elif pc not in self.may_gotos and sigs:  # (may_goto widens its loop-body side only: _may_goto)
            ancestors = [cp for cp in sigs.values() if cp.branches and len(cp.state.frames) == len(st.frames)]
            if ancestors:
                sig.freeze()   # the checkpoint is filed under the state before widening
                S.widen(ancestors[-1].state, st)
        if sigs is None:
            sigs = self.open_sigs[pc] = {}
        # forget finished states that never help (the kernel's miss heuristic)
        if lst is not None and len(lst) > 8:
            lst[:] = [cp for cp in lst if cp.misses <= 3 * cp.hits + 3]
        if pc not in self.cfg.extra_points:
            self._last_cp = (self.stats.processed, self.jumps)
        cp = Checkpoint(st.copy(), pc, st.parent)
        if sig is None:
            sig = S.Signature(cp.state, fp)
        elif sig.full is None:
            sig.state = cp.state   # an equal copy that no path changes
        cp.sig = sig
        cp.fp = fp
        st.parent = cp
        if pc in self.may_gotos:
            self.may_goto_open.setdefault(pc, []).append(cp)
        sigs[sig] = cp
        fps = self.open_fps.setdefault(pc, {})
        fps[fp] = fps.get(fp, 0) + 1
        self.stats.states += 1
        return False

    def _path_done(self, st: VerifierState) -> None:
        """A path ended: checkpoints whose every path has ended become usable for pruning."""
        cp = st.parent
        while cp is not None:
            cp.branches -= 1
            if cp.branches > 0:
                break
            sigs = self.open_sigs.get(cp.insn)
            if sigs is not None and sigs.get(cp.sig) is cp:
                del sigs[cp.sig]
                fps = self.open_fps[cp.insn]
                if fps[cp.fp] <= 1:
                    del fps[cp.fp]
                else:
                    fps[cp.fp] -= 1
            lst = self.explored.setdefault(cp.insn, [])
            lst.append(cp)
            if len(lst) > self.stats.max_states_per_insn:
                self.stats.max_states_per_insn = len(lst)
            cp = cp.parent

    # -- instructions ------------------------------------------------------------------
    def _stack_access(self, pc: int) -> None:
        if pc not in self.stack_access:
            self.stack_access.add(pc)
            self._demand_new.add(pc)
            self._demand_dirty = True
            self._slots_dirty = True
            self._slots_new.add(pc)

    def note_precise_stack(self, st: VerifierState, frame: int, lo: int, hi: int) -> None:
        """The helper call being checked needs the exact value of stack bytes [lo, hi) of
        ``frame`` (a constant map key): they become precision demand at that call."""
        pc = self._helper_pc
        if pc < 0:
            return
        bits = (_slot_bits(lo, hi) << SLOT0) if frame == len(st.frames) - 1 else ALL_STACK_DEMAND
        old = self.precise_reads.get(pc, 0)
        if bits & ~old:
            self.precise_reads[pc] = old | bits
            self._demand_new.add(pc)
            self._demand_dirty = True

    def note_helper_stack_read(self, st: VerifierState, frame: int, lo: int, hi: int) -> None:
        """A helper call reads stack bytes [lo, hi) of ``frame`` (for stack-slot liveness)."""
        pc = self._helper_pc
        if pc < 0:
            return
        bits = STACK_ALL if frame != len(st.frames) - 1 else _slot_bits(lo, hi)
        old = self.helper_reads.get(pc, 0)
        if bits & ~old:
            self.helper_reads[pc] = old | bits
            self._slots_dirty = True
            self._slots_new.add(pc)

    def _no_map_ptr_write(self, st: VerifierState, ins: Instruction, pc: int) -> None:
        """A store through a map pointer: the kernel's message for its struct (always refused).
        (Also notes stores through stack pointers other than r10, for precision demand.)"""
        dst = st.frames[-1].regs[ins.dst]
        if dst.type == S.STACK and ins.dst != 10:
            self._stack_access(pc)
        if dst.type == S.MAP_PTR:
            if ins.opcode & 0x07 == op.BPF_STX:
                AR.read_reg(st, ins.src)
            MF.check_read(self, dst, ins.dst, dst.off + ins.off, op.SIZE_BYTES[ins.opcode & 0x18], True,
                          False, pc)
        elif dst.type in S.BTF_PTR_NON_NULL:
            if ins.opcode & 0x07 == op.BPF_STX:
                AR.read_reg(st, ins.src)
            BP.check_access(self, dst, ins.dst, dst.off + ins.off, op.SIZE_BYTES[ins.opcode & 0x18], True,
                            False, pc)

    def _store(self, st: VerifierState, ins: Instruction) -> None:
        code = ins.opcode
        size = op.SIZE_BYTES[code & 0x18]
        src = AR.read_reg(st, ins.src)
        if src.type == S.SCALAR and not src.id and not src.val.is_const() and code & 0xE0 == op.BPF_MEM \
                and st.frames[-1].regs[ins.dst].type == S.STACK and src.val.umax >> (size * 8) == 0:
            # a spill of a value that fits keeps it linked with the register (the kernel's
            # assign_scalar_id_before_mov), so a later fill and compare refines both
            src = Reg(S.SCALAR, src.val, id=self.new_id())
            st.frames[-1].regs[ins.src] = src
        if code & 0xE0 == op.BPF_ATOMIC:
            AR.read_reg(st, ins.dst)
            if ins.imm == op.BPF_CMPXCHG:
                AR.read_reg(st, 0)
            r = M.check_access(self, st, ins.dst, ins.off, size, True, atomic=True)
            if r is None:
                r = Reg(S.SCALAR, Scalar.unknown() if size == 8 else Scalar.urange(0, 0xFFFFFFFF))
            if ins.imm == op.BPF_CMPXCHG:
                st.frames[-1].regs[0] = r
            elif ins.imm & op.BPF_FETCH:
                AR.check_dst(ins.src)
                st.frames[-1].regs[ins.src] = r
            return
        M.check_access(self, st, ins.dst, ins.off, size, True, value=src)

    def _lddw(self, st: VerifierState, pc: int, ins: Instruction) -> None:
        AR.check_dst(ins.dst)
        regs = st.frames[-1].regs
        src = ins.src
        if src == 0:
            regs[ins.dst] = S.const_reg(ins.imm64)
        elif src in (op.BPF_PSEUDO_MAP_IDX, op.BPF_PSEUDO_MAP_IDX_VALUE):
            idx = ins.imm
            if not 0 <= idx < len(self.maps):
                raise Reject(f"map index {idx} is out of range: the object has {len(self.maps)} maps")
            if src == op.BPF_PSEUDO_MAP_IDX:
                regs[ins.dst] = Reg(S.MAP_PTR, Scalar.const(0), map=idx)
            else:
                m = self.maps[idx]
                off = ins.imm_hi & 0xFFFFFFFF
                if m.type not in M.MAP_TYPE_ARRAY_LIKE:
                    raise Reject(f"map '{m.name}' ({m.type_name}) does not support direct value access")
                if off >= m.value_size:
                    raise Reject(f"invalid access to map value pointer, value_size={m.value_size} off={off}")
                regs[ins.dst] = Reg(S.MAP_VALUE, Scalar.const(0), off=off, map=idx)
        elif src == op.BPF_PSEUDO_FUNC:
            t = pc + ins.imm + 1
            if t not in self.cfg.ends:
                raise Reject("call to invalid destination")
            self.callees.setdefault(self.cfg.func_of(pc), set()).add(t)
            regs[ins.dst] = Reg(S.FUNC, Scalar.const(0), subprog=t)
        elif src in (op.BPF_PSEUDO_MAP_FD, op.BPF_PSEUDO_MAP_VALUE):
            raise Reject(f"lddw src={src} refers to a map fd; spec-level programs use map indices (src=5/6)")
        else:
            raise Reject(f"unrecognized bpf_ld_imm64 insn src={src}",
                         "not supported: BTF ids / kernel symbols in lddw")

    def _call(self, st: VerifierState, pc: int, ins: Instruction) -> int:
        if ins.src == op.BPF_PSEUDO_CALL:
            target = pc + ins.imm + 1
            self.callees.setdefault(self.cfg.func_of(pc), set()).add(target)
            return C.check_pseudo_call(self, st, pc, target)
        if ins.src == op.BPF_PSEUDO_KFUNC_CALL:
            raise Reject("calling kernel functions is not supported", "not supported: kfunc calls")
        self._helper_pc = pc
        try:
            entered = C.check_helper(self, st, pc, ins.imm)
        finally:
            self._helper_pc = -1
        if entered:
            return st.frames[-1].subprog
        return pc + 1

    def _cond(self, st: VerifierState, pc: int, ins: Instruction) -> int:
        code = ins.opcode
        bits = 32 if code & 0x07 == op.BPF_JMP32 else 64
        o = code & 0xF0
        dst = AR.read_reg(st, ins.dst)
        if code & op.BPF_X:
            src = AR.read_reg(st, ins.src)
            src_no = ins.src
        else:
            src = S.const_reg(ins.imm if bits == 64 else ins.imm & 0xFFFFFFFF)
            src_no = -1
        target = jump_target(pc, ins)
        if dst.type == S.SCALAR and src.type == S.SCALAR:
            taken = A.branch_taken(o, dst.val, src.val, bits)
            if taken >= 0:
                self._decided(pc)
                return target if taken == 1 else pc + 1
            yes = A.refine(o, dst.val, src.val, bits)
            no = A.refine(A.negate(o), dst.val, src.val, bits)
            if yes is None or no is None:
                self._decided(pc)
            if yes is None and no is None:
                return -1
            if yes is None:
                self._apply_refine(st, ins.dst, src_no, no)
                return pc + 1
            if no is None:
                self._apply_refine(st, ins.dst, src_no, yes)
                return target
            other = st.copy()
            self._apply_refine(other, ins.dst, src_no, yes)
            self.push(other, target)
            self._apply_refine(st, ins.dst, src_no, no)
            return pc + 1
        # pointer comparisons
        ptr, other_reg, ptr_no = (dst, src, ins.dst) if dst.is_ptr else (src, dst, src_no)
        is_null_cmp = other_reg.type == S.SCALAR and other_reg.val.is_const() and \
            other_reg.val.value == 0 and o in (op.BPF_JEQ, op.BPF_JNE) and not (dst.is_ptr and src.is_ptr)
        if is_null_cmp:
            if ptr.type in S.OR_NULL and bits == 64:
                null_st = st.copy()
                _mark_null(null_st, ptr, True)
                _mark_null(st, ptr, False)
                if o == op.BPF_JEQ:
                    self.push(null_st, target)
                    return pc + 1
                self.push(st.copy(), target)
                self._replace(st, null_st)
                return pc + 1
            if ptr.type in _NOT_NULL:
                return (target if o == op.BPF_JNE else pc + 1)
            # ctx, stack, map and function pointers: the kernel's reg_not_null() does not vouch
            # for them, so both sides are walked with the pointer unchanged (an access through
            # the "null" ctx on the impossible side is still checked)
        del ptr_no
        self.push(st.copy(), target)
        return pc + 1

    def _may_goto(self, st: VerifierState, pc: int, ins: Instruction) -> int:
        """Both sides are possible: the loop body (fall-through) is pushed one may_goto level
        deeper, with the scalars that changed since the previous iteration and are not
        precise widened; the walk goes on at the target (the exit side), as the kernel does."""
        body = st.copy()
        body.may_goto_depth += 1
        prev = None
        for cp in reversed(self.may_goto_open.get(pc, ())):
            if cp is not st.parent and cp.branches and len(cp.state.frames) == len(st.frames) and \
                    all(a.callsite == b.callsite for a, b in zip(cp.state.frames, st.frames, strict=True)):
                prev = cp
                break
        if prev is not None:
            S.widen_imprecise(prev.state, body, self._live_masks(st, pc))
        self.push(body, pc + 1)
        return jump_target(pc, ins)

    def _decided(self, pc: int) -> None:
        if pc not in self.decided:
            self.decided.add(pc)
            self._demand_new.add(pc)
            self._demand_dirty = True

    @staticmethod
    def _replace(st: VerifierState, other: VerifierState) -> None:
        st.frames = other.frames
        st.refs = other.refs

    def _apply_refine(self, st: VerifierState, dst_no: int, src_no: int, vals: tuple) -> None:
        a, b = vals
        _set_scalar(st, dst_no, a)
        if src_no >= 0:
            _set_scalar(st, src_no, b)

    # -- stack depth -------------------------------------------------------------------------
    def _check_stack_depth(self) -> Failure | None:
        bad = check_stack_depth(self.insns, self.cfg.func_of, self.stats.stack_depth)
        return None if bad is None else Failure(bad.message, bad.pc, bad.hint, [], None, None)


def _slot_bits(lo: int, hi: int) -> int:
    """Bits of the 8-byte stack slots bytes [lo, hi) (offsets from the frame top) touch."""
    if hi <= lo:
        return 0
    first = (S.STACK_SIZE + lo) // 8
    last = (S.STACK_SIZE + hi - 1) // 8
    return ((1 << (last + 1)) - 1) & ~((1 << first) - 1)


def _set_scalar(st: VerifierState, regno: int, val: Scalar) -> None:
    regs = st.frames[-1].regs
    r = regs[regno]
    if r.type != S.SCALAR:
        return
    rid = r.id
    if not rid:
        regs[regno] = S.scalar_reg(val)
        return
    # every copy linked by the id gets the same (immutable, shared) register
    new = regs[regno] = Reg(S.SCALAR, val, id=rid)
    scalar = S.SCALAR
    for f in st.frames:
        fregs = f.regs
        for i in range(11):
            x = fregs[i]
            if x.id == rid and x.type == scalar:
                fregs[i] = new
        spills = f.spills
        for k, x in spills.items():
            if x.id == rid and x.type == scalar:
                spills[k] = new


def _mark_null(st: VerifierState, ptr: Reg, is_null: bool) -> None:
    pid = ptr.id
    for f in st.frames:
        for i, x in enumerate(f.regs):
            if x.id == pid and x.type in S.OR_NULL:
                f.regs[i] = S.const_reg(0) if is_null else Reg(S.OR_NULL[x.type], x.val, x.off, x.map,
                                                                  x.size, 0, x.ref, x.frame, x.subprog)
        for k, x in list(f.spills.items()):
            if x.id == pid and x.type in S.OR_NULL:
                f.spills[k] = S.const_reg(0) if is_null else Reg(S.OR_NULL[x.type], x.val, x.off, x.map,
                                                                   x.size, 0, x.ref, x.frame, x.subprog)
    if is_null and ptr.ref:
        st.refs.pop(ptr.ref, None)


def describe_regs(st: VerifierState) -> str:
    parts = []
    for f in st.frames:
        pre = f"frame{f.frameno}: " if len(st.frames) > 1 else ""
        regs = [f"R{i}={r.describe()}" for i, r in enumerate(f.regs) if r.type != S.NOT_INIT]
        stack = []
        for slot in sorted(f.spills):
            stack.append(f"fp{slot * 8 - S.STACK_SIZE}={f.spills[slot].describe()}")
        parts.append(pre + " ".join(regs + stack))
    return " | ".join(parts)


__all__ = ["Checker", "Failure", "describe_regs", "is_cond_jump"]
