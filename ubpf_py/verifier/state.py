"""Abstract machine state: registers, stack frames, references, and pruning.

A ``VerifierState`` is what the verifier knows at one instruction on one path:
a stack of call frames (registers + byte-granular stack), the references the
path holds (ringbuf records not yet submitted), and a link to the checkpoint it
descends from.  ``subsumes`` is the kernel's ``states_equal``: an explored,
finished state whose every value range contains the current one proves the
current path safe, so it can stop (state pruning).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from operator import attrgetter

from ubpf_py.verifier.scalar import UNKNOWN, Scalar

STACK_SIZE = 512

# register types, spelled like the kernel's reg_type_str() so logs match
NOT_INIT = "?"
SCALAR = "scalar"
CTX = "ctx"
STACK = "fp"
MAP_PTR = "map_ptr"
MAP_VALUE = "map_value"
MAP_VALUE_OR_NULL = "map_value_or_null"
RINGBUF_MEM = "ringbuf_mem"
RINGBUF_MEM_OR_NULL = "ringbuf_mem_or_null"
MEM = "mem"
MEM_OR_NULL = "mem_or_null"
FUNC = "func"
MAP_KEY = "map_key"
#: a lookup in a map-in-map: the inner map, or NULL
MAP_PTR_OR_NULL = "map_ptr_or_null"

#: PTR_TO_BTF_ID (``btfptr``): "[user_][percpu_][rcu_][untrusted_][trusted_]ptr_[or_null_]" like
#: reg_type_str(); ``map`` holds the kernel BTF type id, ``size`` the object kind it points to
_BTF_ID_PTRS = frozenset(
    "".join(p for bit, p in enumerate(("user_", "percpu_", "rcu_", "untrusted_", "trusted_")) if k >> bit & 1)
    + "ptr_" for k in range(32))
TRUSTED_BTF_PTR = "trusted_ptr_"
#: PTR_TO_MEM | MEM_RDONLY | PTR_UNTRUSTED (``btfptr``, Linux 6.17+): a pointer loaded from a kernel
#: struct member that points to no struct (``int *``, ``void *``); ``map`` holds the pointee's BTF id
RDONLY_UNTRUSTED_MEM = "rdonly_untrusted_mem"
#: pointers into kernel objects, never NULL-checked first: loads and stores through them are btfptr's
BTF_PTR_NON_NULL = _BTF_ID_PTRS | {RDONLY_UNTRUSTED_MEM}

OR_NULL = {MAP_VALUE_OR_NULL: MAP_VALUE, RINGBUF_MEM_OR_NULL: RINGBUF_MEM, MEM_OR_NULL: MEM,
           MAP_PTR_OR_NULL: MAP_PTR, **{t + "or_null_": t for t in _BTF_ID_PTRS}}
BTF_PTRS = BTF_PTR_NON_NULL | {t + "or_null_" for t in _BTF_ID_PTRS}
POINTERS = {CTX, STACK, MAP_PTR, MAP_VALUE, MAP_VALUE_OR_NULL, RINGBUF_MEM, RINGBUF_MEM_OR_NULL,
            MEM, MEM_OR_NULL, FUNC, MAP_KEY, MAP_PTR_OR_NULL, *BTF_PTRS}

# stack byte kinds (0: never written, the kind every byte starts with)
S_MISC = 1      # written with something that is not a tracked register
S_ZERO = 2      # known zero
S_SPILL = 3     # part of a spilled register


@dataclass(slots=True, eq=True)
class Reg:
    """One register's abstract value.  Pointers use ``off`` (fixed part) and
    ``val`` (variable part, a Scalar); scalars use ``val`` only.

    Immutable by convention (never assign a field; build a new Reg): registers are
    shared between states.  Not a frozen dataclass because frozen construction is
    several times slower and the walk builds one per instruction."""

    type: str = NOT_INIT
    val: Scalar = UNKNOWN
    off: int = 0
    #: map index (map_ptr, map_value*, map_key)
    map: int = -1
    #: accessible size for mem / ringbuf_mem
    size: int = 0
    #: id shared by copies: null checks on one refine all; equal scalars share bounds
    id: int = 0
    #: reference (acquired object) this pointer belongs to
    ref: int = 0
    #: frame number a stack pointer points into
    frame: int = 0
    #: first instruction of the function a func pointer names
    subprog: int = -1
    #: for a scalar that used to be a pointer to a released object: the release insn + 1
    released_at: int = 0
    #: cached hash (registers are immutable and shared between states; state signatures
    #: hash every register at every prune point)
    _h: int = field(default=0, compare=False, repr=False)

    def __hash__(self) -> int:
        h = self._h
        if not h:
            # the fields that tell registers apart in practice (equal registers agree on all of
            # them, so this is a valid hash); cheaper than hashing a tuple of every field
            h = (hash(self.val) ^ hash(self.type) ^ (self.off << 4) ^ (self.id << 24) ^ (self.map << 40)) or 1
            self._h = h
        return h

    @property
    def is_ptr(self) -> bool:
        return self.type in POINTERS

    def describe(self) -> str:
        if self.type == NOT_INIT:
            return "?"
        if self.type == SCALAR:
            if self.released_at:
                return f"scalar(released pointer, insn {self.released_at - 1})"
            return f"scalar({self.val})" if not self.val.is_const() else str(self.val)
        parts = []
        if self.type == STACK:
            parts.append(f"frame{self.frame}" if self.frame else "")
        if self.id:
            parts.append(f"id={self.id}")
        if self.ref:
            parts.append(f"ref_obj_id={self.ref}")
        if self.off:
            parts.append(f"off={self.off}")
        if not (self.val.is_const() and self.val.value == 0):
            parts.append(f"var_off={self.val}")
        if self.map >= 0:
            parts.append(f"map#{self.map}")
        if self.size:
            parts.append(f"size={self.size}")
        if self.type == FUNC:
            parts.append(f"insn={self.subprog}")
        inner = ",".join(p for p in parts if p)
        return f"{self.type}({inner})" if inner else self.type


_GET_H = attrgetter("_h")
_new = object.__new__


def regs_fp(regs: list[Reg]) -> int:
    """A hash of a register file, equal for equal registers: built from each register's cached
    hash with C-level calls only (it runs at every prune point with open checkpoints)."""
    hs = tuple(map(_GET_H, regs))
    if 0 in hs:   # a register never hashed yet: the same tuple, computing what is missing
        hs = tuple([r._h or hash(r) for r in regs])
    return hash(hs)


UNINIT = Reg()
UNKNOWN_SCALAR = Reg(SCALAR, UNKNOWN)


#: id-less scalar registers by value, shared: registers are immutable, and a shared object
#: is cheap to compare (the identity test of ``subsumes``) and hashes once.  Emptied per
#: program (``reset_memo``) like the ALU memo tables.
_SCALAR_REGS: dict[Scalar, Reg] = {}


def scalar_reg(val: Scalar) -> Reg:
    """``Reg(SCALAR, val)``, the same object for equal values."""
    r = _SCALAR_REGS.get(val)
    if r is None:
        if len(_SCALAR_REGS) >= 65536:
            _SCALAR_REGS.clear()
        r = _SCALAR_REGS[val] = Reg(SCALAR, val)
    return r


def reset_memo() -> None:
    _SCALAR_REGS.clear()


def const_reg(v: int) -> Reg:
    return scalar_reg(Scalar.const(v))


@dataclass(slots=True)
class Frame:
    regs: list[Reg]
    #: per-byte kind for offsets -512..-1 (index = 512 + off)
    stack: bytearray
    #: spilled registers by 8-byte slot index (offset = slot*8 - 512)
    spills: dict[int, Reg]
    #: call instruction that created this frame (-1 for the entry frame)
    callsite: int
    #: first instruction of the function this frame runs
    subprog: int
    frameno: int
    #: set for bpf_loop-style callbacks: the helper call to return to
    in_callback: bool = False
    #: for frames saved in checkpoints (never changed again): the stack slots that hold
    #: known-zero or spilled bytes, as (slot bit set, ((slot, byte kinds), ...)); computed on the
    #: first comparison
    known: tuple | None = None
    #: for checkpoint frames: 1 if no spilled register has an id or a reference (then equal
    #: stacks are covered without comparing slot by slot), -1 until computed
    plain: int = -1

    def copy(self) -> Frame:
        # filled slot by slot (no dataclass __init__ call): the walk copies every frame of the
        # state at each branch and each checkpoint
        f = _new(Frame)
        f.regs = self.regs[:]
        f.stack = self.stack[:]
        f.spills = self.spills.copy()
        f.callsite = self.callsite
        f.subprog = self.subprog
        f.frameno = self.frameno
        f.in_callback = self.in_callback
        f.known = None
        f.plain = -1
        return f


def new_frame(frameno: int, callsite: int, subprog: int) -> Frame:
    regs = [UNINIT] * 11
    regs[10] = Reg(STACK, Scalar.const(0), frame=frameno)
    return Frame(regs, bytearray(STACK_SIZE), {}, callsite, subprog, frameno)


@dataclass(slots=True)
class Checkpoint:
    """A state saved at a prune point, with how many paths below it are still open."""

    state: VerifierState
    insn: int
    parent: Checkpoint | None
    branches: int = 1
    #: whether this checkpoint may be used for pruning while still open (callback calls)
    loop_ok: bool = False
    hits: int = 0
    misses: int = 0
    sig: Signature | None = None
    fp: int = 0


@dataclass(slots=True)
class VerifierState:
    frames: list[Frame]
    #: acquired references: id -> instruction that acquired it
    refs: dict[int, int] = field(default_factory=dict)
    parent: Checkpoint | None = None
    #: history of (insn, description) for the error log of this path
    last_jumps: tuple[tuple[int, int], ...] = ()
    #: how many may_goto fall-throughs this path took (the kernel's may_goto_depth)
    may_goto_depth: int = 0
    #: for checkpoint states: the register of the innermost frame whose range last failed
    #: to cover a compared state (``subsumes`` tries it first: most misses repeat), or -1
    miss: int = field(default=-1, compare=False, repr=False)

    @property
    def cur(self) -> Frame:
        return self.frames[-1]

    def signature(self) -> tuple:
        """Hashable exact description (for the infinite-loop check)."""
        return (tuple((f.callsite, f.in_callback, tuple(f.regs), bytes(f.stack),
                       tuple(sorted(f.spills.items()))) for f in self.frames),
                tuple(sorted(self.refs.items())), self.may_goto_depth)

    def copy(self) -> VerifierState:
        s = _new(VerifierState)
        s.frames = [f.copy() for f in self.frames]
        s.refs = self.refs.copy()
        s.parent = self.parent
        s.last_jumps = self.last_jumps
        s.may_goto_depth = self.may_goto_depth
        s.miss = -1
        return s


class Signature:
    """A dict key equal for states with equal ``signature()``s, cheap to build and hash.

    Every checkpoint is filed under its signature (the infinite-loop check looks an
    identical open state up), but states are rarely identical: the hash uses only the
    top frame's register hash ``fp`` and stack bytes, and the full signature is built
    only when two keys' hashes meet.  ``state`` must not change while the key is in
    use, unless ``freeze`` took the full signature first."""

    __slots__ = ("full", "h", "state")

    def __init__(self, state: VerifierState, fp: int) -> None:
        self.state = state
        self.full: tuple | None = None
        self.h = hash((fp, bytes(state.frames[-1].stack), len(state.frames), state.may_goto_depth))

    def freeze(self) -> None:
        if self.full is None:
            self.full = self.state.signature()

    def __hash__(self) -> int:
        return self.h

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if not isinstance(other, Signature) or self.h != other.h:
            return False
        self.freeze()
        other.freeze()
        return self.full == other.full


# -- pruning ------------------------------------------------------------------------

class _IdMap:
    """Old-id -> current-id correspondence; ids must map one to one."""

    __slots__ = ("fwd", "rev")

    def __init__(self) -> None:
        self.fwd: dict[int, int] = {}
        self.rev: dict[int, int] = {}

    def check(self, old: int, cur: int) -> bool:
        if old == 0 or cur == 0:
            return old == cur
        a = self.fwd.get(old)
        b = self.rev.get(cur)
        if a is None and b is None:
            self.fwd[old] = cur
            self.rev[cur] = old
            return True
        return a == cur and b == old


def reg_safe(old: Reg, cur: Reg, ids: _IdMap, exact: bool) -> bool:
    """May ``cur`` stand where ``old`` was proven safe?"""
    if exact:
        return old == cur or (old.type == cur.type == SCALAR and old.val == cur.val)
    if old.type == NOT_INIT:
        return True
    if old.type != cur.type:
        return False
    if old.type == SCALAR:
        if not old.val.within(cur.val):
            return False
        if old.id and not old.val.is_const():
            return ids.check(old.id, cur.id) if cur.id else True
        return True
    if old.type in (STACK,):
        return old.off == cur.off and old.frame == cur.frame and old.val.within(cur.val)
    if old.type in (CTX, MAP_PTR, FUNC):
        return old.off == cur.off and old.map == cur.map and old.subprog == cur.subprog \
            and old.val.within(cur.val)
    # map values, memory, nullable pointers
    if old.off != cur.off or old.map != cur.map or old.size != cur.size:
        return False
    if not old.val.within(cur.val):
        return False
    if old.type in OR_NULL and not ids.check(old.id, cur.id):
        return False
    return ids.check(old.ref, cur.ref)


def stack_safe(old: Frame, cur: Frame, ids: _IdMap, exact: bool, demand: int = -1, slots: int = -1) -> bool:
    """Is ``cur``'s stack covered by ``old``'s?  Only slots in ``slots`` (bit k = slot k,
    the slots a later instruction may read) matter, like the kernel's REG_LIVE_READ."""
    if exact:
        return old.stack == cur.stack and all(
            reg_safe(o, cur.spills.get(k, UNINIT), ids, True) for k, o in old.spills.items()) \
            and len(old.spills) == len(cur.spills)
    os_, cs = old.stack, cur.stack
    if os_ == cs:
        ospills = old.spills
        if not ospills and not cur.spills:
            return True
        # the same bytes and equal spilled registers (a C-level dict compare: registers are
        # shared) cover each other when no id or reference needs matching: the common case of
        # a caller's frame, unchanged while the callee runs, whose whole stack is live
        plain = old.plain
        if plain < 0:
            plain = old.plain = int(not any(r.id or r.ref for r in ospills.values()))
        if plain and ospills == cur.spills:
            return True
        entries = ()   # equal bytes: every known byte matches
    else:
        known = old.known
        if known is None:
            known = old.known = _known_slots(os_)
        mask, entries = known
        if not mask & slots:
            entries = ()
    for slot, pat in entries:
        if not (slots >> slot) & 1:
            continue
        base = slot * 8
        if cs[base:base + 8] == pat:   # the same byte kinds: every known byte matches
            continue
        for j in range(8):
            k = pat[j]
            if k <= S_MISC:
                continue
            c = cs[base + j]
            if k == S_ZERO:
                if c == S_ZERO:
                    continue
                if c == S_SPILL:
                    sp = cur.spills.get(slot)
                    if sp is not None and sp.type == SCALAR and sp.val.is_const() and sp.val.value == 0:
                        continue
                return False
            if c != S_SPILL and not _imprecise_spill_vs_misc(old, cur, slot, demand):
                return False
    cspills = cur.spills
    for slot, o in old.spills.items():
        c = cspills.get(slot)
        if c is o and not o.id and not o.ref:
            continue
        if not (slots >> slot) & 1:
            continue
        if c is None:
            if _imprecise_spill_vs_misc(old, cur, slot, demand):
                continue
            # old spill bytes were all overwritten as misc in the old state's view? no: must match
            if any(os_[slot * 8 + j] == S_SPILL for j in range(8)):
                return False
            continue
        if o.type == SCALAR and c.type == SCALAR and (
                o.val.within(c.val) or not demand & ((1 << 11) | (1 << (16 + slot)))):
            continue
        if not reg_safe(o, c, ids, False):
            return False
    return True


