"""Global (non-static) BPF functions: verified alone, against their BTF signature.

The kernel never verifies a global function with its caller's values: it turns
the function's BTF prototype (and its ``arg:`` decl tags, libbpf's ``__arg_ctx``,
``__arg_nonnull`` ...) into argument types, checks every call site against them
("Caller passes invalid args into func#N"), and verifies the body once assuming
only those types (btf_prepare_func_args, btf_check_func_arg_match).  A pointer
argument to sized memory may be NULL unless tagged ``__arg_nonnull``, so the body
has to check it.  Signatures the kernel cannot use make the call fail the same way.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from ubpf_py.obj.spec import ProgramSpec
from ubpf_py.verifier import state as S
from ubpf_py.verifier.calls import mem_access
from ubpf_py.verifier.context import CheckContext
from ubpf_py.verifier.memory import Reject
from ubpf_py.verifier.scalar import Scalar
from ubpf_py.verifier.state import Reg

#: the context types of a kprobe (= uprobe) program (btf_is_prog_ctx_type)
CTX_TYPES = ("pt_regs", "bpf_user_pt_regs_t", "user_pt_regs")
_TAGS = ("ctx", "trusted", "nonnull", "nullable", "arena")


@dataclass
class Arg:
    #: "scalar", "ctx" or "mem"
    kind: str
    size: int = 0
    nullable: bool = True


@dataclass
class GlobalFunc:
    start: int
    name: str
    args: list[Arg] = field(default_factory=list)
    #: why the kernel cannot use the signature (the call then fails), else ""
    error: str = ""


def _kind(btf: object, tid: int) -> str:
    return btf.resolved(tid).kind_name  # type: ignore[attr-defined]


def _tags(btf: object, func_id: int) -> dict[int, list[str]]:
    """``arg:`` decl tags of a FUNC, by argument index."""
    out: dict[int, list[str]] = {}
    try:
        types = list(btf)  # type: ignore[call-overload]
    except TypeError:
        return out
    for t in types:
        if getattr(t, "kind_name", "") == "decl_tag" and t.type_id == func_id and t.component_idx >= 0 \
                and t.name.startswith("arg:"):
            out.setdefault(t.component_idx, []).append(t.name[4:])
    return out


def _prepare(btf: object, start: int, tid: int) -> GlobalFunc | None:
    fn = btf.type(tid)  # type: ignore[attr-defined]
    if fn.linkage != 1:
        return None
    g = GlobalFunc(start, fn.name)
    proto = btf.type(fn.type_id)  # type: ignore[attr-defined]
    if len(proto.params) > 5:
        g.error = f"Global function {fn.name}() with {len(proto.params)} > 5 args. Buggy compiler."
        return g
    if proto.type_id == 0 or _kind(btf, proto.type_id) not in ("int", "enum", "enum64"):
        g.error = f"Global function {fn.name}() doesn't return scalar. Only those are supported."
        return g
    tags = _tags(btf, tid)
    for i, p in enumerate(proto.params):
        names = tags.get(i, [])
        bad = [n for n in names if n not in _TAGS]
        if bad:
            g.error = f"arg#{i} has unsupported set of tags"
            return g
        t = btf.resolved(p.type_id)  # type: ignore[attr-defined]
        kname = t.kind_name
        if kname == "ptr":
            pointee = btf.resolved(t.type_id) if t.type_id else None  # type: ignore[attr-defined]
            if "ctx" in names or (pointee is not None and pointee.name in CTX_TYPES):
                if set(names) - {"ctx"}:
                    g.error = f"arg#{i} has invalid combination of tags"
                    return g
                g.args.append(Arg("ctx"))
                continue
            if "trusted" in names or "arena" in names:
                g.error = f"arg#{i}: kernel object (__arg_trusted) and arena arguments are not supported by ubpf-py"
                return g
            if "nullable" in names:
                g.error = f"arg#{i} has invalid combination of tags"
                return g
            try:
                size = btf.size_of(t.type_id) if t.type_id else -1  # type: ignore[attr-defined]
            except Exception:
                size = -1
            if size < 0:
                g.error = (f"arg#{i} reference type('{_kind(btf, t.type_id) if t.type_id else 'UNKNOWN'} "
                           f"{pointee.name if pointee is not None else ''}') size cannot be determined: -22")
                return g
            g.args.append(Arg("mem", size, nullable="nonnull" not in names))
            continue
        if names:
            g.error = f"arg#{i} has pointer tag, but is not a pointer type"
            return g
        if kname in ("int", "enum", "enum64"):
            g.args.append(Arg("scalar"))
            continue
        g.error = f"Arg#{i} type {kname.upper()} in {fn.name}() is not supported yet."
        return g
    return g


@functools.lru_cache(maxsize=64)
def hidden_functions(path: str | None) -> frozenset[str]:
    """Global functions with hidden visibility (``__hidden``, e.g. usdt.bpf.h's helpers).

    libbpf marks their BTF static before loading (``mark_btf_static``), so the kernel
    verifies them inline with their caller's values; so do we.
    """
    if not path:
        return frozenset()
    try:
        from ubpf_py.obj.elffile import read_elf

        raw = read_elf(path)
    except Exception:
        return frozenset()
    return frozenset(s.name for s in raw.symbols if s.type == STT_FUNC and s.visibility in (1, 2)
                     and s.bind != 0)


STT_FUNC = 2


def global_functions(prog: ProgramSpec, btf: object | None,
                     hidden: frozenset[str] = frozenset()) -> dict[int, GlobalFunc]:
    """Global functions of ``prog`` (not its entry) by start instruction, from BTF func_info.
    Functions named in ``hidden`` are treated as static (see ``hidden_functions``)."""
    out: dict[int, GlobalFunc] = {}
    if btf is None:
        return out
    for start, tid in prog.func_info.items():
        if start == 0 or prog.functions.get(start) in hidden:
            continue
        try:
            g = _prepare(btf, start, tid)
        except Exception:  # a malformed type: the kernel would refuse the BTF; verify inline
            continue
        if g is not None:
            out[start] = g
    return out


def check_call(ck: CheckContext, st: S.VerifierState, target: int) -> None:
    """The call site: every argument register must fit the signature (else the kernel's
    "Caller passes invalid args into func#N ('name')")."""
    g = ck.global_funcs[target]
    subno = ck.cfg.subprogs.index(target)
    caller = f"Caller passes invalid args into func#{subno} ('{g.name}')"
    if g.error:
        raise Reject(g.error, "the kernel cannot verify a global function with this signature", [caller])
    regs = st.cur.regs
    for i, a in enumerate(g.args):
        regno = i + 1
        r = regs[regno]
        if a.kind == "scalar":
            if r.type != S.SCALAR:
                raise Reject(f"R{regno} is not a scalar", "this argument of the global function is an integer",
                             [caller])
        elif a.kind == "ctx":
            if r.type == S.CTX and r.off:
                raise Reject(f"dereference of modified ctx ptr R{regno} off={r.off} disallowed",
                             "pass the unmodified context pointer", [caller])
            if r.type != S.CTX:
                raise Reject(f"arg#{i} expects pointer to ctx", "pass the program's context pointer", [caller])
        else:
            if r.type == S.SCALAR and r.val.is_const() and r.val.value == 0:
                continue  # NULL is always accepted here (check_mem_reg)
            probe = Reg(S.OR_NULL[r.type], r.val, r.off, r.map, r.size, 0, r.ref, r.frame, r.subprog) \
                if r.type in S.OR_NULL else r
            try:
                regs[regno] = probe
                mem_access(ck, st, regno, probe, a.size, write=False)
                mem_access(ck, st, regno, probe, a.size, write=True)
            except Reject as e:
                raise Reject(e.msg, f"the global function takes {a.size} bytes of memory here",
                             [*e.extra, caller]) from None
            finally:
                regs[regno] = r
            if not a.nullable and r.type in S.OR_NULL:
                raise Reject(f"arg#{i} is expected to be non-NULL", "check the pointer against NULL first",
                             [caller])


def entry_regs(ck: CheckContext, frame: S.Frame, g: GlobalFunc) -> None:
    """What the body may assume: only the declared argument types."""
    for i, a in enumerate(g.args):
        if a.kind == "ctx":
            frame.regs[i + 1] = Reg(S.CTX, Scalar.const(0))
        elif a.kind == "mem":
            t = S.MEM_OR_NULL if a.nullable else S.MEM
            frame.regs[i + 1] = Reg(t, Scalar.const(0), size=a.size, id=ck.new_id() if a.nullable else 0)
        else:
            frame.regs[i + 1] = S.UNKNOWN_SCALAR
