"""Memory access checks: context, stack, map values, ringbuf records, helper buffers.

Each access is checked against what the pointer's type says may be touched:
pt_regs is 168 read-only bytes, the stack is 512 bytes per frame below r10
(byte-granular initialisation, spilled registers kept precise), map values are
``value_size`` bytes (read-only for .rodata), ringbuf records are the reserved
size.  Messages are the kernel's (check_mem_access and friends).
"""

from __future__ import annotations

from ubpf_py.abi.kernel import PT_REGS_SIZE
from ubpf_py.obj.mapdefs import BPF_F_RDONLY_PROG, BPF_F_WRONLY_PROG
from ubpf_py.obj.spec import MapSpec
from ubpf_py.verifier import state as S
from ubpf_py.verifier import tnum as tn
from ubpf_py.verifier.context import CheckContext
from ubpf_py.verifier.scalar import Scalar, s64, unknown_bits
from ubpf_py.verifier.state import Reg

MAX_VAR_OFF = 1 << 29
MAP_TYPE_ARRAY_LIKE = {2, 6}  # array, percpu_array: direct value access allowed
MAP_IN_MAP = {12, 13}  # array_of_maps, hash_of_maps


class Reject(Exception):
    """The program is unsafe at the current instruction."""

    def __init__(self, msg: str, hint: str = "", extra: list[str] | None = None) -> None:
        super().__init__(msg)
        self.msg = msg
        self.hint = hint
        self.extra = extra or []


def map_access_type(m: MapSpec, off: int, size: int, write: bool) -> None:
    """check_map_access_type: BPF_F_RDONLY_PROG maps (and .rodata/.kconfig) refuse program
    writes, BPF_F_WRONLY_PROG maps refuse program reads."""
    if write and (m.readonly or m.flags & BPF_F_RDONLY_PROG):
        raise Reject(f"write into map forbidden, value_size={m.value_size} off={off} size={size}",
                     f"map '{m.name}' is read-only for programs (BPF_F_RDONLY_PROG, .rodata, .kconfig)")
    if not write and m.flags & BPF_F_WRONLY_PROG:
        raise Reject(f"read from map forbidden, value_size={m.value_size} off={off} size={size}",
                     f"map '{m.name}' is write-only for programs (BPF_F_WRONLY_PROG)")


def check_aligned(reg: Reg, insn_off: int, size: int) -> None:
    """Stack accesses are always strictly aligned (check_ptr_alignment), variable part included."""
    v = reg.val
    a = tn.add(v.var, tn.const(reg.off + insn_off))
    if (a.value | a.mask) & (size - 1):
        var = str(s64(v.value)) if v.is_const() else str(v.var)
        raise Reject(f"misaligned stack access off {var}+{reg.off}+{insn_off} size {size}",
                     "stack accesses must be aligned to their size whatever the offset")


def _loaded(size: int, sext: bool) -> Reg:
    """The register a load of ``size`` unknown bytes gives: one shared object per kind
    (registers are immutable; loads are among the commonest instructions)."""
    r = _LOADED.get((size, sext))
    if r is None:
        r = _LOADED[size, sext] = Reg(S.SCALAR, Scalar.unknown().sext(size) if sext else unknown_bits(size))
    return r


_LOADED: dict[tuple[int, bool], Reg] = {}


def region_check(ck: CheckContext, regno: int, reg: Reg, off: int, size: int, limit: int,
                 what: str, zero_ok: bool = False) -> None:
    """check_mem_region_access: [off + var, off + var + size) must lie in [0, limit)."""
    v = reg.val
    lo = off + v.smin
    hi = off + v.umax
    if v.smin < 0 or lo < 0 or lo + size > limit or (size == 0 and not zero_ok) or v.umax >= MAX_VAR_OFF \
            or hi + size > limit:
        _region_reject(regno, v, off, size, limit, what, zero_ok)


def _region_reject(regno: int, v: Scalar, off: int, size: int, limit: int, what: str, zero_ok: bool) -> None:
    """``region_check``'s rejections, worded (kept out of the accepting path, which runs at
    every map value and memory access)."""

    def bad(o: int) -> str:
        if what == "map value":
            return f"invalid access to map value, value_size={limit} off={o} size={size}"
        if what == "map key":
            return f"invalid access to map key, key_size={limit} off={o} size={size}"
        return f"invalid access to memory, mem_size={limit} off={o} size={size}"

    hint = f"the {what} is {limit} bytes; bound the offset before the access"
    if v.smin < 0 and (v.smin == -(1 << 63) or off + v.smin < 0):
        raise Reject(f"R{regno} min value is negative, either use unsigned index or do a if (index >=0) check.",
                     hint)
    lo = off + v.smin
    if lo < 0 or lo + size > limit or (size == 0 and not zero_ok):
        raise Reject(bad(lo), hint, [f"R{regno} min value is outside of the allowed memory range"])
    if v.umax >= MAX_VAR_OFF:
        raise Reject(f"R{regno} unbounded memory access, make sure to bounds check any such access", hint)
    hi = off + v.umax
    if hi + size > limit:
        raise Reject(bad(hi), hint, [f"R{regno} max value is outside of the allowed memory range"])


