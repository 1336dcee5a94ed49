"""Typed kernel pointers (the kernel's PTR_TO_BTF_ID): ``bpf_get_current_task_btf()`` and
the pointers loaded through it.

A uprobe program runs as a kprobe program; the kernel hands it ``struct task_struct *``
from ``bpf_get_current_task_btf`` as a *trusted* pointer and lets it load fields directly
(``task->pid``, ``task->real_parent->tgid``) instead of through bpf_probe_read_kernel.
Each load is checked the way check_ptr_to_btf_access does: constant offset, not negative,
inside a member of the struct's BTF (``btfwalk``), read only.  A scalar member gives an
unknown scalar of the load's size; a pointer member gives another PTR_TO_BTF_ID whose
trust follows the kernel's rules (walking a trusted or RCU pointer in a non-sleepable
program: fields on the kernel's ``__safe_rcu`` lists stay RCU-trusted and never NULL,
``__rcu``-tagged ones become RCU pointers that may be NULL; other fields and sleepable programs get untrusted pointers).  Register types are spelled like the
kernel's reg_type_str(), so refusals read the same ("R1 invalid mem access
'rcu_ptr_or_null_'").

Running them: the task and the objects it points to are buffers laid out by the same
BTF (``helpers.kernel_task``), so a load reads the buffer; ``kernel_task.MODEL`` says
which fields hold a value and where the filled pointers lead.  The verifier follows it
(a register's ``size`` is the kind of object it points to, 0 when the pointer has no
userspace source and is therefore NULL here): a load through such a NULL pointer is
replaced by ``dst = 0`` before any engine sees it, the value the kernel's faulting
BPF_PROBE_MEM load gives.  No engine ever dereferences NULL, so the interpreter, the
JIT and the in-target path need no fault-tolerant load of their own.  Each field read
without a value here is named once, in a warning at load (``notes``).
"""

from __future__ import annotations

from ubpf_py.helpers.kernel_task import MODEL, OBJ_NONE, OBJ_PT_REGS, OBJ_TASK
from ubpf_py.isa import opcodes as op
from ubpf_py.isa.instruction import Instruction
from ubpf_py.obj.btf import KIND_STRUCT
from ubpf_py.verifier import state as S
from ubpf_py.verifier.btfwalk import MEM_PERCPU, MEM_RCU, MEM_USER, PTR_UNTRUSTED, Walk, struct_access
from ubpf_py.verifier.context import CheckContext
from ubpf_py.verifier.memory import Reject
from ubpf_py.verifier.scalar import Scalar, unknown_bits


class KernelFieldWarning(UserWarning):
    """A program reads a kernel field directly that has no value here (it reads 0)."""


PTR_TRUSTED = 16
PTR_MAYBE_NULL = 32
_PREFIX = ((MEM_USER, "user_"), (MEM_PERCPU, "percpu_"), (MEM_RCU, "rcu_"), (PTR_UNTRUSTED, "untrusted_"),
           (PTR_TRUSTED, "trusted_"))

#: licenses the kernel takes as GPL-compatible (license_is_gpl_compatible)
_GPL = frozenset({"GPL", "GPL v2", "GPL and additional rights", "Dual BSD/GPL", "Dual MIT/GPL", "Dual MPL/GPL"})


def type_name(flags: int) -> str:
    """reg_type_str() of PTR_TO_BTF_ID with ``flags``."""
    pre = "".join(p for bit, p in _PREFIX if flags & bit)
    return pre + "ptr_" + ("or_null_" if flags & PTR_MAYBE_NULL else "")


def flags_of(t: str) -> int:
    f = PTR_MAYBE_NULL if t.endswith("or_null_") else 0
    return f | sum(bit for bit, p in _PREFIX if p in t.split("ptr_")[0])


def kernel_btf():
    from ubpf_py.obj.btf import load_kernel_btf

    return load_kernel_btf()


def current_task() -> S.Reg:
    """The result of bpf_get_current_task_btf: a trusted, non-NULL ``struct task_struct *``."""
    btf = kernel_btf()
    tid = btf.find("task_struct", KIND_STRUCT) if btf is not None else 0
    if not tid:
        raise Reject("bpf_get_current_task_btf needs the kernel's BTF",
                     "not supported: no /sys/kernel/btf/vmlinux (CONFIG_DEBUG_INFO_BTF) on this machine")
    return S.Reg(S.TRUSTED_BTF_PTR, Scalar.const(0), map=tid, size=OBJ_TASK)