#: stack byte kind -> 1 if it is known (zero or spilled), for bytes.translate
_KNOWN_KIND = bytes(1 if k > S_MISC else 0 for k in range(256))


def _known_slots(stack: bytearray) -> tuple[int, tuple[tuple[int, bytes], ...]]:
    """(bit set of the slots holding a known-zero or spilled byte, (slot, its 8 byte kinds) of
    each of them).  Computed once per checkpoint frame; most slots are not known."""
    flags = bytes(stack).translate(_KNOWN_KIND)
    out = []
    mask = 0
    i = flags.find(1)
    while i >= 0:
        slot = i >> 3
        base = slot << 3
        out.append((slot, bytes(stack[base:base + 8])))
        mask |= 1 << slot
        i = flags.find(1, base + 8)
    return mask, tuple(out)


def _imprecise_spill_vs_misc(old: Frame, cur: Frame, slot: int, demand: int) -> bool:
    """The kernel's stacksafe for privileged programs: an 8-byte spilled scalar whose value no
    later instruction needs exactly covers a slot of unknown bytes (misc, or never written: a
    privileged program may read those as an unknown scalar)."""
    o = old.spills.get(slot)
    if o is None or o.type != SCALAR or demand & ((1 << 11) | (1 << (16 + slot))):
        return False
    base = slot * 8
    if any(old.stack[base + j] != S_SPILL for j in range(8)) or slot in cur.spills:
        return False
    return all(cur.stack[base + j] <= S_MISC for j in range(8))


