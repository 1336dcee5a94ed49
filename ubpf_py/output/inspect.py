"""``ubpf-run dump OBJECT``: what is inside an object, like ``bpftool prog dump xlated``,
``bpftool map show`` and ``bpftool btf dump`` together -- without loading anything.

:func:`describe` builds one JSON-able dict (``-j`` prints it); :func:`render`
turns it into text.  Programs are disassembled in LLVM syntax (``isa.disasm``)
with the C source line that ``.BTF.ext`` line info attaches to an instruction
printed above it, as bpftool does (``; source``).
"""

from __future__ import annotations

from typing import Any

from ubpf_py.isa import opcodes as op
from ubpf_py.isa.disasm import format_instruction
from ubpf_py.obj.btf import KIND_NAMES
from ubpf_py.obj.spec import ObjectSpec
from ubpf_py.output.values import ValueDecoder

_LINKAGE = {0: "static", 1: "global", 2: "extern"}


def describe(spec: ObjectSpec) -> dict[str, Any]:
    """Programs, maps, globals and BTF types of ``spec`` as plain data."""
    return {"file": spec.path, "license": spec.license,
            "programs": [_program(spec, p) for p in spec.programs.values()],
            "maps": [_map(spec, m) for m in spec.maps],
            "globals": _globals(spec),
            "btf": _btf_types(spec.btf),
            "skipped_sections": [{"section": s, "reason": r} for s, r in spec.skipped]}


def _program(spec: ObjectSpec, p: Any) -> dict[str, Any]:
    lines = {li.insn_index: li for li in p.line_info}
    insns = []
    i = 0
    while i < len(p.instructions):
        ins = p.instructions[i]
        row: dict[str, Any] = {"pc": i, "text": _text(spec, ins, i)}
        if i in p.functions:
            row["function"] = p.functions[i]
        li = lines.get(i)
        if li is not None and li.source:
            row["source"] = {"file": li.file, "line": li.line, "col": li.col, "text": li.source.strip()}
        insns.append(row)
        i += 2 if ins.opcode == op.LDDW else 1
    attach = None
    if p.attach is not None:
        a = p.attach
        attach = {k: v for k, v in vars(a).items() if v not in (None, "", 0)} if hasattr(a, "__dict__") else str(a)
    return {"name": p.name, "section": p.section, "kind": p.kind, "license": p.license or spec.license,
            "autoload": p.autoload, "attach": attach, "insn_count": len(p.instructions), "insns": insns}


def _text(spec: ObjectSpec, ins: Any, i: int) -> str:
    """LLVM syntax; a map reference names its map (``r1 = map[counts] ll``, ``map[.bss]+8``)."""
    if ins.opcode == op.LDDW and ins.src in (op.BPF_PSEUDO_MAP_IDX, op.BPF_PSEUDO_MAP_IDX_VALUE) \
            and 0 <= ins.imm < len(spec.maps):
        name = spec.maps[ins.imm].name
        if ins.src == op.BPF_PSEUDO_MAP_IDX:
            return f"r{ins.dst} = map[{name}] ll"
        return f"r{ins.dst} = map[{name}]+{ins.imm_hi} ll"
    return format_instruction(ins, i)


def _type_name(spec: ObjectSpec, tid: int) -> str | None:
    if not tid or spec.btf is None:
        return None
    return spec.btf.type_name(tid)


def _map(spec: ObjectSpec, m: Any) -> dict[str, Any]:
    return {"name": m.name, "type": m.type_name, "key_size": m.key_size, "value_size": m.value_size,
            "max_entries": m.max_entries, "flags": m.flags, "key_type": _type_name(spec, m.key_type_id),
            "value_type": _type_name(spec, m.value_type_id), "section": m.section or ".maps",
            "internal": m.internal, "readonly": m.readonly,
            **({"pinning": m.pinning} if m.pinning else {}), **({"map_extra": m.map_extra} if m.map_extra else {})}


def _globals(spec: ObjectSpec) -> list[dict[str, Any]]:
    from ubpf_py.obj.globals import get_global

    decoder = ValueDecoder(spec.btf)
    out = []
    for name, g in spec.globals.items():
        try:
            data = get_global(spec, name)
        except Exception:  # a variable outside its section: show it without a value
            data = b""
        out.append({"name": name, "section": g.map_name, "offset": g.offset, "size": g.size,
                    "type": _type_name(spec, g.type_id), "linkage": g.linkage,
                    "initial": decoder.value(g.type_id, data) if data else None})
    return out


