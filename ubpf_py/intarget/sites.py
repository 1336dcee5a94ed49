"""Can a probe site take a 5-byte ``jmp``, and how do its displaced instructions run elsewhere?

An in-target probe overwrites the instruction(s) at the site with ``jmp rel32`` to a
trampoline.  The instructions it covers ("displaced") are copied into the trampoline
and run there after the programs.  That is only correct when

* the function has at least 5 bytes from the site on (else the jump overwrites the
  next function);
* no branch lands strictly inside the patched bytes (it would execute half a
  ``jmp``); we find direct branches by decoding the whole function from its symbol
  start, which also proves the site is an instruction boundary.  Indirect branches
  (jump tables, landing pads) cannot be seen; compilers do not aim them at the
  first bytes of a function, and ``extra_ranges`` lets the caller scan split-off
  parts such as ``foo.cold`` too;
* every displaced instruction can run at another address: instructions that do not
  read ``rip`` are copied; ``rip``-relative memory operands get a new disp32;
  relative ``jmp``/``jcc``/``call`` are re-encoded in their rel32 forms, and a
  displaced ``call`` pushes the ORIGINAL return address (so the callee returns to
  the original code, not into the trampoline, and unwinders see the real caller);
  ``loop``/``jrcxz`` (rel8 only) branch over a short ``jmp`` onto a ``jmp rel32``;
  ``syscall``, ``int3``, ``ud2`` and anything capstone cannot decode are refused;
* control does not leave (``ret``/``jmp``) before 5 bytes are covered.

A refusal raises ``SiteRefused`` whose message is a short phrase; the caller prints
it as "probe X stays on the ptrace path: <reason>".  ``SitePlan.note`` carries a
non-fatal caveat (unknown function size) the caller shows with ``-v``.
"""

from __future__ import annotations

import functools
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import capstone
from capstone import x86

from ubpf_py.errors import UbpfError

#: bytes of the patched ``jmp rel32``
JMP_LEN = 5
#: longest x86 instruction: a site's displaced bytes never exceed JMP_LEN - 1 + 15
MAX_INSN = 15

Reader = Callable[[int, int], bytes]

# kinds of displaced instructions
COPY = "copy"          # runs unchanged anywhere
RIPREL = "riprel"      # copy with a re-targeted rip-relative disp32
JMP = "jmp"            # relative jmp: re-encoded as jmp rel32 (ends the site)
JCC = "jcc"            # relative jcc: re-encoded as jcc rel32
CALL = "call"          # relative call: push the original return address; jmp rel32 (ends the site)
CALL_REG = "call_reg"  # call reg: push the original return address; jmp reg (ends the site)
CALL_RIP = "call_rip"  # call [rip+d]: push the original return address; jmp [rip+d'] (ends the site)
LOOP = "loop"          # loop*/jrcxz rel8: the same instruction over a short jmp, then jmp rel32
END = "end"            # ret / indirect jmp (copied; ends the site)

_ENDS = {JMP, CALL, CALL_REG, CALL_RIP, END}
_REFUSED_MNEMONICS = {
    "int3": "an int3 (another debugger's breakpoint?)",
    "int": "a software interrupt", "int1": "a software interrupt", "into": "a software interrupt",
    "syscall": "a syscall instruction", "sysenter": "a sysenter instruction",
    "ud0": "an undefined instruction", "ud1": "an undefined instruction", "ud2": "ud2",
    "hlt": "hlt",
}
_LOOPS = {"loop", "loope", "loopne", "jrcxz", "jecxz"}
M64 = (1 << 64) - 1

_md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
_md.detail = True

_GPR64 = {
    x86.X86_REG_RAX: 0, x86.X86_REG_RCX: 1, x86.X86_REG_RDX: 2, x86.X86_REG_RBX: 3,
    x86.X86_REG_RSP: 4, x86.X86_REG_RBP: 5, x86.X86_REG_RSI: 6, x86.X86_REG_RDI: 7,
    x86.X86_REG_R8: 8, x86.X86_REG_R9: 9, x86.X86_REG_R10: 10, x86.X86_REG_R11: 11,
    x86.X86_REG_R12: 12, x86.X86_REG_R13: 13, x86.X86_REG_R14: 14, x86.X86_REG_R15: 15,
}


