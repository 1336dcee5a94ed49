"""USDT probes: ``.note.stapsdt`` notes, argument specs, and the spec records
libbpf's ``usdt.bpf.h`` reads.

What libbpf 1.1 does at attach time, and what this module reproduces:

* each ``NT_STAPSDT`` note holds (pc, base, semaphore) link-time addresses and
  three strings: provider, name, argument spec (``-4@%edi 8@-8(%rbp) 4@$5``);
* prelink moves sections but not notes: when a ``.stapsdt.base`` section exists,
  ``pc += sh_addr(.stapsdt.base) - base``;
* the pc must lie in an executable PT_LOAD and becomes a file offset through it
  (that is the uprobe location); the semaphore, when present, must lie in a
  non-executable PT_LOAD and becomes a file offset too (the kernel's
  ``ref_ctr_offset``: a tracer increments that u16 in the target while attached);
* every argument becomes a ``struct __bpf_usdt_arg_spec``; the attach cookie is the
  spec id (an index into ``__bpf_usdt_specs``), the user's cookie is stored in
  the spec; ``__bpf_usdt_ip_to_spec_id`` maps a probe's address to its spec id
  for runtimes without attach cookies.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field

from ubpf_py.errors import NotSupportedError, SymbolError
from ubpf_py.probe.symbols import load_elf
from ubpf_py.probe.usdt_layout import BPF_USDT_ARG_SIB, LEGACY_LAYOUT, UsdtSpecLayout

NT_STAPSDT = 3
USDT_MAX_ARG_CNT = 12          # BPF_USDT_MAX_ARG_CNT in usdt.bpf.h
BPF_USDT_ARG_CONST = 0
BPF_USDT_ARG_REG = 1
BPF_USDT_ARG_REG_DEREF = 2

# struct __bpf_usdt_spec of libbpf 1.0-1.6 (objects carry their own: see usdt_layout)
SPEC_SIZE = LEGACY_LAYOUT.size

# offsets in the kernel's x86-64 struct pt_regs, with every name libbpf accepts
PT_REGS_OFF: dict[str, int] = {}
for _names, _off in (
    (("rip", "eip"), 128),
    (("rax", "eax", "ax", "al"), 80), (("rbx", "ebx", "bx", "bl"), 40),
    (("rcx", "ecx", "cx", "cl"), 88), (("rdx", "edx", "dx", "dl"), 96),
    (("rsi", "esi", "si", "sil"), 104), (("rdi", "edi", "di", "dil"), 112),
    (("rbp", "ebp", "bp", "bpl"), 32), (("rsp", "esp", "sp", "spl"), 152),
    (("r8", "r8d", "r8w", "r8b"), 72), (("r9", "r9d", "r9w", "r9b"), 64),
    (("r10", "r10d", "r10w", "r10b"), 56), (("r11", "r11d", "r11w", "r11b"), 48),
    (("r12", "r12d", "r12w", "r12b"), 24), (("r13", "r13d", "r13w", "r13b"), 16),
    (("r14", "r14d", "r14w", "r14b"), 8), (("r15", "r15d", "r15w", "r15b"), 0),
):
    for _n in _names:
        PT_REGS_OFF[_n] = _off


@dataclass(frozen=True, slots=True)
class UsdtArg:
    """One parsed argument spec."""

    text: str
    size: int              # 1, 2, 4 or 8 bytes
    signed: bool
    kind: str              # "const" | "reg" | "deref" | "sib"
    val_off: int           # constant value, or memory displacement
    reg: str | None = None
    reg_off: int = 0       # pt_regs offset of reg (base register for deref/sib)
    index_reg: str | None = None
    index_reg_off: int = 0
    scale: int = 1

    @property
    def bitshift(self) -> int:
        return 64 - self.size * 8

    @property
    def arg_type(self) -> int:
        if self.kind == "sib":
            return BPF_USDT_ARG_SIB
        return {"const": BPF_USDT_ARG_CONST, "reg": BPF_USDT_ARG_REG,
                "deref": BPF_USDT_ARG_REG_DEREF}[self.kind]


_NUM = r"[-+]?(?:0[xX][0-9a-fA-F]+|\d+)"
_SIZE = r"\s*([-+]?\d+)\s*@\s*"
_RX_DEREF = re.compile(_SIZE + rf"({_NUM})?\s*\(\s*%(\w+)\s*\)\s*")
_RX_SIB = re.compile(_SIZE + rf"({_NUM})?\s*\(\s*(?:%(\w+))?\s*,\s*%(\w+)\s*(?:,\s*(\d+))?\s*\)\s*")
_RX_REG = re.compile(_SIZE + r"%(\w+)\s*")
_RX_CONST = re.compile(_SIZE + rf"\$({_NUM})\s*")
_FORMS = ((_RX_DEREF, "deref"), (_RX_SIB, "sib"), (_RX_REG, "reg"), (_RX_CONST, "const"))


def _num(text: str | None) -> int:
    if not text:
        return 0
    t = text.lstrip("+-")
    v = int(t, 16) if t[:2] in ("0x", "0X") else int(t, 10)
    return -v if text.startswith("-") else v


def _reg_off(reg: str, spec: str) -> int:
    off = PT_REGS_OFF.get(reg)
    if off is None:
        raise SymbolError(f"USDT argument {spec!r}: unrecognized register %{reg}")
    return off


def parse_usdt_args(spec: str) -> list[UsdtArg]:
    """Parse a whole argument spec string (``-4@%eax -8@%rdx``) like libbpf's
    ``parse_usdt_spec``; scaled-index operands parse as kind ``sib``."""
    args: list[UsdtArg] = []
    pos = 0
    s = spec
    while pos < len(s) and s[pos:].strip():
        if len(args) >= USDT_MAX_ARG_CNT:
            raise SymbolError(f"too many USDT arguments (> {USDT_MAX_ARG_CNT}) in spec {spec!r}")
        m = None
        kind = ""
        for rx, k in _FORMS:
            m = rx.match(s, pos)
            if m is not None:
                kind = k
                break
        if m is None:
            raise SymbolError(f"unrecognized USDT argument #{len(args)} in spec {spec!r}")
        text = m.group(0).strip()
        size = int(m.group(1))
        signed = size < 0
        if abs(size) not in (1, 2, 4, 8):
            raise SymbolError(f"unsupported USDT argument size {abs(size)} in {text!r}")
        if kind == "deref":
            reg = m.group(3)
            arg = UsdtArg(text, abs(size), signed, kind, _num(m.group(2)), reg, _reg_off(reg, text))
        elif kind == "sib":
            base, index = m.group(3), m.group(4)
            scale = int(m.group(5) or "1")
            if scale not in (1, 2, 4, 8):
                raise SymbolError(f"USDT argument {text!r}: bad scale {scale}")
            arg = UsdtArg(text, abs(size), signed, kind, _num(m.group(2)), base,
                          _reg_off(base, text) if base else 0, index, _reg_off(index, text), scale)
        elif kind == "reg":
            reg = m.group(2)
            arg = UsdtArg(text, abs(size), signed, kind, 0, reg, _reg_off(reg, text))
        else:
            arg = UsdtArg(text, abs(size), signed, kind, _num(m.group(2)))
        args.append(arg)
        if m.end() == pos:
            raise SymbolError(f"unrecognized USDT argument #{len(args)} in spec {spec!r}")
        pos = m.end()
    return args


@dataclass(frozen=True, slots=True)
class UsdtNote:
    """One USDT probe site, with its addresses turned into file offsets."""

    binary: str
    provider: str
    name: str
    loc_addr: int          # pc as written in the note
    base_addr: int         # .stapsdt.base as written in the note
    sema_addr: int         # 0 = no semaphore
    args: str              # argument spec string ("" when none)
    abs_ip: int            # pc after the prelink adjustment (link-time address)
    file_offset: int | None  # uprobe location; None when the pc is not in an executable segment
    sema_offset: int       # semaphore file offset (ref_ctr_offset), 0 = none
    problem: str | None = field(default=None, compare=False)

    @property
    def label(self) -> str:
        return f"{self.provider}:{self.name}"

    def arguments(self) -> list[UsdtArg]:
        return parse_usdt_args(self.args)


def _iter_notes(data: bytes):
    off = 0
    while off + 12 <= len(data):
        namesz, descsz, ntype = struct.unpack_from("<III", data, off)
        off += 12
        name = data[off: off + namesz]
        off += (namesz + 3) & ~3
        desc = data[off: off + descsz]
        off += (descsz + 3) & ~3
        yield name.rstrip(b"\0"), ntype, desc


def read_usdt_notes(binary: str) -> list[UsdtNote]:
    """Every USDT probe of ``binary`` in note order (empty when it has none)."""
    info = load_elf(binary)
    data = info.notes_stapsdt
    if not data:
        return []
    base_sec = info.sections.get(".stapsdt.base")
    base_addr_actual = base_sec[0] if base_sec else 0
    out: list[UsdtNote] = []
    for name, ntype, desc in _iter_notes(data):
        if name != b"stapsdt" or ntype != NT_STAPSDT or len(desc) < 24 + 3:
            continue
        loc, base, sema = struct.unpack_from("<QQQ", desc, 0)
        strings = desc[24:].split(b"\0")
        if len(strings) < 3 or not strings[1]:
            continue
        provider = strings[0].decode(errors="replace")
        pname = strings[1].decode(errors="replace")
        args = strings[2].decode(errors="replace")
        if args.startswith(":"):
            args = ""
        abs_ip = loc
        if base_addr_actual:
            abs_ip = (loc + base_addr_actual - base) & 0xFFFFFFFFFFFFFFFF
        problem = None
        seg = info.segment_of(abs_ip)
        file_offset = None
        if seg is None:
            problem = f"no ELF segment contains address {abs_ip:#x}"
        elif not seg.executable:
            problem = f"address {abs_ip:#x} is in a non-executable segment"
        else:
            file_offset = abs_ip - seg.vaddr + seg.offset
        sema_off = 0
        if sema:
            sseg = info.segment_of(sema)
            if sseg is None:
                problem = problem or f"no ELF segment contains semaphore {sema:#x}"
            elif sseg.executable:
                problem = problem or f"semaphore {sema:#x} is in an executable segment"
            else:
                sema_off = sema - sseg.vaddr + sseg.offset
        out.append(UsdtNote(binary, provider, pname, loc, base, sema, args, abs_ip, file_offset,
                            sema_off, problem))
    return out


def find_usdt(binary: str, provider: str, name: str) -> list[UsdtNote]:
    """Every site of ``provider:name`` (a probe may be inlined at several places)."""
    notes = read_usdt_notes(binary)
    found = [n for n in notes if n.provider == provider and n.name == name]
    if not found:
        if not notes:
            raise SymbolError(f"no USDT probes in {binary} (no .note.stapsdt section)")
        avail = sorted({n.label for n in notes})
        shown = ", ".join(avail[:8]) + (" ..." if len(avail) > 8 else "")
        raise SymbolError(f"USDT probe {provider}:{name} not found in {binary}; it has: {shown}")
    for n in found:
        if n.problem:
            raise SymbolError(f"USDT probe {provider}:{name} in {binary}: {n.problem}")
    return found


def encode_usdt_spec(note: UsdtNote | str, cookie: int = 0, layout: UsdtSpecLayout | None = None) -> bytes:
    """The ``struct __bpf_usdt_spec`` value for ``__bpf_usdt_specs``, laid out as ``layout``
    says (``usdt_layout.layout_from_btf(object BTF)``; default: libbpf 1.0-1.6, 208 bytes).

    ``note`` may also be a bare argument spec string.  ``cookie`` is the user's
    USDT cookie (``bpf_usdt_cookie()``), not the spec id.  Scaled-index operands need
    a header with ``idx_reg_off``/``scale_bitshift`` (libbpf 1.7+).
    """
    layout = layout or LEGACY_LAYOUT
    spec = note if isinstance(note, str) else note.args
    fields = []
    for a in parse_usdt_args(spec):
        f = {"val_off": a.val_off & 0xFFFFFFFFFFFFFFFF, "reg_off": a.reg_off, "arg_signed": int(a.signed),
             "arg_bitshift": a.bitshift}
        if a.kind == "sib":
            if not layout.has_sib or a.reg is None:
                raise NotSupportedError(
                    f"USDT argument {a.text!r}: scaled-index operands need libbpf 1.7+'s usdt.bpf.h "
                    "(this object's struct __bpf_usdt_arg_spec has no idx_reg_off); rebuild it with newer headers"
                    if a.reg is not None else f"USDT argument {a.text!r}: scaled-index operand without a base register")
            f.update(arg_type=BPF_USDT_ARG_SIB, idx_reg_off=a.index_reg_off,
                     scale_bitshift=a.scale.bit_length() - 1)
        else:
            f["arg_type"] = a.arg_type
        fields.append(f)
    return layout.pack(fields, cookie & 0xFFFFFFFFFFFFFFFF)


def encode_ip_to_spec_id(ip: int, spec_id: int) -> tuple[bytes, bytes]:
    """(key, value) of a ``__bpf_usdt_ip_to_spec_id`` entry: long ip -> u32 spec id.

    ``ip`` is the probe's runtime address (what ``PT_REGS_IP`` holds on a hit).
    """
    return struct.pack("<q", ip - (1 << 64) if ip >= 1 << 63 else ip), struct.pack("<I", spec_id)


class UsdtSpecIds:
    """Spec id allocation like libbpf: one id per distinct (argument spec, cookie)."""

    def __init__(self, max_specs: int = 256) -> None:
        self.max_specs = max_specs
        self._ids: dict[tuple[str, int], int] = {}

    def assign(self, note: UsdtNote, cookie: int = 0) -> tuple[int, bool]:
        """(spec id, whether it is new and its spec must be written)."""
        key = (note.args, cookie)
        sid = self._ids.get(key)
        if sid is not None:
            return sid, False
        if len(self._ids) >= self.max_specs:
            raise SymbolError(f"too many distinct USDT specs (> {self.max_specs}); "
                              "raise BPF_USDT_MAX_SPEC_CNT in the program")
        sid = len(self._ids)
        self._ids[key] = sid
        return sid, True
