"""Calls: helpers (checked against their prototypes), BPF-to-BPF calls, callbacks,
tail calls, and function exit (references, return values, frames).
"""

from __future__ import annotations

from ubpf_py.helpers.protos import (
    HELPER_NAMES_BY_ID,
    KPROBE_ALLOWED,
    MODELLED_MAP_TYPES,
    PROTOS,
    SPECIAL_MAP_HELPERS,
    HelperProto,
    helper_name,
)
from ubpf_py.isa import opcodes as op
from ubpf_py.isa.opcodes import MAX_CALL_DEPTH
from ubpf_py.obj.mapdefs import BPF_F_RDONLY_PROG
from ubpf_py.verifier import btfptr as BP
from ubpf_py.verifier import memory as M
from ubpf_py.verifier import state as S
from ubpf_py.verifier.btfwalk import struct_access
from ubpf_py.verifier.context import CheckContext
from ubpf_py.verifier.memory import Reject
from ubpf_py.verifier.scalar import UNKNOWN, Scalar, s64
from ubpf_py.verifier.state import Reg

MAX_VAR_SIZE = 1 << 29
#: helpers that change a map (record_func_map refuses them on BPF_F_RDONLY_PROG maps):
#: delete, update, push, pop
_MAP_WRITING = frozenset({2, 3, 87, 88})
MAX_ERRNO = 4095

_MEM_TYPES = "fp, pkt, pkt_meta, map_key, map_value, mem, ringbuf_mem, buf, trusted_ptr_"
_EXPECTED = {
    "mem": _MEM_TYPES, "mem_or_null": _MEM_TYPES, "uninit_mem": _MEM_TYPES,
    "map_key": _MEM_TYPES, "map_value": _MEM_TYPES, "uninit_map_value": _MEM_TYPES,
    "ctx": "ctx", "map": "map_ptr", "func": "func", "stack_or_null": "fp",
    "ringbuf_mem": "ringbuf_mem", "const_str": "map_value",
    "size": "scalar", "size_or_zero": "scalar", "alloc_size": "scalar",
}
_MEM_PTRS = {S.STACK, S.MAP_VALUE, S.RINGBUF_MEM, S.MEM, S.MAP_KEY}


def _type_error(regno: int, reg: Reg, kind: str) -> Reject:
    return Reject(f"R{regno} type={reg.type} expected={_EXPECTED[kind]}",
                  f"argument {regno} of this helper must be a {kind.replace('_', ' ')} pointer")


class _Meta:
    """What earlier arguments told us about later ones (the kernel's bpf_call_arg_meta)."""

    __slots__ = ("const_key", "func", "key_at", "map", "mem_regno", "mem_write", "ref", "size_max", "task_kind")

    def __init__(self) -> None:
        self.map = -1
        self.mem_regno = 0
        self.mem_write = False
        self.size_max = 0
        self.func = -1
        self.ref = 0
        self.const_key: int | None = None
        #: (frame, offset, size) of a constant key on the stack
        self.key_at: tuple[int, int, int] | None = None
        #: the object kind of a ``btf_task`` argument (``kernel_task.OBJ_*``)
        self.task_kind = 0