class SiteRefused(UbpfError):
    """A site the in-target path cannot patch; ``reason`` is a short human phrase."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Displaced:
    """One instruction the patch covers, classified for relocation."""

    addr: int
    raw: bytes
    text: str
    kind: str
    target: int = 0       # JMP/JCC/CALL: branch destination
    cond: int = 0         # JCC: condition nibble (0x0F 0x80+cond)
    disp_offset: int = 0  # RIPREL/CALL_RIP: offset of the disp32 inside ``raw``
    reg: int = 0          # CALL_REG: register number (0..15)

    @property
    def size(self) -> int:
        return len(self.raw)

    @property
    def next(self) -> int:
        return self.addr + len(self.raw)


@dataclass(frozen=True, slots=True)
class SitePlan:
    """A site that can be patched: ``length`` bytes from ``site`` move into the trampoline."""

    site: int
    length: int
    insns: tuple[Displaced, ...]
    note: str = ""

    @property
    def resume(self) -> int:
        """Where the trampoline jumps back to (the first byte after the patch)."""
        return self.site + self.length

    @property
    def falls_through(self) -> bool:
        """Whether the relocated code needs a jump back to ``resume``."""
        return self.insns[-1].kind not in _ENDS

    def exits(self) -> tuple[int, ...]:
        """Original-code addresses the relocated instructions can continue at (known statically)."""
        out = [d.target for d in self.insns if d.kind in (JMP, JCC, LOOP, CALL)]
        if self.falls_through:
            out.append(self.resume)
        return tuple(dict.fromkeys(out))


def _decode_one(code: bytes, addr: int) -> capstone.CsInsn | None:
    return next(_md.disasm(code, addr, 1), None)


def _text(insn: capstone.CsInsn) -> str:
    return f"{insn.mnemonic} {insn.op_str}".strip()


def _direct_target(insn: capstone.CsInsn) -> int | None:
    g = insn.groups
    if capstone.CS_GRP_BRANCH_RELATIVE in g and insn.operands and insn.operands[0].type == x86.X86_OP_IMM:
        return insn.operands[0].imm & M64
    return None


def _has_rip_operand(insn: capstone.CsInsn) -> bool:
    return any(op.type == x86.X86_OP_MEM and op.mem.base == x86.X86_REG_RIP for op in insn.operands)


def classify(insn: capstone.CsInsn) -> Displaced:
    """Classify one decoded instruction for relocation, or raise SiteRefused."""
    mn = insn.mnemonic.split()[-1]     # "bnd jmp", "notrack call", "lock add": the operation
    raw = bytes(insn.bytes)
    text = _text(insn)
    addr = insn.address
    if mn in _REFUSED_MNEMONICS:
        raise SiteRefused(f"the patched bytes hold {_REFUSED_MNEMONICS[mn]} at 0x{addr:x}")
    g = insn.groups
    if capstone.CS_GRP_INT in g or capstone.CS_GRP_IRET in g or capstone.CS_GRP_PRIVILEGE in g:
        raise SiteRefused(f"'{text}' at 0x{addr:x} cannot be relocated")
    if capstone.CS_GRP_RET in g:
        return Displaced(addr, raw, text, END)
    target = _direct_target(insn)
    if target is not None:
        if capstone.CS_GRP_CALL in g:
            return Displaced(addr, raw, text, CALL, target=target)
        if mn == "jmp":
            return Displaced(addr, raw, text, JMP, target=target)
        if mn in _LOOPS:
            return Displaced(addr, raw, text, LOOP, target=target)
        op = insn.opcode
        if capstone.CS_GRP_JUMP in g and (0x70 <= op[0] <= 0x7F or (op[0] == 0x0F and 0x80 <= op[1] <= 0x8F)):
            cond = (op[0] if op[0] != 0x0F else op[1]) & 0xF
            return Displaced(addr, raw, text, JCC, target=target, cond=cond)
        raise SiteRefused(f"relative branch '{text}' at 0x{addr:x} cannot be relocated")
    rip = _has_rip_operand(insn)
    if rip and insn.disp_size != 4:
        raise SiteRefused(f"rip-relative '{text}' at 0x{addr:x} has no 32-bit displacement")
    if capstone.CS_GRP_CALL in g:
        # an indirect call would push the trampoline's address; convert the forms we can
        op0 = insn.operands[0] if insn.operands else None
        if op0 is not None and op0.type == x86.X86_OP_REG and op0.reg in _GPR64 and op0.reg != x86.X86_REG_RSP:
            return Displaced(addr, raw, text, CALL_REG, reg=_GPR64[op0.reg])
        if (op0 is not None and op0.type == x86.X86_OP_MEM and op0.mem.base == x86.X86_REG_RIP
                and op0.mem.index == 0 and op0.mem.segment == 0 and raw[-6:-4] == b"\xff\x15"):
            return Displaced(addr, raw, text, CALL_RIP, disp_offset=insn.disp_offset)
        raise SiteRefused(f"indirect call '{text}' at 0x{addr:x} cannot be relocated")
    if capstone.CS_GRP_JUMP in g:   # indirect jmp: leaves the site
        if rip:
            return Displaced(addr, raw, text, END, disp_offset=insn.disp_offset)
        return Displaced(addr, raw, text, END)
    if rip:
        return Displaced(addr, raw, text, RIPREL, disp_offset=insn.disp_offset)
    return Displaced(addr, raw, text, COPY)


def _scan_branch_targets(read: Reader, start: int, end: int, lo: int, hi: int,
                         boundary: int | None) -> None:
    """Refuse if a direct branch in [start, end) targets (lo, hi); check ``boundary`` is an insn start."""
    code = read(start, end - start)
    seen_boundary = boundary is None
    off = 0
    while off < len(code):
        n = 0
        for insn in _md.disasm(code[off:], start + off):
            if insn.address == boundary:
                seen_boundary = True
            t = _direct_target(insn)
            if t is not None and lo < t < hi:
                raise SiteRefused(f"a branch at 0x{insn.address:x} jumps into the patched bytes (to 0x{t:x})")
            n += insn.size
        if n == 0:
            raise SiteRefused(f"cannot decode the function at 0x{start + off:x}")
        off += n
    if not seen_boundary:
        raise SiteRefused(f"0x{boundary:x} is not an instruction boundary of its function")


def plan_site(read: Reader, func_start: int, func_end: int, site: int,
              extra_ranges: Iterable[tuple[int, int]] = (), shadow_stack: bool = False,
              pad_end: int = 0) -> SitePlan:
    """Decide how to patch ``site`` in the function [func_start, func_end); ``func_end`` 0 = unknown size.

    ``read(addr, n)`` returns the target's code bytes.  ``extra_ranges`` are further
    code ranges whose direct branches must not land in the patched bytes (``foo.cold``).
    ``shadow_stack``: the target runs with the CPU's shadow stack (CET SHSTK), where a
    call turned into push + jmp makes the callee's ``ret`` fault, so displaced calls
    are refused.
    ``pad_end``: where the next function (or the section) starts; [func_end, pad_end) is then
    alignment padding that nothing runs or branches to, which a short function's jump may
    overlap (its whole tail moves into the trampoline and ends there with its ``ret``).
    """
    known = func_end != 0
    if known:
        if not func_start <= site < func_end:
            raise SiteRefused(f"0x{site:x} is outside its function [0x{func_start:x}, 0x{func_end:x})")
        if site + JMP_LEN > func_end:
            return _plan_into_padding(read, func_start, func_end, site, pad_end, extra_ranges, shadow_stack)
        avail = min(func_end - site, JMP_LEN - 1 + MAX_INSN)
    else:
        avail = JMP_LEN - 1 + MAX_INSN
    code = read(site, avail)
    insns: list[Displaced] = []
    covered = 0
    while covered < JMP_LEN:
        insn = _decode_one(code[covered:], site + covered)
        if insn is None:
            raise SiteRefused(f"cannot decode the instruction at 0x{site + covered:x}")
        d = classify(insn)
        insns.append(d)
        covered += d.size
        if d.kind in (CALL, CALL_REG, CALL_RIP) and shadow_stack:
            raise SiteRefused(f"the call at 0x{d.addr:x} cannot be relocated under a CPU shadow stack")
        if d.kind in (CALL, CALL_REG, CALL_RIP) and covered < JMP_LEN:
            raise SiteRefused(f"the call at 0x{d.addr:x} would return into the patched bytes")
        if d.kind in _ENDS and covered < JMP_LEN:
            raise SiteRefused(f"control leaves the function {covered} bytes after the site ('{d.text}'),"
                              f" before the 5-byte jump ends")
    note = ""
    if known:
        _scan_branch_targets(read, func_start, func_end, site, site + covered, site)
    else:
        if any(d.kind not in (COPY, RIPREL) for d in insns):
            raise SiteRefused("the function's size is unknown and the patched bytes hold a branch")
        note = "function size unknown: branches into the patched bytes were not checked"
    for lo, hi in extra_ranges:
        _scan_branch_targets(read, lo, hi, site, site + covered, None)
    return SitePlan(site, covered, tuple(insns), note)


def _plan_into_padding(read: Reader, func_start: int, func_end: int, site: int, pad_end: int,
                       extra_ranges: Iterable[tuple[int, int]], shadow_stack: bool) -> SitePlan:
    """A site fewer than 5 bytes before its function's end: the jump may also cover the padding
    after the function when that padding holds only NOPs/int3 up to the next function, and the
    function's last instruction leaves it (``ret``, ``jmp``): nothing then runs the patch's
    tail or lands in it."""
    short = SiteRefused(f"the function is too short for a 5-byte jump ({func_end - site} bytes from the site)")
    if pad_end < site + JMP_LEN or not _all_padding(read(func_end, pad_end - func_end), func_end):
        raise short
    code = read(site, func_end - site)
    insns: list[Displaced] = []
    covered = 0
    while covered < func_end - site:
        insn = _decode_one(code[covered:], site + covered)
        if insn is None:
            raise SiteRefused(f"cannot decode the instruction at 0x{site + covered:x}")
        d = classify(insn)
        if d.kind in (CALL, CALL_REG, CALL_RIP):
            raise short      # its return would land in the patched bytes
        insns.append(d)
        covered += d.size
    if covered != func_end - site or insns[-1].kind not in (JMP, END):
        raise short
    _scan_branch_targets(read, func_start, func_end, site, site + JMP_LEN, site)
    for lo, hi in extra_ranges:
        _scan_branch_targets(read, lo, hi, site, site + JMP_LEN, None)
    return SitePlan(site, JMP_LEN, tuple(insns),
                    f"the jump's last {site + JMP_LEN - func_end} byte(s) cover alignment padding")


def _all_padding(code: bytes, addr: int) -> bool:
    """Is ``code`` nothing but NOPs and int3s (what assemblers align functions with)?"""
    off = 0
    while off < len(code):
        if code[off] == 0xCC:
            off += 1
            continue
        insn = _decode_one(code[off:], addr + off)
        if insn is None or insn.mnemonic not in ("nop", "xchg") or \
                (insn.mnemonic == "xchg" and insn.op_str != "ax, ax"):
            return False
        off += insn.size
    return True


# --- relocation -------------------------------------------------------------------------------------

def _rel32(frm_end: int, to: int, what: str) -> bytes:
    rel = to - frm_end
    if not -(1 << 31) <= rel < (1 << 31):
        raise SiteRefused(f"{what}: the trampoline is out of +-2 GiB reach")
    return struct.pack("<i", rel)


def _push_u64(value: int) -> bytes:
    """``push imm32`` (sign-extended) then ``mov dword [rsp+4], hi32``: pushes any 64-bit value, no flags."""
    lo, hi = value & 0xFFFFFFFF, (value >> 32) & 0xFFFFFFFF
    return b"\x68" + struct.pack("<I", lo) + b"\xc7\x44\x24\x04" + struct.pack("<I", hi)


def _retarget_disp(d: Displaced, raw: bytes, at: int) -> bytes:
    out = bytearray(raw)
    (disp,) = struct.unpack_from("<i", out, d.disp_offset)
    absolute = d.next + disp
    new = absolute - (at + len(raw))
    if not -(1 << 31) <= new < (1 << 31):
        raise SiteRefused(f"rip-relative '{d.text}' at 0x{d.addr:x}: the trampoline is out of +-2 GiB reach")
    struct.pack_into("<i", out, d.disp_offset, new)
    return bytes(out)


def relocate_one(d: Displaced, at: int) -> bytes:
    """Bytes that do what ``d`` does at its original address, placed at ``at``."""
    if d.kind == COPY or (d.kind == END and not d.disp_offset):
        return d.raw
    if d.kind in (RIPREL, END):
        return _retarget_disp(d, d.raw, at)
    if d.kind == JMP:
        return b"\xe9" + _rel32(at + 5, d.target, d.text)
    if d.kind == JCC:
        return bytes((0x0F, 0x80 | d.cond)) + _rel32(at + 6, d.target, d.text)
    if d.kind == LOOP:
        # loop/jrcxz have only a rel8 form: taken -> over "jmp +5" onto "jmp rel32 target";
        # not taken -> "jmp +5" skips it.  rcx and the flags change exactly as in the original.
        head = d.raw[:-1] + b"\x02\xeb\x05\xe9"
        return head + _rel32(at + len(head) + 4, d.target, d.text)
    push = _push_u64(d.next)
    if d.kind == CALL:
        return push + b"\xe9" + _rel32(at + len(push) + 5, d.target, d.text)
    if d.kind == CALL_REG:
        jmp = (b"\x41" if d.reg >= 8 else b"") + bytes((0xFF, 0xE0 | (d.reg & 7)))
        return push + jmp
    if d.kind == CALL_RIP:
        (disp,) = struct.unpack_from("<i", d.raw, d.disp_offset)
        jmp_at = at + len(push)
        return push + b"\xff\x25" + _rel32(jmp_at + 6, d.next + disp, d.text)
    raise AssertionError(d.kind)


def relocate(plan: SitePlan, at: int) -> bytes:
    """The displaced instructions re-encoded for address ``at``, then a jump back to the site's end."""
    out = bytearray()
    for d in plan.insns:
        out += relocate_one(d, at + len(out))
    if plan.falls_through:
        out += b"\xe9" + _rel32(at + len(out) + 5, plan.resume, "the jump back")
    return bytes(out)


