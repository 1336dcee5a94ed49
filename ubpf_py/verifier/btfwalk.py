"""The kernel's walk of a struct's BTF for a load through a typed kernel pointer.

``btf_struct_access`` (kernel/bpf/btf.c) decides what a load of ``size`` bytes at
``off`` in a kernel struct reads: a scalar member (or part of an int array), a
pointer member (the loaded register becomes a pointer to the pointee struct), or
nothing (refused).  Two checks of ubpf-py use it on the running kernel's BTF: reads
of ``struct bpf_map`` fields through a map pointer (``mapfields``) and loads through
``PTR_TO_BTF_ID`` registers such as ``bpf_get_current_task_btf()``'s (``btfptr``).
The refusals use the kernel's words, so logs and verdicts line up with it.

The walk mirrors the kernel's: nested structs and unions are entered (walking a union
of several members makes loaded pointers untrusted), arrays are linearised and the
accessed element chosen, a pointer member must be read whole, a scalar access may run
on inside an int array ("scratch space"), bitfields are read whole, and a trailing
flexible array of ints or structs may be read past the struct's size.  What it returns
also names the members it went through, which the callers need to tell fields apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ubpf_py.obj.btf import KIND_ARRAY, KIND_INT, KIND_PTR, KIND_STRUCT, KIND_TYPE_TAG, KIND_UNION, Btf
from ubpf_py.verifier.memory import Reject

#: type-tag flags of a pointer member and of the walk (the kernel's bpf_type_flag bits we need)
MEM_USER = 1
MEM_PERCPU = 2
MEM_RCU = 4
PTR_UNTRUSTED = 8
_TAG_FLAGS = {"user": MEM_USER, "percpu": MEM_PERCPU, "rcu": MEM_RCU}


@dataclass(slots=True)
class Walk:
    """What a load reads.  ``path``: (struct name, member name) of every member entered,
    outermost first; the last entry is the member read."""

    pointer: bool
    #: pointee struct's type id (pointer results)
    next_id: int = 0
    flags: int = 0
    path: list[tuple[str, str]] = field(default_factory=list)
    #: offset of the access inside the member read, and that member's size (its element's
    #: for an array) and whether it is an array
    inner_off: int = 0
    msize: int = 0
    is_array: bool = False
    #: a pointer member to no struct (``int *``, ``void *``: ``next_id`` is the pointee, 0 for
    #: void): Linux 6.17+ loads it as PTR_TO_MEM | MEM_RDONLY | PTR_UNTRUSTED (WALK_PTR_UNTRUSTED)
    untyped: bool = False

    @property
    def field_name(self) -> str:
        return self.path[-1][1] if self.path else ""


def _resolve_size(btf: Btf, tid: int) -> tuple[int, int, int, int, bool]:
    """__btf_resolve_size: (total size, element type id, element size, element count, is array),
    typedefs and modifiers skipped, multi-dimensional arrays linearised."""
    nelems = 1
    is_array = False
    for _ in range(64):
        tid = btf.resolve(tid)
        t = btf.type(tid)
        if t.kind == KIND_ARRAY:
            is_array = True
            nelems *= t.nelems
            tid = t.elem_type
            continue
        size = btf.size_of(tid)
        return nelems * size, tid, size, nelems, is_array
    raise Reject("field type nesting too deep")


def struct_access(btf: Btf, tid: int, off: int, size: int) -> Walk:
    """btf_struct_access for a kernel (not program-allocated) object: what ``size`` bytes at
    ``off`` in struct ``tid`` are, or Reject with the kernel's message.  (The kernel's
    WALK_STRUCT restart at a nested struct's start and its ``goto again`` at an inner
    offset are the same step here.)"""
    flags = 0
    path: list[tuple[str, str]] = []
    for _ in range(256):
        tid = btf.resolve(tid)
        t = btf.type(tid)
        tname = t.name or "(anon)"   # how the kernel prints a nameless type or member
        if t.kind not in (KIND_STRUCT, KIND_UNION):
            raise Reject(f"Type '{tname}' is not a struct")
        if t.kind == KIND_UNION and t.vlen != 1:
            flags |= PTR_UNTRUSTED   # walking unions yields untrusted pointers
        if off + size > t.size:
            tid2, off2 = _flex_tail(btf, t, off, size)
            if tid2 is None:
                raise Reject(f"access beyond struct {tname} at off {off} size {size}")
            path.append((t.name, t.members[-1].name))
            if tid2 == -1:
                return Walk(False, flags=flags, path=path)
            tid, off = tid2, off2
            continue
        nested = None
        for mem in t.members:
            moff = mem.bit_offset // 8
            if off + size <= moff:
                break
            if mem.bitfield_size:
                end_bit = mem.bit_offset + mem.bitfield_size
                if off <= moff and (end_bit + 7) // 8 <= off + size:
                    path.append((t.name, mem.name))
                    return Walk(False, flags=flags, path=path)
                continue
            if off < moff:
                break
            total, elem_id, esize, _n, is_array = _resolve_size(btf, mem.type_id)
            true_end = moff + total
            if off >= true_end:
                continue
            mtype = btf.type(elem_id)
            msize = total
            if is_array:
                if moff == true_end:
                    continue    # an empty array
                msize = esize
                moff += (off - moff) // msize * msize
            path.append((t.name, mem.name))
            mname = mem.name or "(anon)"
            if mtype.kind in (KIND_STRUCT, KIND_UNION):
                nested = (elem_id, off - moff)
                break
            if mtype.kind == KIND_PTR:
                if msize != size or off != moff:
                    raise Reject(f"cannot access ptr member {mname} with moff {moff} in struct {tname} "
                                 f"with off {off} size {size}")
                tag = btf.type(mtype.type_id)
                tmp = _TAG_FLAGS.get(tag.name, 0) if tag.kind == KIND_TYPE_TAG else 0
                target = btf.resolve(mtype.type_id)
                if btf.type(target).kind in (KIND_STRUCT, KIND_UNION):
                    return Walk(True, target, flags | tmp, path, 0, msize, is_array)
                return Walk(True, target, flags, path, 0, msize, is_array, untyped=True)
            if off + size > true_end and not flags & PTR_UNTRUSTED:
                raise Reject(f"access beyond the end of member {mname} (mend:{true_end}) in struct {tname} "
                             f"with off {off} size {size}")
            return Walk(False, flags=flags, path=path, inner_off=off - moff, msize=msize, is_array=is_array)
        if nested is None:
            raise Reject(f"struct {tname} doesn't have field at offset {off}")
        tid, off = nested
    raise Reject("struct nesting too deep")


def _flex_tail(btf: Btf, t, off: int, size: int) -> tuple[int | None, int]:
    """A read past the struct's size may land in a trailing flexible array:
    (-1, 0) for an int element (a scalar), (struct id, offset in the element), or (None, 0)."""
    if not t.members:
        return None, 0
    last = t.members[-1]
    at = btf.type(btf.skip_modifiers(last.type_id))
    if at.kind != KIND_ARRAY or at.nelems != 0:
        return None, 0
    moff = last.bit_offset // 8
    if off < moff:
        return None, 0
    elem = btf.resolve(at.elem_type)
    et = btf.type(elem)
    if et.kind == KIND_INT:
        return -1, 0
    if et.kind not in (KIND_STRUCT, KIND_UNION) or not et.size:
        return None, 0
    return elem, (off - moff) % et.size