def task_pt_regs(task_kind: int) -> S.Reg:
    """The result of bpf_task_pt_regs (RET_PTR_TO_BTF_ID: a plain, non-NULL ``struct pt_regs *``).
    The current task's registers are the probe's context here; another task's have no object."""
    btf = kernel_btf()
    kind = OBJ_PT_REGS if task_kind == OBJ_TASK else OBJ_NONE
    return S.Reg("ptr_", Scalar.const(0), map=btf.find("pt_regs", KIND_STRUCT), size=kind)


def _on_safe_list(btf, struct_id: int, field: str, target: int, suffix: str) -> bool:
    """btf_nested_type_is_trusted: does the kernel's ``<struct><suffix>`` list name ``field``
    as a pointer to ``target``?  The lists are in the running kernel's BTF."""
    st = btf.type(struct_id)
    safe = btf.find_all(st.name + suffix, st.kind)
    if not safe:
        return False
    for m in btf.type(safe[0]).members:
        mt = btf.type(m.type_id)
        if mt.kind == 2 and m.name == field and btf.resolve(mt.type_id) == target:   # 2: KIND_PTR
            return True
    return False


def _loaded_flags(ck: CheckContext, btf, reg: S.Reg, w: Walk) -> int:
    """The flags of a pointer loaded from ``reg`` (check_ptr_to_btf_access, after the walk)."""
    rflags = flags_of(reg.type)
    flag = w.flags
    sid, field, target = reg.map, w.field_name, w.next_id
    if rflags & PTR_UNTRUSTED:
        return PTR_UNTRUSTED
    trusted = bool(rflags & PTR_TRUSTED) and not rflags & ~PTR_TRUSTED
    if not (trusted or rflags & MEM_RCU):
        return flag & ~(PTR_TRUSTED | MEM_RCU)    # old compat: plain pointers
    if _on_safe_list(btf, sid, field, target, "__safe_trusted"):
        return flag | PTR_TRUSTED
    if _on_safe_list(btf, sid, field, target, "__safe_trusted_or_null"):
        return flag | PTR_TRUSTED | PTR_MAYBE_NULL
    if not ck.sleepable and not rflags & PTR_MAYBE_NULL:
        if _on_safe_list(btf, sid, field, target, "__safe_rcu"):
            return flag | MEM_RCU
        rcu_or_null = _on_safe_list(btf, sid, field, target, "__safe_rcu_or_null")
        if flag & MEM_RCU or rcu_or_null:
            flag |= MEM_RCU | PTR_MAYBE_NULL
            if rcu_or_null and flag & PTR_UNTRUSTED:
                flag &= ~PTR_UNTRUSTED
            return flag
        if flag & (MEM_PERCPU | MEM_USER):
            return flag
        # walking a field the kernel knows nothing about: Linux 6.18 gives an untrusted pointer
        # (6.12 kept a plain one; both load the same way, only helpers taking BTF ids differ)
        return PTR_UNTRUSTED
    return PTR_UNTRUSTED


