"""CO-RE: apply ``.BTF.ext`` core_relo records against a target BTF.

Follows libbpf's relo_core.c semantics:

* the access string ``"0:1:2"`` is parsed against the local type: the first
  index is pointer arithmetic on the root type, then member indices of
  structs/unions (anonymous members are walked through) and array indices;
* candidates are target types of the same kind whose *essential* name (the
  name without a ``___suffix``) equals the local one; each candidate is matched
  by member *names* (searching into anonymous members), arrays by index, with
  libbpf's field compatibility rules; all matching candidates must agree;
* the instruction is patched: ALU imm, memory ``off`` (and load size when the
  field size changed), or the 64-bit immediate of a lddw.

Target BTFs are tried in order (e.g. target binary's BTF, kernel BTF, built-in
layouts); the first that has a candidate for the root type name decides.
An unresolvable relocation raises RelocationError naming the type and field
(``strict=True``, the default); with ``strict=False`` the instruction is
poisoned like libbpf does (a call to helper 0xbad2310) so that only code that
actually reaches it fails.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ubpf_py.errors import ObjectLoadError, RelocationError
from ubpf_py.isa.instruction import Instruction
from ubpf_py.isa.opcodes import BPF_ALU, BPF_ALU64, BPF_K, BPF_LDX, BPF_ST, BPF_STX, LDDW
from ubpf_py.obj import btf as B
from ubpf_py.obj import btf_ext as X
from ubpf_py.obj.btf_builder import builtin_btf
from ubpf_py.obj.spec import CoreReloc, ProgramSpec

POISON_HELPER = 0xBAD2310
_SIZE_CODES = {1: 0x10, 2: 0x08, 4: 0x00, 8: 0x18}
_FIELD_KINDS = {X.CORE_FIELD_BYTE_OFFSET, X.CORE_FIELD_BYTE_SIZE, X.CORE_FIELD_EXISTS, X.CORE_FIELD_SIGNED,
                X.CORE_FIELD_LSHIFT_U64, X.CORE_FIELD_RSHIFT_U64}
_TYPE_KINDS = {X.CORE_TYPE_ID_LOCAL, X.CORE_TYPE_ID_TARGET, X.CORE_TYPE_EXISTS, X.CORE_TYPE_SIZE,
               X.CORE_TYPE_MATCHES}
_ENUM_KINDS = {X.CORE_ENUMVAL_EXISTS, X.CORE_ENUMVAL_VALUE}


def essential_name(name: str) -> str:
    """Name without its flavour suffix: the last ``x___y`` (x, y not '_') splits (libbpf)."""
    n = len(name)
    for i in range(n - 5, -1, -1):
        s = name[i:i + 5]
        if s[0] != "_" and s[1:4] == "___" and s[4] != "_":
            return name[:i + 1]
    return name


@dataclass
class FieldSpec:
    """Where an access chain ends: bit offset from the root, field type, bitfield size."""

    bit_offset: int
    type_id: int
    bitfield: int
    #: named steps: ("m", member name) or ("a", index)
    steps: list[tuple[str, object]]
    desc: str


def _parse_local(btf: B.Btf, root: int, access: str) -> FieldSpec:
    try:
        idx = [int(x) for x in access.split(":")]
    except ValueError:
        raise RelocationError(f"CO-RE: bad access string '{access}'") from None
    tid = root
    bit = idx[0] * 8 * _sizeof_or0(btf, root)
    steps: list[tuple[str, object]] = [("a", idx[0])]
    desc = btf.type_name(root)
    bitfield = 0
    for a in idx[1:]:
        t = btf.resolved(tid)
        if t.is_composite:
            if a >= len(t.members):
                raise RelocationError(f"CO-RE: access '{access}' member #{a} beyond {btf.type_name(tid)}")
            m = t.members[a]
            bit += m.bit_offset
            bitfield = m.bitfield_size
            if m.name:
                steps.append(("m", m.name))
                desc += f".{m.name}"
            tid = m.type_id
        elif t.kind == B.KIND_ARRAY:
            bit += a * 8 * btf.size_of(t.elem_type)
            steps.append(("a", a))
            desc += f"[{a}]"
            tid = t.elem_type
            bitfield = 0
        else:
            raise RelocationError(f"CO-RE: access '{access}' steps into non-aggregate {btf.type_name(tid)}")
    return FieldSpec(bit, tid, bitfield, steps, desc)


def _sizeof_or0(btf: B.Btf, tid: int) -> int:
    try:
        return btf.size_of(tid)
    except Exception:
        return 0


def _find_member(btf: B.Btf, tid: int, name: str) -> tuple[B.Member, int] | None:
    t = btf.resolved(tid)
    for m in t.members:
        if m.name == name:
            return m, m.bit_offset
    for m in t.members:
        if not m.name and btf.resolved(m.type_id).is_composite:
            r = _find_member(btf, m.type_id, name)
            if r is not None:
                return r[0], m.bit_offset + r[1]
    return None


def _fields_compat(lb: B.Btf, lid: int, tb: B.Btf, tid: int, depth: int = 0) -> bool:
    if depth > 32:
        return False
    lt, tt = lb.resolved(lid), tb.resolved(tid)
    if lt.is_composite and tt.is_composite:
        return True
    lk, tk = lt.kind, tt.kind
    enums = (B.KIND_ENUM, B.KIND_ENUM64)
    if lk != tk and not (lk in enums and tk in enums):
        return False
    if lk in (B.KIND_PTR, B.KIND_FLOAT):
        return True
    if lk in (B.KIND_FWD, B.KIND_ENUM, B.KIND_ENUM64):
        return not lt.name or not tt.name or essential_name(lt.name) == essential_name(tt.name)
    if lk == B.KIND_INT:
        return lt.int_offset == 0 and tt.int_offset == 0
    if lk == B.KIND_ARRAY:
        return _fields_compat(lb, lt.elem_type, tb, tt.elem_type, depth + 1)
    return False


def _types_compat(lb: B.Btf, lid: int, tb: B.Btf, tid: int, depth: int = 0) -> bool:
    if depth > 32:
        return False
    lt, tt = lb.resolved(lid), tb.resolved(tid)
    enums = (B.KIND_ENUM, B.KIND_ENUM64)
    if lt.kind != tt.kind and not (lt.kind in enums and tt.kind in enums):
        return False
    k = lt.kind
    if k == B.KIND_INT:
        return lt.int_offset == 0 and tt.int_offset == 0
    if k == B.KIND_PTR:
        return _types_compat(lb, lt.type_id, tb, tt.type_id, depth + 1)
    if k == B.KIND_ARRAY:
        return _types_compat(lb, lt.elem_type, tb, tt.elem_type, depth + 1)
    if k == B.KIND_FUNC_PROTO:
        if len(lt.params) != len(tt.params):
            return False
        return all(_types_compat(lb, a.type_id, tb, b.type_id, depth + 1) for a, b in zip(lt.params, tt.params, strict=True)) \
            and _types_compat(lb, lt.type_id, tb, tt.type_id, depth + 1)
    return True


def _types_match(lb: B.Btf, lid: int, tb: B.Btf, tid: int, depth: int = 0) -> bool:
    """bpf_core_type_matches: a stricter structural match (names of members/enumerators, int sizes)."""
    if depth > 32:
        return False
    lt, tt = lb.type(lb.skip_modifiers(lid)), tb.type(tb.skip_modifiers(tid))
    if lt.kind == B.KIND_TYPEDEF or tt.kind == B.KIND_TYPEDEF:
        lt, tt = lb.resolved(lid), tb.resolved(tid)
    if lt.name and tt.name and essential_name(lt.name) != essential_name(tt.name):
        return False
    enums = (B.KIND_ENUM, B.KIND_ENUM64)
    if lt.kind != tt.kind and not (lt.kind in enums and tt.kind in enums):
        return False
    k = lt.kind
    if k == B.KIND_INT:
        return lt.size == tt.size and (lt.encoding & B.INT_SIGNED) == (tt.encoding & B.INT_SIGNED)
    if k in enums:
        names = {e.name for e in tt.enums}
        return lt.size == tt.size and all(e.name in names for e in lt.enums)
    if k in (B.KIND_STRUCT, B.KIND_UNION):
        for m in lt.members:
            r = _find_member(tb, tt.id, m.name) if m.name else None
            if r is None or not _types_match(lb, m.type_id, tb, r[0].type_id, depth + 1):
                return False
        return True
    if k == B.KIND_PTR:
        return _types_match(lb, lt.type_id, tb, tt.type_id, depth + 1)
    if k == B.KIND_ARRAY:
        return lt.nelems == tt.nelems and _types_match(lb, lt.elem_type, tb, tt.elem_type, depth + 1)
    if k == B.KIND_FUNC_PROTO:
        return len(lt.params) == len(tt.params) and all(
            _types_match(lb, a.type_id, tb, b.type_id, depth + 1) for a, b in zip(lt.params, tt.params, strict=True))
    return True


def _match_target(lb: B.Btf, local: FieldSpec, tb: B.Btf, cand: int) -> FieldSpec | None:
    tid = cand
    bit = int(local.steps[0][1]) * 8 * _sizeof_or0(tb, cand)
    bitfield = 0
    for kind, what in local.steps[1:]:
        t = tb.resolved(tid)
        if kind == "m":
            if not t.is_composite:
                return None
            r = _find_member(tb, tid, str(what))
            if r is None:
                return None
            m, off = r
            bit += off
            bitfield = m.bitfield_size
            tid = m.type_id
        else:
            if t.kind != B.KIND_ARRAY:
                return None
            idx = int(what)  # type: ignore[arg-type]
            if t.nelems and idx >= t.nelems:
                return None
            bit += idx * 8 * tb.size_of(t.elem_type)
            tid = t.elem_type
            bitfield = 0
    if not _fields_compat(lb, local.type_id, tb, tid):
        return None
    return FieldSpec(bit, tid, bitfield, local.steps, local.desc)


def _field_value(btf: B.Btf, spec: FieldSpec, kind: int) -> tuple[int, int]:
    """(value, field byte size) of a field relocation kind."""
    t = btf.resolved(spec.type_id)
    if spec.bitfield:
        bit_sz = spec.bitfield
        byte_sz = t.size
        byte_off = spec.bit_offset // 8 // byte_sz * byte_sz
        while spec.bit_offset + bit_sz - byte_off * 8 > byte_sz * 8:
            if byte_sz >= 8:
                raise RelocationError(f"CO-RE: bitfield {spec.desc} does not fit in 8 bytes")
            byte_sz *= 2
            byte_off = spec.bit_offset // 8 // byte_sz * byte_sz
    else:
        byte_sz = btf.size_of(spec.type_id)
        byte_off = spec.bit_offset // 8
        bit_sz = byte_sz * 8
    if kind == X.CORE_FIELD_BYTE_OFFSET:
        return byte_off, byte_sz
    if kind == X.CORE_FIELD_BYTE_SIZE:
        return byte_sz, byte_sz
    if kind == X.CORE_FIELD_EXISTS:
        return 1, byte_sz
    if kind == X.CORE_FIELD_SIGNED:
        return int(t.is_signed), byte_sz
    if kind == X.CORE_FIELD_LSHIFT_U64:
        return 64 - (spec.bit_offset + bit_sz - byte_off * 8), byte_sz
    if kind == X.CORE_FIELD_RSHIFT_U64:
        return 64 - bit_sz, byte_sz
    raise RelocationError(f"CO-RE: unknown field relocation kind {kind}")


@dataclass
class _Result:
    local: int
    target: int | None  # None = unresolvable (poison)
    local_size: int = 0
    target_size: int = 0
    why: str = ""
    #: clang computes bitfield offsets from the record's storage unit, libbpf (and we) from the
    #: field's own type, so bitfield values are not checked against the instruction (like libbpf)
    validate: bool = True


def _compute(lb: B.Btf, targets: Sequence[B.Btf], rel: CoreReloc) -> _Result:
    kind = rel.kind
    root = lb.type(rel.type_id)
    if kind == X.CORE_TYPE_ID_LOCAL:
        return _Result(rel.type_id, rel.type_id)
    if not root.name:
        raise RelocationError(f"CO-RE: relocation on anonymous type {lb.type_name(rel.type_id)} is not supported")
    ess = essential_name(root.name)
    cands: list[tuple[B.Btf, int]] = []
    enums = (B.KIND_ENUM, B.KIND_ENUM64)
    for tb in targets:
        for tid in _essential(tb, ess):
            tk = tb.kind_of(tid)
            if tk == root.kind or (tk in enums and root.kind in enums):
                cands.append((tb, tid))
        if cands:
            break
    kname = X.CORE_KIND_NAMES.get(kind, str(kind))
    if kind in _FIELD_KINDS:
        local = _parse_local(lb, rel.type_id, rel.access)
        lval, lsz = _field_value(lb, local, kind)
        check = not local.bitfield
        found: list[tuple[int, int]] = []
        for tb, cid in cands:
            spec = _match_target(lb, local, tb, cid)
            if spec is not None:
                found.append(_field_value(tb, spec, kind))
        if not found:
            if kind == X.CORE_FIELD_EXISTS:
                return _Result(lval, 0, lsz, lsz, validate=check)
            return _Result(lval, None, lsz, 0, f"field {local.desc} ({kname}) not found in target BTF "
                                                f"({_where(targets)})")
        if len({v for v, _ in found}) > 1:
            raise RelocationError(f"CO-RE: ambiguous relocation for {local.desc} ({kname}): candidates give "
                                  f"{sorted({v for v, _ in found})}")
        return _Result(lval, found[0][0], lsz, found[0][1], validate=check)
    if kind in _TYPE_KINDS:
        lsize = _sizeof_or0(lb, rel.type_id)
        local_val = {X.CORE_TYPE_ID_TARGET: rel.type_id, X.CORE_TYPE_EXISTS: 1, X.CORE_TYPE_SIZE: lsize,
                     X.CORE_TYPE_MATCHES: 1}[kind]
        comp = _types_match if kind == X.CORE_TYPE_MATCHES else _types_compat
        vals = []
        for tb, cid in cands:
            if comp(lb, rel.type_id, tb, cid):
                vals.append({X.CORE_TYPE_ID_TARGET: cid, X.CORE_TYPE_EXISTS: 1,
                             X.CORE_TYPE_SIZE: _sizeof_or0(tb, cid), X.CORE_TYPE_MATCHES: 1}[kind])
        if not vals:
            if kind in (X.CORE_TYPE_EXISTS, X.CORE_TYPE_MATCHES):
                return _Result(local_val, 0)
            return _Result(local_val, None, why=f"type {lb.type_name(rel.type_id)} ({kname}) not found in "
                                                 f"target BTF ({_where(targets)})")
        if kind == X.CORE_TYPE_SIZE and len(set(vals)) > 1:
            raise RelocationError(f"CO-RE: ambiguous size for {lb.type_name(rel.type_id)}: {sorted(set(vals))}")
        return _Result(local_val, vals[0])
    if kind in _ENUM_KINDS:
        try:
            idx = int(rel.access.split(":")[0])
            enumerator = root.enums[idx]
        except (ValueError, IndexError):
            raise RelocationError(f"CO-RE: bad enumerator access '{rel.access}' for {lb.type_name(rel.type_id)}") \
                from None
        local_val = 1 if kind == X.CORE_ENUMVAL_EXISTS else enumerator.value
        vals = []
        for tb, cid in cands:
            t = tb.type(cid)
            for e in t.enums:
                if essential_name(e.name) == essential_name(enumerator.name):
                    vals.append(1 if kind == X.CORE_ENUMVAL_EXISTS else e.value)
        if not vals:
            if kind == X.CORE_ENUMVAL_EXISTS:
                return _Result(local_val, 0)
            return _Result(local_val, None, why=f"enumerator {enumerator.name} of {lb.type_name(rel.type_id)} not "
                                                 f"found in target BTF ({_where(targets)})")
        if len(set(vals)) > 1:
            raise RelocationError(f"CO-RE: ambiguous value for enumerator {enumerator.name}: {sorted(set(vals))}")
        return _Result(local_val, vals[0])
    raise RelocationError(f"CO-RE: unknown relocation kind {kind}")


def _essential(tb: B.Btf, ess: str) -> list[int]:
    """Target type ids whose essential name is ``ess`` (exact name or ``ess___*``)."""
    out = list(tb.find_all(ess))
    prefix = ess + "__"
    cache = getattr(tb, "_ubpf_flavours", None)
    if cache is None:
        cache = {}
        for n in tb.names():
            if "___" in n:
                e = essential_name(n)
                if e != n:
                    cache.setdefault(e, []).append(n)
        tb._ubpf_flavours = cache  # type: ignore[attr-defined]
    for n in cache.get(ess, ()):
        if n.startswith(prefix) and essential_name(n) == ess:
            out.extend(tb.find_all(n))
    return out


def _where(targets: Sequence[B.Btf]) -> str:
    return ", ".join(t.source for t in targets) or "no target BTF"


def _patch(insns: list[Instruction], idx: int, res: _Result, rel: CoreReloc, desc: str) -> None:
    ins = insns[idx]
    cls = ins.opcode & 0x07
    new = res.target
    assert new is not None
    if ins.opcode == LDDW:
        insns[idx] = ins.replace(imm=_s32(new & 0xFFFFFFFF), imm_hi=_s32((new >> 32) & 0xFFFFFFFF))
        if idx + 1 < len(insns):
            insns[idx + 1] = insns[idx + 1].replace(imm=_s32((new >> 32) & 0xFFFFFFFF))
        return
    if cls in (BPF_ALU, BPF_ALU64):
        if ins.opcode & 0x08 != BPF_K:
            raise RelocationError(f"CO-RE: instruction {idx} ({desc}) is an ALU op with a register source")
        if res.validate and ins.imm != _s32(res.local):
            raise RelocationError(f"CO-RE: instruction {idx} ({desc}) has imm {ins.imm}, expected {res.local}")
        if not -(1 << 31) <= new < (1 << 31):
            raise RelocationError(f"CO-RE: value {new} for {desc} does not fit in 32 bits")
        insns[idx] = ins.replace(imm=new)
        return
    if cls in (BPF_LDX, BPF_ST, BPF_STX):
        if rel.kind != X.CORE_FIELD_BYTE_OFFSET:
            raise RelocationError(f"CO-RE: memory instruction {idx} with a non-offset relocation ({desc})")
        if res.validate and ins.off != res.local:
            raise RelocationError(f"CO-RE: instruction {idx} ({desc}) has offset {ins.off}, expected {res.local}")
        if not -(1 << 15) <= new < (1 << 15):
            raise RelocationError(f"CO-RE: offset {new} for {desc} does not fit in 16 bits")
        op = ins.opcode
        if res.target_size and res.local_size and res.target_size != res.local_size and cls != BPF_ST:
            if res.target_size not in _SIZE_CODES:
                raise RelocationError(f"CO-RE: field {desc} has size {res.target_size} in the target")
            if (op & 0xE0) != 0x60:  # only plain BPF_MEM loads/stores can be resized
                raise RelocationError(f"CO-RE: cannot resize atomic/sign-extending access to {desc}")
            op = (op & ~0x18) | _SIZE_CODES[res.target_size]
        insns[idx] = ins.replace(opcode=op, off=new)
        return
    raise RelocationError(f"CO-RE: instruction {idx} (opcode {ins.opcode:#04x}) cannot take a relocation ({desc})")


def _s32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v & 0x80000000 else v


def apply_core_relocs(prog: ProgramSpec, local_btf: B.Btf | None,
                      target_btf: B.Btf | Sequence[B.Btf] | None = None, strict: bool = True,
                      poisoned: dict[int, str] | None = None) -> list[Instruction]:
    """The program's instructions with every CO-RE relocation applied (the spec is not changed).

    ``target_btf``: one BTF or several tried in order; None = ``default_targets()``.
    ``poisoned`` (with ``strict=False``) receives instruction index -> the failed relocation.
    """
    insns = list(prog.instructions)
    if not prog.core_relocs:
        return insns
    if local_btf is None:
        raise RelocationError(f"program '{prog.name}' has CO-RE relocations but the object has no BTF")
    if target_btf is None:
        targets: Sequence[B.Btf] = default_targets()
    elif isinstance(target_btf, B.Btf):
        targets = [target_btf]
    else:
        targets = list(target_btf)
    for rel in prog.core_relocs:
        if not 0 <= rel.insn_index < len(insns):
            raise RelocationError(f"program '{prog.name}': CO-RE relocation at instruction {rel.insn_index} "
                                  "is outside the program")
        desc = f"{local_btf.type_name(rel.type_id)} access '{rel.access}' " \
               f"({X.CORE_KIND_NAMES.get(rel.kind, rel.kind)})"
        res = _compute(local_btf, targets, rel)
        if res.target is None:
            if strict:
                raise RelocationError(f"program '{prog.name}' instruction {rel.insn_index}: failed to resolve "
                                      f"CO-RE relocation {desc}: {res.why}; build the target with -g "
                                      "(DWARF) or BTF so its types can be found")
            insns[rel.insn_index] = Instruction(0x85, 0, 0, 0, POISON_HELPER)
            if poisoned is not None:
                poisoned[rel.insn_index] = f"failed to resolve CO-RE relocation {desc}: {res.why}"
            continue
        _patch(insns, rel.insn_index, res, rel, desc)
    return insns


def load_binary_btf(path: str | Path) -> B.Btf | None:
    """The ``.BTF`` section of a target binary (user-space structs), None when it has none."""
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    try:
        with open(path, "rb") as fh:
            sec = ELFFile(fh).get_section_by_name(".BTF")
            if sec is None:
                return None
            return B.Btf(sec.data(), source=f"{path} .BTF")
    except (OSError, ELFError) as e:
        raise ObjectLoadError(f"cannot read BTF of {path}: {e}") from None


def default_targets(binary: str | Path | None = None) -> list[B.Btf]:
    """Target BTFs in lookup order: the binary's own .BTF, the kernel's, the built-in layouts."""
    out: list[B.Btf] = []
    if binary is not None:
        bb = load_binary_btf(binary)
        if bb is not None:
            out.append(bb)
    kb = B.load_kernel_btf()
    if kb is not None:
        out.append(kb)
    out.append(_builtin())
    return out


_BUILTIN: B.Btf | None = None


def _builtin() -> B.Btf:
    global _BUILTIN
    if _BUILTIN is None:
        _BUILTIN = builtin_btf()
    return _BUILTIN