def check_helper(ck: CheckContext, st: S.VerifierState, pc: int, hid: int) -> bool:
    """Check a helper call; returns True when the current path entered a callback frame."""
    proto = PROTOS.get(hid)
    if not 0 < hid < len(HELPER_NAMES_BY_ID):   # (helper_name's "unknown", without building a name)
        raise Reject(f"invalid func unknown#{hid}", "no helper has this number")
    if hid not in KPROBE_ALLOWED:
        raise Reject(f"program of this type cannot use helper {helper_name(hid)}#{hid}",
                     "uprobe programs run as kprobe programs; this helper is for another program type")
    if proto is None:
        name = helper_name(hid)
        raise Reject(f"helper {name}#{hid} is not modelled by ubpf-py",
                     f"not supported: {name}; run the program with the kernel backend")
    if proto.sleepable_only and not ck.sleepable:
        raise Reject("helper call might sleep in a non-sleepable prog",
                     "this helper may only be called from sleepable (uprobe.s) programs")
    if proto.btf_only:
        raise Reject(f"helper {helper_name(hid)}#{hid} takes BTF-typed kernel objects; not supported by ubpf-py",
                     "not supported: helpers with BTF object arguments")
    regs = st.cur.regs
    meta = _Meta()
    for i, kind in enumerate(proto.args):
        _check_arg(ck, st, pc, proto, i + 1, kind, regs[i + 1], meta)
    if meta.map >= 0:
        m = ck.maps[meta.map]
        if hid in _MAP_WRITING and (m.readonly or m.flags & BPF_F_RDONLY_PROG):
            raise Reject("write into map forbidden", f"map '{m.name}' is read-only for programs")
        _check_map_compat(ck, proto, meta.map)
    if hid == 12 and st.refs:
        ref, insn = next(iter(st.refs.items()))     # the kernel's check_resource_leak wording
        raise Reject(f"Unreleased reference id={ref} alloc_insn={insn}",
                     "submit or discard every reserved ringbuf record before bpf_tail_call",
                     extra=["tail_call would lead to reference leak"])
    if proto.callback and meta.func >= 0:
        return _enter_callback(ck, st, pc, proto, meta)
    _finish_helper(ck, st, pc, proto, meta)
    return False