def _btf_types(btf: Any) -> list[dict[str, Any]]:
    if btf is None:
        return []
    out = []
    for tid in range(1, btf.last_id + 1):
        t = btf.type(tid)
        row: dict[str, Any] = {"id": tid, "kind": KIND_NAMES.get(t.kind, f"kind#{t.kind}").upper(), "name": t.name}
        kind = row["kind"]
        if kind in ("INT", "STRUCT", "UNION", "ENUM", "ENUM64", "DATASEC", "FLOAT"):
            row["size"] = t.size
        if kind == "INT":
            row.update(bits=t.bits, offset=t.int_offset, encoding=t.encoding)
        elif kind == "ARRAY":
            row.update(type_id=t.elem_type, index_type_id=t.index_type, nr_elems=t.nelems)
        elif kind in ("STRUCT", "UNION"):
            row["members"] = [{"name": m.name, "type_id": m.type_id, "bits_offset": m.bit_offset,
                               **({"bitfield_size": m.bitfield_size} if m.bitfield_size else {})}
                              for m in t.members]
        elif kind in ("ENUM", "ENUM64"):
            row["values"] = [{"name": e.name, "val": e.value} for e in t.enums]
        elif kind == "FUNC_PROTO":
            row.update(ret_type_id=t.type_id, params=[{"name": p.name, "type_id": p.type_id} for p in t.params])
        elif kind == "DATASEC":
            row["vars"] = [{"type_id": v.type_id, "offset": v.offset, "size": v.size} for v in t.secinfos]
        elif kind in ("VAR", "FUNC"):
            row.update(type_id=t.type_id, linkage=_LINKAGE.get(t.linkage, str(t.linkage)))
        elif kind not in ("FWD",):
            row["type_id"] = t.type_id
        out.append(row)
    return out


def render(desc: dict[str, Any], *, btf: bool = True) -> list[str]:
    """Text for people: one block per program (disassembly with source), maps, globals, BTF."""
    out = [f"{desc['file']}: license {desc['license'] or '(none)'}"]
    for p in desc["programs"]:
        out.append("")
        out.append(f"program {p['name']}: {p['kind']}  section {p['section']}  {p['insn_count']} insns"
                   + ("" if p["autoload"] else "  (not autoloaded)"))
        last_src = None
        for row in p["insns"]:
            if "function" in row:
                out.append(f"{row['function']}:")
            src = row.get("source")
            if src and (src["file"], src["line"]) != last_src:
                out.append(f"; {src['text']}  [{src['file'].rsplit('/', 1)[-1]}:{src['line']}]")
                last_src = (src["file"], src["line"])
            out.append(f"{row['pc']:>6}: {row['text']}")
    out.append("")
    out.append("maps:")
    for m in desc["maps"]:
        types = f"  key {m['key_type']}  value {m['value_type']}" if m["key_type"] or m["value_type"] else ""
        out.append(f"  {m['name']}: {m['type']}  key_size {m['key_size']}  value_size {m['value_size']}  "
                   f"max_entries {m['max_entries']}  flags {m['flags']:#x}{types}")
    if desc["globals"]:
        out.append("")
        out.append("globals:")
        for g in desc["globals"]:
            out.append(f"  {g['section']}+{g['offset']}: {g['type'] or '?'} {g['name']} ({g['size']} bytes, "
                       f"{g['linkage']}) = {g['initial']}")
    if btf and desc["btf"]:
        out.append("")
        out.append("btf:")
        for t in desc["btf"]:
            extra = " ".join(f"{k}={v}" for k, v in t.items()
                             if k not in ("id", "kind", "name", "members", "values", "params", "vars"))
            out.append(f"  [{t['id']}] {t['kind']} '{t['name']}' {extra}".rstrip())
            for m in t.get("members", []):
                out.append(f"        '{m['name']}' type_id={m['type_id']} bits_offset={m['bits_offset']}"
                           + (f" bitfield_size={m['bitfield_size']}" if "bitfield_size" in m else ""))
            for e in t.get("values", []):
                out.append(f"        '{e['name']}' val={e['val']}")
            for p in t.get("params", []):
                out.append(f"        '{p['name']}' type_id={p['type_id']}")
            for v in t.get("vars", []):
                out.append(f"        type_id={v['type_id']} offset={v['offset']} size={v['size']}")
    return out