def check_access(ck: CheckContext, reg: S.Reg, regno: int, off: int, size: int, write: bool, sext: bool,
                 pc: int) -> S.Reg | None:
    """A load (or store) of ``size`` bytes at ``reg + off`` (``off`` includes ``reg.off``) by the
    instruction at ``pc`` (-1: a helper reads it; nothing to rewrite)."""
    if reg.type == S.RDONLY_UNTRUSTED_MEM:
        return _untyped_access(ck, reg, regno, size, write, sext, pc)
    btf = kernel_btf()
    tname = btf.type(reg.map).name
    # (a program built without a license section -- assembled text -- is not held to it: the
    # rest of the verifier does not model GPL-only rules either)
    lic = getattr(getattr(ck, "prog", None), "license", "")
    if lic and lic not in _GPL:
        raise Reject(f"Cannot access kernel 'struct {tname}' from non-GPL compatible program",
                     "declare a GPL-compatible license (char LICENSE[] SEC(\"license\") = \"GPL\")")
    if off < 0:
        raise Reject(f"R{regno} is ptr_{tname} invalid negative access: off={off}")
    v = reg.val
    if not v.is_const() or v.value:
        raise Reject(f"R{regno} is ptr_{tname} invalid variable offset: off={off}, var_off={v.var}",
                     "fields of kernel structs are read at constant offsets")
    rflags = flags_of(reg.type)
    if rflags & MEM_USER:
        raise Reject(f"R{regno} is ptr_{tname} access user memory: off={off}",
                     "a __user pointer is read with bpf_probe_read_user")
    if rflags & MEM_PERCPU:
        raise Reject(f"R{regno} is ptr_{tname} access percpu memory: off={off}")
    if write:
        raise Reject("only read is supported", "kernel objects are read-only for uprobe programs")
    w = struct_access(btf, reg.map, off, size)
    src_kind = reg.size
    model = MODEL.get(src_kind)
    top = w.path[0][1] if w.path else ""
    if w.pointer and w.untyped:
        out = S.Reg(S.RDONLY_UNTRUSTED_MEM, Scalar.const(0), map=w.next_id)
        has_value = False
    elif w.pointer:
        kind = OBJ_NONE
        if model is not None and len(w.path) == 1 and top in model[2] and \
                btf.type(w.next_id).name == MODEL[model[2][top]][0]:
            kind = model[2][top]
        flags = _loaded_flags(ck, btf, reg, w)
        out = S.Reg(type_name(flags), Scalar.const(0), map=w.next_id, size=kind,
                    id=ck.new_id() if flags & PTR_MAYBE_NULL else 0)
        has_value = kind != OBJ_NONE
    else:
        out = S.Reg(S.SCALAR, Scalar.unknown().sext(size) if sext else unknown_bits(size))
        has_value = model is not None and top in model[1]
    field = ".".join(m for _s, m in w.path if m)
    # helper reads are kept under -2 - (the call's insn): noted, never rewritten
    key = pc if pc >= 0 else -2 - getattr(ck, "_helper_pc", -1)
    ck.btf_loads.setdefault(key, set()).add((src_kind, tname, field, has_value))
    return out


def _untyped_access(ck: CheckContext, reg: S.Reg, regno: int, size: int, write: bool, sext: bool,
                    pc: int) -> S.Reg:
    """A load through rdonly_untrusted_mem: any offset, any size, read only (the kernel makes it a
    faulting BPF_PROBE_MEM load and tracks no bounds).  No such object exists here: it reads 0."""
    if write:
        raise Reject(f"R{regno} cannot write into {S.RDONLY_UNTRUSTED_MEM}",
                     "kernel memory is read-only for uprobe programs")
    pointee = kernel_btf().type(reg.map).name or "(anon)"
    ck.btf_loads.setdefault(pc, set()).add((OBJ_NONE, pointee, "", False))   # helpers refuse it: pc >= 0
    return S.Reg(S.SCALAR, Scalar.unknown().sext(size) if sext else unknown_bits(size))


def rewrites(insns: list[Instruction], loads: dict[int, set[tuple]]) -> dict[int, Instruction]:
    """Loads through pointers that are NULL here (no userspace source) -> ``dst = 0``, the
    value the kernel's faulting BPF_PROBE_MEM load gives."""
    out = {}
    for pc, seen in loads.items():
        if pc < 0:
            continue    # a helper's read
        kinds = {k for k, *_rest in seen}
        if kinds == {OBJ_NONE}:
            out[pc] = Instruction(op.BPF_ALU64 | op.BPF_MOV | op.BPF_K, insns[pc].dst, 0, 0, 0)
        elif OBJ_NONE in kinds:
            raise Reject(f"insn {pc} loads through a kernel pointer that is NULL here on one path and an "
                         "object with values on another; not supported",
                         "not supported: load each object's fields at their own instruction")
    return out


def notes(loads: dict[int, set[tuple]]) -> list[str]:
    """One line per field read directly that has no value here (it reads as 0)."""
    out = []
    for key in sorted(loads, key=lambda k: k if k >= 0 else -2 - k):
        for kind, tname, field, has_value in sorted(loads[key]):
            if has_value:
                continue
            how = "through a pointer ubpf-py has no object for" if kind == OBJ_NONE else "a field ubpf-py has no source for"
            who = f"insn {key} reads" if key >= 0 else f"the helper called at insn {-2 - key} reads"
            what = f"{tname}.{field}" if field else f"memory through a '{tname} *' field"
            out.append(f"{who} {what} directly, {how}: it reads 0 here "
                       "(the kernel's value for a faulting load); read it with bpf_probe_read_kernel to see the fault")
    return out