def _check_arg(ck: CheckContext, st: S.VerifierState, pc: int, proto: HelperProto, regno: int, kind: str,
               reg: Reg, meta: _Meta) -> None:
    if reg.type == S.NOT_INIT:
        raise Reject(f"R{regno} !read_ok", f"argument {regno} of {proto.full_name} was never set")
    t = reg.type
    if kind == "anything":
        return
    if kind == "map":
        if t != S.MAP_PTR:
            raise _type_error(regno, reg, kind)
        meta.map = reg.map
        return
    if kind in ("map_key", "map_value", "uninit_map_value"):
        if meta.map < 0:
            raise Reject(f"invalid map_ptr to access map->{'key' if kind == 'map_key' else 'value'}")
        m = ck.maps[meta.map]
        size = m.key_size if kind == "map_key" else m.value_size
        if t not in _MEM_PTRS:
            raise _type_error(regno, reg, kind)
        mem_access(ck, st, regno, reg, size, write=kind == "uninit_map_value")
        if kind == "map_key" and reg.type == S.STACK and reg.val.is_const():
            meta.const_key = _stack_const(st, reg, size)
            meta.key_at = (reg.frame, s64(reg.off + reg.val.value), size)
        return
    if kind in ("mem", "mem_or_null", "uninit_mem"):
        meta.mem_regno = regno
        meta.mem_write = kind == "uninit_mem"
        if kind == "mem_or_null" and t == S.SCALAR and reg.val.is_const() and reg.val.value == 0:
            return
        if t == S.TRUSTED_BTF_PTR:   # a trusted kernel object is readable memory (mem_types)
            if meta.mem_write:
                raise Reject(f"{proto.full_name}() may write into memory pointed by R{regno} type={t}",
                             "kernel objects are read-only for uprobe programs")
            return
        if t not in _MEM_PTRS:
            raise _type_error(regno, reg, kind)
        return
    if kind in ("size", "size_or_zero"):
        if t != S.SCALAR:
            raise _type_error(regno, reg, kind)
        v = reg.val
        if v.smin < 0:
            raise Reject(f"R{regno} min value is negative, either use unsigned or 'var &= const'",
                         "bound the size with 'size &= const' or compare it against a constant")
        if v.umin == 0 and kind == "size":
            raise Reject(f"R{regno} invalid zero-sized read: u64=[{v.umin},{v.umax}]",
                         "the size may be zero here; this helper needs at least one byte")
        if v.umax >= MAX_VAR_SIZE:
            raise Reject(f"R{regno} unbounded memory access, use 'var &= const' or 'if (var < const)'",
                         "the size has no upper bound")
        meta.size_max = v.umax
        prev = st.cur.regs[meta.mem_regno]
        if v.umax == 0:
            if prev.type == S.SCALAR and prev.val.is_const() and prev.val.value == 0:
                return
            if prev.type not in _MEM_PTRS and prev.type != S.TRUSTED_BTF_PTR:
                raise _type_error(meta.mem_regno, prev, "mem")
            # a zero-sized access still needs a pointer that points inside its object
            mem_access(ck, st, meta.mem_regno, prev, 0, write=meta.mem_write)
            return
        if prev.type == S.SCALAR:
            raise _type_error(meta.mem_regno, prev, "mem")
        mem_access(ck, st, meta.mem_regno, prev, v.umax, write=meta.mem_write)
        return
    if kind == "alloc_size":
        if t != S.SCALAR:
            raise _type_error(regno, reg, kind)
        if not reg.val.is_const():
            raise Reject(f"R{regno} is not a known constant'", "the ringbuf record size must be a constant")
        meta.size_max = reg.val.value
        return
    if kind == "ctx":
        if t != S.CTX:
            raise _type_error(regno, reg, kind)
        if reg.off < 0:
            raise Reject(f"negative offset ctx ptr R{regno} off={reg.off} disallowed",
                         "pass the unmodified context pointer")
        if reg.off or not (reg.val.is_const() and reg.val.value == 0):
            raise Reject(f"dereference of modified ctx ptr R{regno} off={reg.off} disallowed",
                         "pass the unmodified context pointer")
        return
    if kind == "func":
        if t != S.FUNC:
            raise _type_error(regno, reg, kind)
        meta.func = reg.subprog
        return
    if kind == "stack_or_null":
        if t == S.SCALAR and reg.val.is_const() and reg.val.value == 0:
            return
        if t != S.STACK:
            raise _type_error(regno, reg, kind)
        return
    if kind == "ringbuf_mem":
        if t != S.RINGBUF_MEM:
            raise _type_error(regno, reg, kind)
        if reg.off or not (reg.val.is_const() and reg.val.value == 0):
            raise Reject(f"R{regno} must have zero offset when passed to release func or trusted arg to kfunc",
                         "pass the pointer bpf_ringbuf_reserve returned, unmodified")
        if not reg.ref or reg.ref not in st.refs:
            raise Reject(f"R{regno} must be referenced when passed to release function")
        meta.ref = reg.ref
        return
    if kind == "long_out":
        if t not in _MEM_PTRS:
            raise _type_error(regno, reg, "mem")
        mem_access(ck, st, regno, reg, 8, write=True)  # bounds first, then alignment (the kernel's order)
        if t == S.STACK:
            M.check_aligned(reg, 0, 8)
        return
    if kind == "const_str":
        if t != S.MAP_VALUE:
            raise _type_error(regno, reg, kind)
        m = ck.maps[reg.map]
        if not m.readonly:
            raise Reject(f"R{regno} does not point to a readonly map'", "format strings must be in .rodata")
        if not reg.val.is_const():
            raise Reject(f"R{regno} is not a constant address'")
        o = reg.off + reg.val.value
        data = m.data or b""
        if o < 0 or o >= m.value_size or b"\0" not in data[o:]:
            raise Reject("string is not zero-terminated")
        return
    if kind == "btf_task":
        _check_task_arg(regno, reg)
        meta.task_kind = reg.size
        return
    raise Reject(f"unsupported helper argument kind {kind}")


#: the register types an ARG_PTR_TO_BTF_ID argument takes (the kernel's btf_ptr_types)
_BTF_ID_ARG_TYPES = ("ptr_", "trusted_ptr_", "rcu_ptr_")