def relocated_offsets(plan: SitePlan, at: int) -> list[tuple[int, int]]:
    """(offset in the relocated code, original address) of each displaced instruction's start."""
    out, off = [], 0
    for d in plan.insns:
        out.append((off, d.addr))
        off += len(relocate_one(d, at + off))
    return out


# --- Go binaries --------------------------------------------------------------------------------------

def is_go_binary(path: str) -> bool:
    """A Go binary (``.go.buildinfo`` section or a ``runtime.main`` symbol).

    Return probes are refused there: Go's stack unwinder (GC, panics, tracebacks)
    walks return addresses and cannot tolerate a replaced one.  Asked for every armed
    site, so the answer is kept per file version (a symbol-table scan costs milliseconds).
    """
    try:
        st = os.stat(path)
    except OSError:
        return False
    return _is_go_file(path, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=256)
def _is_go_file(path: str, dev: int, ino: int, mtime_ns: int, size: int) -> bool:
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile
    from elftools.elf.sections import SymbolTableSection

    try:
        with open(path, "rb") as f:
            elf = ELFFile(f)
            if elf.get_section_by_name(".go.buildinfo") is not None:
                return True
            if elf.get_section_by_name(".gopclntab") is not None:
                return True
            for sec in elf.iter_sections():
                if isinstance(sec, SymbolTableSection) and sec.get_symbol_by_name("runtime.main"):
                    return True
    except (OSError, ELFError):
        return False
    return False


GO_RETURN_REFUSAL = "Go's stack unwinder cannot tolerate a replaced return address"