#: bit set -> the register numbers in it, ascending (pruning visits only live registers)
_BIT_INDEXES = tuple(tuple(r for r in range(11) if (m >> r) & 1) for m in range(1 << 11))


def subsumes(old: VerifierState, cur: VerifierState, masks: list[tuple[int, int, int]] | None,
             exact: bool = False) -> bool:
    """The kernel's states_equal: is ``cur`` covered by the explored ``old``?

    ``masks`` gives, per frame (innermost last), ``(live, demand)``: the bit set
    of registers read later in that frame, and the precision-demand fact
    (``structure.precision_demand``).  Dead registers are ignored, and scalars
    whose exact value is never needed again match any scalar, like the
    kernel's liveness and precision marks.

    This runs at every prune point against every explored state there, so it is
    written for speed: only live registers are visited, and the commonest cases
    (the same shared register object, a scalar that is not precise, a precise
    scalar inside the old range) are decided inline before ``reg_safe``.
    """
    ofrs, cfrs = old.frames, cur.frames
    if len(ofrs) != len(cfrs):
        return False
    last = len(ofrs) - 1
    h = old.miss
    if h >= 0 and not exact and masks is not None:
        # the register that failed last time, first: a live register that is not covered is a
        # miss whatever else matches (the full test below would find it too; a fresh id map
        # accepts every id pair the full one does)
        o, c = ofrs[last].regs[h], cfrs[last].regs[h]
        live, demand, _ = masks[last]
        if o is not c and live >> h & 1:
            if o.type == SCALAR:
                if c.type != SCALAR or (demand >> h & 1 and not o.val.within(c.val)):
                    return False
            elif not reg_safe(o, c, _IdMap(), False):
                return False
    ids = _IdMap()
    # innermost frame first: a callee's state differs far more often than its callers', whose
    # whole stacks are compared (the answer does not depend on the order: every id pair met
    # must fit one bijection, whichever comes first)
    for fi in range(len(ofrs) - 1, -1, -1):
        of, cf = ofrs[fi], cfrs[fi]
        if of.callsite != cf.callsite or of.in_callback != cf.in_callback:
            return False
        oregs, cregs = of.regs, cf.regs
        if exact:
            for r in range(11):
                o, c = oregs[r], cregs[r]
                if o is c and not o.id and not o.ref:
                    continue
                if not reg_safe(o, c, ids, True):
                    return False
            if not stack_safe(of, cf, ids, True):
                return False
            continue
        live, demand, slots = masks[fi] if masks is not None else (0x7FF, -1, -1)
        for r in _BIT_INDEXES[live & 0x7FF]:
            o, c = oregs[r], cregs[r]
            if o is c and not o.id and not o.ref:
                continue   # registers are shared between states: the same object is covered
            ot = o.type
            if ot == SCALAR:
                if c.type != SCALAR:
                    if fi == last:
                        old.miss = r
                    return False
                if not (demand >> r) & 1:
                    continue
                ov = o.val
                if not ov.within(c.val):
                    if fi == last:
                        old.miss = r
                    return False
                if o.id and ov.var.mask and c.id and not ids.check(o.id, c.id):
                    return False
                continue
            if not reg_safe(o, c, ids, False):
                if fi == last:
                    old.miss = r
                return False
        if not stack_safe(of, cf, ids, False, demand, slots):
            return False
    if len(old.refs) != len(cur.refs):
        return False
    if not old.refs:
        return True
    return all(ids.check(o, c) for o, c in zip(sorted(old.refs), sorted(cur.refs), strict=True))