def _check_task_arg(regno: int, reg: Reg) -> None:
    """A ``struct task_struct *`` argument (ARG_PTR_TO_BTF_ID with the task's BTF id):
    check_reg_type, then check_func_arg_reg_off, in the kernel's order and words."""
    if reg.type not in _BTF_ID_ARG_TYPES:
        raise Reject(f"R{regno} type={reg.type} expected={', '.join(_BTF_ID_ARG_TYPES)}",
                     "pass a task pointer the kernel trusts: bpf_get_current_task_btf() "
                     "(pointers loaded from kernel objects are not)")
    btf = BP.kernel_btf()
    if reg.off or btf.type(reg.map).name != "task_struct":
        # btf_struct_ids_match walks one byte at the offset first: its complaint (an offset
        # outside the struct) is the kernel's first line.  (The walk would also take a
        # task_struct embedded at that offset of another struct; no kernel struct has one.)
        struct_access(btf, reg.map, reg.off & 0xFFFFFFFF, 1)
        raise Reject(f"R{regno} is of type {btf.type(reg.map).name} but task_struct is expected")
    if not reg.val.is_const() or reg.val.value:
        raise Reject(f"variable {reg.type} access var_off={reg.val.var} disallowed")


ELIDE_NULL_MAP_TYPES = {2, 6}  # array, percpu_array


def _stack_const(st: S.VerifierState, reg: Reg, size: int) -> int | None:
    """The key's value if the stack bytes hold a known constant (spilled const or zeros)."""
    off = reg.off + reg.val.value
    if off >= (1 << 63):
        off -= 1 << 64
    if off < -S.STACK_SIZE or off + size > 0:
        return None
    r = M.read_stack(st.frames[reg.frame], off, size) if size in (1, 2, 4, 8) else None
    if r is not None and r.type == S.SCALAR and r.val.is_const():
        return r.val.value
    return None


def _check_map_compat(ck: CheckContext, proto: HelperProto, map_idx: int) -> None:
    m = ck.maps[map_idx]
    if m.type not in MODELLED_MAP_TYPES:
        cannot = f"cannot pass map_type {m.type} into func {proto.full_name}#{proto.id}"
        if m.type in (15, 18) and proto.id in (2, 3):  # sockmap/sockhash changes (may_update_sockmap)
            raise Reject("cannot update sockmap in this context", "kprobe programs cannot change socket maps",
                         [cannot])
        raise Reject(cannot, f"not supported: map '{m.name}' ({m.type_name}) from a uprobe program")
    allowed_helpers = _special_helpers(m.type)
    if (proto.map_types is not None and m.type not in proto.map_types) or \
            (allowed_helpers is not None and proto.id not in allowed_helpers):
        raise Reject(f"cannot pass map_type {m.type} into func {proto.full_name}#{proto.id}",
                     f"map '{m.name}' ({m.type_name}) cannot be used with this helper")


def _special_helpers(map_type: int) -> frozenset[int] | None:
    return SPECIAL_MAP_HELPERS.get(map_type)


def mem_access(ck: CheckContext, st: S.VerifierState, regno: int, reg: Reg, size: int, write: bool) -> None:
    t = reg.type
    if t == S.STACK:
        M.helper_stack_access(ck, st, regno, reg, size, write)
        return
    if t == S.MAP_VALUE:
        m = ck.maps[reg.map]
        M.map_access_type(m, reg.off, size, write)
        M.region_check(ck, regno, reg, reg.off, size, m.value_size, "map value", zero_ok=True)
        return
    if t in (S.RINGBUF_MEM, S.MEM):
        M.region_check(ck, regno, reg, reg.off, size, reg.size, "memory", zero_ok=True)
        return
    if t == S.MAP_KEY:
        if write:
            raise Reject(f"write to change key R{regno} not allowed")
        M.region_check(ck, regno, reg, reg.off, size, ck.maps[reg.map].key_size, "map key", zero_ok=True)
        return
    if t == S.TRUSTED_BTF_PTR and not write:
        BP.check_access(ck, reg, regno, reg.off, size, False, False, -1)   # the kernel walks it as a read
        return
    raise _type_error(regno, reg, "mem")