def stack_bounds(ck: CheckContext, regno: int, reg: Reg, off: int, size: int, kind: str) -> tuple[int, int]:
    """check_stack_access_within_bounds: [min, max) must lie in [-512, 0); return (min, max).

    ``kind`` is "read from", "write to" or "indirect access to" (a helper), as in the
    kernel's messages.  A zero-sized access still needs its start inside the stack.
    """
    v = reg.val
    if v.is_const():
        lo = s64(v.value) + off
        hi = lo + size
    else:
        if v.smax >= MAX_VAR_OFF or v.smin <= -MAX_VAR_OFF:
            raise Reject(f"invalid unbounded variable-offset {kind} stack R{regno}",
                         "the BPF stack is the 512 bytes below r10; bound the offset")
        lo = v.smin + off
        hi = v.smax + off + size
    if lo < -S.STACK_SIZE or lo > -1 or hi > 0 or size < 0:
        if v.is_const():
            raise Reject(f"invalid {kind} stack R{regno} off={off} size={size}",
                         "the BPF stack is the 512 bytes below r10")
        raise Reject(f"invalid variable-offset {kind} stack R{regno} var_off={v.var} off={off} size={size}",
                     "the BPF stack is the 512 bytes below r10; bound the offset")
    return lo, hi


def check_access(ck: CheckContext, st: S.VerifierState, regno: int, insn_off: int, size: int,
                 write: bool, value: Reg | None = None, sext: bool = False,
                 atomic: bool = False) -> Reg | None:
    """Check one load/store through register ``regno``; return the loaded value for reads."""
    reg = st.cur.regs[regno]
    t = reg.type
    if t == S.NOT_INIT:
        raise Reject(f"R{regno} !read_ok", f"r{regno} is used before anything was stored in it")
    off = reg.off + insn_off
    if atomic:
        _atomic_alignment(reg, insn_off, size)
    if t == S.CTX:
        if atomic:
            raise Reject(f"BPF_ATOMIC stores into R{regno} ctx is not allowed")
        if reg.off < 0:
            raise Reject(f"negative offset ctx ptr R{regno} off={reg.off} disallowed",
                         "access pt_regs fields through the unmodified context pointer (r1 at entry)")
        if reg.off:
            raise Reject(f"dereference of modified ctx ptr R{regno} off={reg.off} disallowed",
                         "access pt_regs fields through the unmodified context pointer (r1 at entry)")
        if not (reg.val.is_const() and reg.val.value == 0):
            raise Reject(f"variable ctx access var_off={reg.val.var} disallowed")
        if write or off < 0 or off >= PT_REGS_SIZE or off % size or off + size > PT_REGS_SIZE:
            raise Reject(f"invalid bpf_context access off={off} size={size}",
                         "the uprobe context is struct pt_regs: 168 read-only bytes, aligned fields")
        return None if write else _loaded(size, sext)
    if t == S.STACK:
        frame = st.frames[reg.frame]
        v = reg.val
        if v.is_const() and (s64(v.value) + off) % size:
            raise Reject(f"misaligned stack access off {s64(v.value)}+{reg.off}+{insn_off} size {size}",
                         "stack accesses must be aligned to their size")
        if not v.is_const():
            check_aligned(reg, insn_off, size)
        lo, hi = stack_bounds(ck, regno, reg, off, size, "write to" if write else "read from")
        ck.note_stack(frame, -lo)
        if not v.is_const():
            if write:
                mark_misc(frame, lo, hi)
                return None
            return _loaded(size, sext)
        if atomic:
            # the kernel reads the slot as a load would (check_atomic_rmw: a fetch is a fill and
            # gets the spilled register), then writes an unknown value over it
            r = read_stack(frame, lo, size)
            mark_misc(frame, lo, hi)
            return r
        if write:
            if value is not None and value.type == S.STACK and size == 8 and frame is not st.cur:
                raise Reject("cannot spill pointers to stack into stack frame of the caller",
                             "a callee's stack disappears when it returns; keep such pointers local")
            write_stack(ck, frame, lo, size, value)
            return None
        r = read_stack(frame, lo, size)
        if sext and r.type == S.SCALAR:
            return Reg(S.SCALAR, r.val.sext(size))
        return r
    if t == S.MAP_VALUE:
        m = ck.maps[reg.map]
        map_access_type(m, off, size, write)
        region_check(ck, regno, reg, off, size, m.value_size, "map value")
        if write:
            return None
        if m.readonly and m.data is not None and reg.val.is_const() and not sext:
            o = off + reg.val.value
            if o + size <= len(m.data):
                return S.const_reg(int.from_bytes(m.data[o:o + size], "little"))
        return _loaded(size, sext)
    if t in (S.RINGBUF_MEM, S.MEM):
        region_check(ck, regno, reg, off, size, reg.size, "memory")
        return None if write else _loaded(size, sext)
    if t == S.MAP_KEY:
        if write:
            raise Reject(f"write to change key R{regno} not allowed")
        region_check(ck, regno, reg, off, size, ck.maps[reg.map].key_size, "map key")
        return _loaded(size, sext)
    raise Reject(f"R{regno} invalid mem access '{t}'", _deref_hint(reg))