def widen(old: VerifierState, cur: VerifierState) -> None:
    """Forget scalar facts in ``cur`` that changed since ``old`` (a callback iteration).

    Used only at helper calls that take callbacks (bpf_loop, for_each_map_elem):
    every scalar whose range is not inside the previous iteration's becomes
    unknown, so the next iteration is covered and the exploration stops.
    Over-approximating is always sound; see the module docs of ``checker``.
    """
    if len(old.frames) != len(cur.frames):
        return
    for of, cf in zip(old.frames, cur.frames, strict=True):
        for i in range(11):
            o, c = of.regs[i], cf.regs[i]
            if o.type == SCALAR and c.type == SCALAR and not o.val.within(c.val):
                cf.regs[i] = UNKNOWN_SCALAR
        for slot, c in list(cf.spills.items()):
            o = of.spills.get(slot)
            if c.type == SCALAR and (o is None or (o.type == SCALAR and not o.val.within(c.val))):
                cf.spills[slot] = UNKNOWN_SCALAR


def widen_imprecise(old: VerifierState, cur: VerifierState, masks: list[tuple[int, int, int]]) -> None:
    """The kernel's widen_imprecise_scalars at may_goto: scalars of ``cur`` whose exact value
    is never needed again (``masks``: per frame (live, precision demand, live slots)) and that
    differ from the previous iteration's ``old`` become unknown, so loop iterations converge.
    Precise scalars keep their values; widening is an over-approximation, hence sound."""
    if len(old.frames) != len(cur.frames):
        return
    for fi, (of, cf) in enumerate(zip(old.frames, cur.frames, strict=True)):
        if of.callsite != cf.callsite:
            return
        demand = masks[fi][1]
        for i in range(10):
            o, c = of.regs[i], cf.regs[i]
            if o.type == SCALAR and c.type == SCALAR and not (demand >> i) & 1 and o.val != c.val:
                cf.regs[i] = UNKNOWN_SCALAR
        if demand & (1 << 11):
            continue
        for slot, c in list(cf.spills.items()):
            o = of.spills.get(slot)
            if c.type == SCALAR and o is not None and o.type == SCALAR and o.val != c.val \
                    and not (demand >> (16 + slot)) & 1:
                cf.spills[slot] = UNKNOWN_SCALAR