def _finish_helper(ck: CheckContext, st: S.VerifierState, pc: int, proto: HelperProto, meta: _Meta) -> None:
    regs = st.cur.regs
    if meta.ref:
        release_reference(st, meta.ref, pc)
    for r in range(1, 6):
        regs[r] = S.UNINIT
    ret = proto.ret
    if ret == "int":
        val = UNKNOWN
        if proto.ret_refine == "str":
            val = Scalar(UNKNOWN.var, 0, (1 << 64) - 1, -MAX_ERRNO, meta.size_max, 0, (1 << 32) - 1,
                         -MAX_ERRNO, min(meta.size_max, (1 << 31) - 1)).sync()
        regs[0] = Reg(S.SCALAR, val)
    elif ret == "void":
        regs[0] = S.UNINIT
    elif ret == "map_value_or_null" and meta.map in ck.inner_of:
        regs[0] = Reg(S.MAP_PTR_OR_NULL, Scalar.const(0), map=ck.inner_of[meta.map], id=ck.new_id())
    elif ret == "map_value_or_null":
        if meta.const_key is not None and proto.id == 1 and ck.maps[meta.map].type in ELIDE_NULL_MAP_TYPES \
                and meta.key_at is not None:
            # the result's type depends on the key's value: a spilled key is precise, as in the
            # kernel's get_constant_map_key (known-zero bytes are compared exactly anyway)
            frame, off, size = meta.key_at
            kinds = st.frames[frame].stack[S.STACK_SIZE + off:S.STACK_SIZE + off + size]
            if any(k != S.S_ZERO for k in kinds):
                ck.note_precise_stack(st, frame, off, off + size)
        if meta.const_key is not None and proto.id == 1 and \
                ck.maps[meta.map].type in ELIDE_NULL_MAP_TYPES and meta.const_key < ck.maps[meta.map].max_entries:
            # Linux 6.13+: an array lookup with a constant in-range key cannot fail
            regs[0] = Reg(S.MAP_VALUE, Scalar.const(0), map=meta.map)
        else:
            regs[0] = Reg(S.MAP_VALUE_OR_NULL, Scalar.const(0), map=meta.map, id=ck.new_id())
    elif ret == "btf_task":
        regs[0] = BP.current_task()
    elif ret == "btf_pt_regs":
        regs[0] = BP.task_pt_regs(meta.task_kind)
    elif ret == "ringbuf_mem_or_null":
        ck.new_id()
        ref = ck.new_id()
        st.refs[ref] = pc
        regs[0] = Reg(S.RINGBUF_MEM_OR_NULL, Scalar.const(0), size=meta.size_max, id=ref, ref=ref)
    else:
        raise Reject(f"unsupported helper return kind {ret}")


def release_reference(st: S.VerifierState, ref: int, pc: int) -> None:
    """The object is gone: every copy of a pointer to it becomes a plain number."""
    st.refs.pop(ref, None)
    gone = Reg(S.SCALAR, UNKNOWN, released_at=pc + 1)
    for f in st.frames:
        for i, r in enumerate(f.regs):
            if r.ref == ref:
                f.regs[i] = gone
        for k, r in list(f.spills.items()):
            if r.ref == ref:
                f.spills[k] = gone


def _enter_callback(ck: CheckContext, st: S.VerifierState, pc: int, proto: HelperProto, meta: _Meta) -> bool:
    """Push the 'helper returned' continuation, and move the current path into the callback."""
    after = st.copy()
    _finish_helper(ck, after, pc, proto, meta)
    ck.push(after, pc + 1)
    caller = st.cur
    if len(st.frames) >= MAX_CALL_DEPTH:
        raise Reject(f"the call stack of {len(st.frames) + 1} frames is too deep")
    frame = S.new_frame(len(st.frames), pc, meta.func)
    frame.in_callback = True
    if proto.callback == "loop":
        frame.regs[1] = S.UNKNOWN_SCALAR
        frame.regs[2] = caller.regs[3]
    else:  # for_each_map_elem(map, cb(map, key, value, ctx), ctx, flags)
        m = caller.regs[1].map
        frame.regs[1] = caller.regs[1]
        frame.regs[2] = Reg(S.MAP_KEY, Scalar.const(0), map=m)
        frame.regs[3] = Reg(S.MAP_VALUE, Scalar.const(0), map=m)
        frame.regs[4] = caller.regs[3]
    st.frames.append(frame)
    ck.enter_function(meta.func)
    return True