_PTR_DESC = {S.MAP_VALUE: "value ", S.STACK: "stack ", S.CTX: "context "}


def _atomic_alignment(reg: Reg, insn_off: int, size: int) -> None:
    """Atomics need natural alignment whatever the pointer (the kernel checks this first)."""
    v = tn.add(reg.val.var, tn.const(reg.off + insn_off))
    if (v.value | v.mask) & (size - 1):
        var = str(s64(reg.val.value)) if reg.val.is_const() else str(reg.val.var)
        raise Reject(f"misaligned {_PTR_DESC.get(reg.type, '')}access off {var}+{reg.off}+{insn_off} size {size}",
                     "atomic operations need naturally aligned addresses")


def _deref_hint(reg: Reg) -> str:
    t = reg.type
    if reg.released_at:
        return (f"this register pointed to a ringbuf record released at insn {reg.released_at - 1} "
                "(submit/discard); a record cannot be used after it is released")
    if t in S.OR_NULL:
        return "the pointer may be NULL: check it against 0 before using it"
    if t == S.SCALAR:
        return "this register holds a number, not a pointer (was the pointer released or never set?)"
    return f"a {t} pointer cannot be dereferenced"


# -- stack bytes ------------------------------------------------------------------------

def mark_misc(frame: S.Frame, lo: int, hi: int) -> None:
    for a in range(lo, hi):
        slot = (S.STACK_SIZE + a) // 8
        if slot in frame.spills:
            _scrub(frame, slot)
        frame.stack[S.STACK_SIZE + a] = S.S_MISC


def _scrub(frame: S.Frame, slot: int) -> None:
    del frame.spills[slot]
    base = slot * 8
    for j in range(8):
        if frame.stack[base + j] == S.S_SPILL:
            frame.stack[base + j] = S.S_MISC


def write_stack(ck: CheckContext, frame: S.Frame, off: int, size: int, value: Reg | None) -> None:
    idx = S.STACK_SIZE + off
    slot = idx // 8
    if slot in frame.spills:
        _scrub(frame, slot)
    if value is not None and idx % 8 == 0:
        if value.type == S.SCALAR:
            # the kernel saves the whole register even for a narrow spill (a fill truncates
            # it); the id survives only when the value fits the spill
            width = value.val.umax.bit_length() if value.val.smin >= 0 else 64
            fits = size == 8 or width <= size * 8
            frame.spills[slot] = value if fits or not value.id else Reg(S.SCALAR, value.val)
            for j in range(size):
                frame.stack[idx + j] = S.S_SPILL
            return
        elif value.is_ptr:
            if size != 8:
                raise Reject("invalid size of register spill", "pointers are spilled as 8-byte values")
            frame.spills[slot] = value
            for j in range(8):
                frame.stack[idx + j] = S.S_SPILL
            return
    if value is not None and value.is_ptr and size != 8:
        raise Reject("invalid size of register spill", "pointers are spilled as 8-byte values")
    kind = S.S_ZERO if (value is not None and value.type == S.SCALAR and value.val.is_const()
                        and value.val.value & ((1 << (size * 8)) - 1) == 0) else S.S_MISC
    for j in range(size):
        frame.stack[idx + j] = kind


def read_stack(frame: S.Frame, off: int, size: int) -> Reg:
    idx = S.STACK_SIZE + off
    kinds = frame.stack[idx:idx + size]
    slot = idx // 8
    sp = frame.spills.get(slot)
    if sp is not None and sp.is_ptr and size != 8 and S.S_SPILL in kinds:
        raise Reject("invalid size of register fill", "a spilled pointer must be read back as 8 bytes")
    if sp is not None and all(k == S.S_SPILL for k in kinds):
        if idx % 8 == 0:
            if size == 8:
                return sp
            if sp.type == S.SCALAR:
                return Reg(S.SCALAR, sp.val.trunc(size)) if sp.val.umax >> (size * 8) else \
                    Reg(S.SCALAR, sp.val, id=sp.id)
        return Reg(S.SCALAR, unknown_bits(size))
    if all(k == S.S_ZERO for k in kinds):
        return S.const_reg(0)
    return Reg(S.SCALAR, unknown_bits(size))


def helper_stack_access(ck: CheckContext, st: S.VerifierState, regno: int, reg: Reg, size: int,
                        write: bool) -> None:
    """A helper reads or fills ``size`` bytes at a stack pointer."""
    frame = st.frames[reg.frame]
    lo, hi = stack_bounds(ck, regno, reg, reg.off, size, "write to" if write else "read from")
    ck.note_stack(frame, -lo)
    if not write:
        ck.note_helper_stack_read(st, reg.frame, lo, hi)
    if write:
        mark_misc(frame, lo, hi)