def check_pseudo_call(ck: CheckContext, st: S.VerifierState, pc: int, target: int) -> int:
    """A BPF-to-BPF call; returns the next instruction on the current path."""
    if len(st.frames) >= MAX_CALL_DEPTH:
        raise Reject(f"the call stack of {len(st.frames) + 1} frames is too deep",
                     "at most 8 nested BPF function calls")
    if target in ck.global_funcs:
        ck.check_global_call(st, pc, target)
        regs = st.cur.regs
        for r in range(1, 6):
            regs[r] = S.UNINIT
        regs[0] = S.UNKNOWN_SCALAR
        return pc + 1
    caller = st.cur
    frame = S.new_frame(len(st.frames), pc, target)
    for r in range(1, 6):
        frame.regs[r] = caller.regs[r]
    st.frames.append(frame)
    ck.enter_function(target)
    return target


def check_exit(ck: CheckContext, st: S.VerifierState, pc: int) -> int | None:
    """Process exit; returns where the path continues, or None when it is finished."""
    cur = st.cur
    r0 = cur.regs[0]
    if len(st.frames) == 1:
        if r0.type == S.NOT_INIT:
            raise Reject("R0 !read_ok", "set r0 (the return value) before exit")
        if st.refs:
            ref, insn = next(iter(st.refs.items()))
            raise Reject(f"Unreleased reference id={ref} alloc_insn={insn}",
                         "every bpf_ringbuf_reserve'd record must be submitted or discarded on every path",
                         extra=[f"BPF_EXIT instruction in {'global function' if ck.in_global else 'main prog'}"
                                " would lead to reference leak"])
        if ck.in_global and r0.type != S.SCALAR:
            raise Reject(f"At subprogram exit the register R0 is not a scalar value ({r0.type})",
                         "global functions return a scalar")
        return None
    if cur.in_callback:
        if r0.type == S.NOT_INIT:
            raise Reject("R0 !read_ok", "the callback must return 0 or 1")
        if r0.type != S.SCALAR:
            raise Reject(f"At callback return the register R0 is not a known value ({r0.type})")
        if r0.val.smin < 0 or r0.val.smax > 1:
            raise Reject(f"At callback return the register R0 has smin={r0.val.smin} smax={r0.val.smax} "
                         "should have been in [0, 1]", "callbacks return 0 (continue) or 1 (stop)")
        st.frames.pop()
        return cur.callsite
    if r0.type == S.STACK and r0.frame == cur.frameno:
        raise Reject("cannot return stack pointer to the caller frame")
    st.frames.pop()
    caller = st.cur
    caller.regs[0] = r0
    for r in range(1, 6):
        caller.regs[r] = S.UNINIT
    return cur.callsite + 1


def abnormal_return_in_subprog(insns: list, func_of, has_btf: bool) -> tuple[str, int] | None:
    """The kernel's check_abnormal_return: without BTF func_info the kernel cannot check how a
    subprogram leaves, so a tail call or LD_ABS/LD_IND (which may end the program) in any
    subprogram -- reached or not -- refuses the load before the walk.  (message, insn) or None."""
    if has_btf:
        return None
    for pc, ins in enumerate(insns):
        if func_of(pc) == 0:
            continue
        if ins.opcode & 0x07 == op.BPF_LD and ins.opcode & 0xE0 in (op.BPF_ABS, op.BPF_IND):
            return "LD_ABS is not allowed in subprogs without BTF", pc
        if ins.opcode == op.BPF_JMP | op.BPF_CALL and ins.src == op.BPF_CALL_HELPER and ins.imm == 12:
            return "tail_call is not allowed in subprogs without BTF", pc
    return None
