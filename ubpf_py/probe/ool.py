"""What to do with the instruction an int3 displaced: emulate it or run it out of line.

At arm time each probed instruction is decoded once (capstone) into a ``Plan``:

* prologue instructions the tracer finishes itself with no extra stop
  (endbr64 and nops: skip; ``push reg``; ``mov rbp, rsp``; ``sub rsp, imm``);
* instructions that read rip and cannot run elsewhere: relative jmp/jcc/call,
  jrcxz/loop, indirect jmp/call, ret -- emulated;
* everything else runs *out of line*: copied into a slot of a scratch page in
  the target with any rip-relative displacement re-targeted, followed by a
  jump back to the original next instruction.  The thread is resumed at the
  slot and never stops again for this hit.

The plan is pure data so that the native hot loop can execute the same plans
(see ``native/hotloop.c``; kinds are shared numerically).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import capstone
from capstone import x86

from ubpf_py.errors import NotSupportedError
from ubpf_py.probe import ptrace as P

# plan kinds (keep in sync with native/hotloop.c)
K_SKIP = 1      # endbr64 / nop: rip = next
K_PUSH = 2      # push reg: rsp -= 8; [rsp] = reg; rip = next
K_MOVRBP = 3    # mov rbp, rsp
K_SUBRSP = 4    # sub rsp, imm (flags computed)
K_OOL = 5       # rip = slot
K_JMP = 6       # rip = target
K_JCC = 7       # rip = cond ? target : next
K_CALL = 8      # push next; rip = target
K_RET = 9       # rip = [rsp]; rsp += 8 + imm
K_IND = 10      # indirect jmp/call through register or memory (computed in Python)

SLOT_SIZE = 32

_md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
_md.detail = True

#: capstone 64-bit register -> user_regs_struct slot
REG64 = {
    x86.X86_REG_RAX: P.RAX, x86.X86_REG_RBX: P.RBX, x86.X86_REG_RCX: P.RCX, x86.X86_REG_RDX: P.RDX,
    x86.X86_REG_RSI: P.RSI, x86.X86_REG_RDI: P.RDI, x86.X86_REG_RBP: P.RBP, x86.X86_REG_RSP: P.RSP,
    x86.X86_REG_R8: P.R8, x86.X86_REG_R9: P.R9, x86.X86_REG_R10: P.R10, x86.X86_REG_R11: P.R11,
    x86.X86_REG_R12: P.R12, x86.X86_REG_R13: P.R13, x86.X86_REG_R14: P.R14, x86.X86_REG_R15: P.R15,
}

# jcc condition codes (the low nibble of 0x7X / 0x0F 0x8X), plus 16 = jrcxz, 17 = jecxz,
# 18 = loop, 19 = loope, 20 = loopne
_JCC = {
    "jo": 0, "jno": 1, "jb": 2, "jae": 3, "je": 4, "jne": 5, "jbe": 6, "ja": 7,
    "js": 8, "jns": 9, "jp": 10, "jnp": 11, "jl": 12, "jge": 13, "jle": 14, "jg": 15,
    "jrcxz": 16, "jecxz": 17, "loop": 18, "loope": 19, "loopne": 20,
}
CF, PF, AF, ZF, SF, OF = 1 << 0, 1 << 2, 1 << 4, 1 << 6, 1 << 7, 1 << 11
M64 = (1 << 64) - 1


@dataclass(slots=True)
class Plan:
    """How to finish one probed instruction.  ``slot`` is filled when the slot is allocated."""

    kind: int
    addr: int
    length: int
    insn_bytes: bytes
    text: str
    target: int = 0        # JMP/JCC/CALL destination
    cond: int = 0          # JCC condition
    reg: int = 0           # PUSH source register slot
    imm: int = 0           # SUB rsp imm / RET imm16
    slot: int = 0          # OOL slot address in the scratch page
    rip_rel: bool = False  # OOL instruction had a rip-relative operand (needs a near slot)
    ind_is_call: bool = False
    ind_mem: tuple[int, int, int, int] | None = None   # (base slot|-1|-2=rip, index slot|-1, scale, disp)
    ind_reg: int = -1
    disp_off: int = 0       # offset of the rip-relative disp32 inside the instruction

    @property
    def next(self) -> int:
        return self.addr + self.length

    @property
    def needs_slot(self) -> bool:
        return self.kind == K_OOL


def _reg_slot(reg: int) -> int:
    if reg == x86.X86_REG_RIP:
        return -2
    if reg == 0:
        return -1
    try:
        return REG64[reg]
    except KeyError:
        raise NotSupportedError(f"probing an instruction addressing through register {reg}") from None


def analyze(code: bytes, addr: int) -> Plan:
    """Decode the instruction at ``addr`` (``code`` holds at least its bytes) into a Plan."""
    try:
        insn = next(_md.disasm(code, addr, 1))
    except StopIteration:
        raise NotSupportedError(f"probing undecodable instruction bytes {code[:8].hex()} at 0x{addr:x}") from None
    raw = bytes(insn.bytes)
    n = insn.size
    mn = insn.mnemonic
    text = f"{mn} {insn.op_str}".strip()
    ops = insn.operands
    plan = Plan(K_OOL, addr, n, raw, text)
    groups = set(insn.groups)

    if mn == "endbr64" or mn == "endbr32" or mn == "nop":
        plan.kind = K_SKIP
        return plan
    if mn == "push" and len(ops) == 1 and ops[0].type == x86.X86_OP_REG and ops[0].reg in REG64:
        plan.kind, plan.reg = K_PUSH, REG64[ops[0].reg]
        return plan
    if (mn == "mov" and len(ops) == 2 and ops[0].type == ops[1].type == x86.X86_OP_REG
            and ops[0].reg == x86.X86_REG_RBP and ops[1].reg == x86.X86_REG_RSP):
        plan.kind = K_MOVRBP
        return plan
    if (mn == "sub" and len(ops) == 2 and ops[0].type == x86.X86_OP_REG and ops[0].reg == x86.X86_REG_RSP
            and ops[1].type == x86.X86_OP_IMM):
        plan.kind, plan.imm = K_SUBRSP, ops[1].imm & M64
        return plan
    if capstone.CS_GRP_RET in groups:
        if mn not in ("ret", "retq"):
            raise NotSupportedError(f"probing '{text}' at 0x{addr:x}")
        plan.kind = K_RET
        plan.imm = ops[0].imm if ops else 0
        return plan
    is_call = capstone.CS_GRP_CALL in groups
    is_jump = capstone.CS_GRP_JUMP in groups
    if is_call or is_jump:
        if capstone.CS_GRP_BRANCH_RELATIVE in groups and ops and ops[0].type == x86.X86_OP_IMM:
            plan.target = ops[0].imm & M64
            if is_call:
                plan.kind = K_CALL
            elif mn == "jmp":
                plan.kind = K_JMP
            else:
                if mn not in _JCC:
                    raise NotSupportedError(f"probing '{text}' at 0x{addr:x}")
                plan.kind, plan.cond = K_JCC, _JCC[mn]
            return plan
        if ops and mn in ("jmp", "call"):
            plan.kind = K_IND
            plan.ind_is_call = is_call
            op = ops[0]
            if op.type == x86.X86_OP_REG:
                plan.ind_reg = _reg_slot(op.reg)
            elif op.type == x86.X86_OP_MEM:
                if op.mem.segment != 0:
                    raise NotSupportedError(f"probing segment-relative '{text}' at 0x{addr:x}")
                plan.ind_mem = (_reg_slot(op.mem.base), _reg_slot(op.mem.index), op.mem.scale, op.mem.disp)
            return plan
        raise NotSupportedError(f"probing branch '{text}' at 0x{addr:x}")
    if mn in ("int3", "int", "int1", "into", "sysenter"):
        raise NotSupportedError(f"probing '{text}' at 0x{addr:x}")
    # out of line; remember whether a rip-relative displacement must be re-targeted
    for op in ops:
        if op.type == x86.X86_OP_MEM and op.mem.base == x86.X86_REG_RIP:
            plan.rip_rel = True
    if plan.rip_rel and insn.disp_size != 4:
        raise NotSupportedError(f"probing rip-relative '{text}' without a 32-bit displacement")
    plan.disp_off = insn.disp_offset if plan.rip_rel else 0
    return plan


def slot_code(plan: Plan, slot: int, disp_offset: int) -> bytes:
    """Bytes of the out-of-line slot for ``plan`` at ``slot``: the instruction, then a jump back."""
    code = bytearray(plan.insn_bytes)
    if plan.rip_rel:
        (disp,) = struct.unpack_from("<i", code, disp_offset)
        new = disp + plan.addr - slot
        if not -(1 << 31) <= new < (1 << 31):
            raise NotSupportedError(f"rip-relative '{plan.text}' at 0x{plan.addr:x}: scratch page out of reach")
        struct.pack_into("<i", code, disp_offset, new)
    end = slot + len(code)
    rel = plan.next - (end + 5)
    if -(1 << 31) <= rel < (1 << 31):
        code += b"\xe9" + struct.pack("<i", rel)
    else:   # jmp qword ptr [rip+0]; .quad next
        code += b"\xff\x25\x00\x00\x00\x00" + struct.pack("<Q", plan.next)
    assert len(code) <= SLOT_SIZE
    return bytes(code)


def disp_offset(plan: Plan) -> int:
    return plan.disp_off


def cond_true(cond: int, fl: int, rcx: int) -> bool:
    """Evaluate a jcc/loop condition against eflags (and rcx for jrcxz/loop; loop's rcx decrement is
    applied by the caller)."""
    if cond < 16:
        base = cond >> 1
        if base == 0:
            r = bool(fl & OF)
        elif base == 1:
            r = bool(fl & CF)
        elif base == 2:
            r = bool(fl & ZF)
        elif base == 3:
            r = bool(fl & (CF | ZF))
        elif base == 4:
            r = bool(fl & SF)
        elif base == 5:
            r = bool(fl & PF)
        elif base == 6:
            r = bool(fl & SF) != bool(fl & OF)
        else:
            r = bool(fl & ZF) or (bool(fl & SF) != bool(fl & OF))
        return r != bool(cond & 1)
    if cond == 16:
        return rcx == 0
    if cond == 17:
        return rcx & 0xFFFFFFFF == 0
    if cond == 18:
        return rcx != 0
    if cond == 19:
        return rcx != 0 and bool(fl & ZF)
    return rcx != 0 and not fl & ZF


def sub_flags(fl: int, a: int, b: int) -> tuple[int, int]:
    """(result, eflags) of the 64-bit ``sub a, b``."""
    res = (a - b) & M64
    fl &= ~(CF | PF | AF | ZF | SF | OF)
    if a < b:
        fl |= CF
    if res == 0:
        fl |= ZF
    if res >> 63:
        fl |= SF
    if ((a ^ b) & (a ^ res)) >> 63:
        fl |= OF
    if ((a ^ b ^ res) >> 4) & 1:
        fl |= AF
    if bin(res & 0xFF).count("1") % 2 == 0:
        fl |= PF
    return res, fl


def complete(plan: Plan, v, pid: int) -> bool:
    """Finish the displaced instruction of ``plan`` on registers ``v`` (a user_regs_struct u64
    array) of a thread of ``pid``: emulate it, or point rip at its out-of-line slot.  False when
    it would fault (a stack or memory operand not accessible): registers are then half-updated
    and the caller delivers SIGSEGV at the instruction.  native/hotloop.c's apply_plan is the
    same for every kind but K_IND."""
    k = plan.kind
    if k == K_OOL:
        v[P.RIP] = plan.slot
    elif k == K_SKIP:
        v[P.RIP] = plan.next
    elif k == K_PUSH:
        sp = (v[P.RSP] - 8) & M64
        if not P.vm_write_u64(pid, sp, v[plan.reg]):
            return False
        v[P.RSP] = sp
        v[P.RIP] = plan.next
    elif k == K_CALL:
        sp = (v[P.RSP] - 8) & M64
        if not P.vm_write_u64(pid, sp, plan.next):
            return False
        v[P.RSP] = sp
        v[P.RIP] = plan.target
    elif k == K_MOVRBP:
        v[P.RBP] = v[P.RSP]
        v[P.RIP] = plan.next
    elif k == K_SUBRSP:
        v[P.RSP], v[P.EFLAGS] = sub_flags(v[P.EFLAGS], v[P.RSP], plan.imm)
        v[P.RIP] = plan.next
    elif k == K_JMP:
        v[P.RIP] = plan.target
    elif k == K_JCC:
        rcx = v[P.RCX]
        if plan.cond >= 18:
            rcx = (rcx - 1) & M64
            v[P.RCX] = rcx
        v[P.RIP] = plan.target if cond_true(plan.cond, v[P.EFLAGS], rcx) else plan.next
    elif k == K_RET:
        d = P.vm_read_u64(pid, v[P.RSP])
        if d is None:
            return False
        v[P.RIP] = d
        v[P.RSP] = (v[P.RSP] + 8 + plan.imm) & M64
    elif k == K_IND:
        return _indirect(plan, v, pid)
    return True


def _indirect(plan: Plan, v, pid: int) -> bool:
    """K_IND: jmp/call through a register or a memory operand."""
    if plan.ind_mem is not None:
        base, index, scale, disp = plan.ind_mem
        ea = disp
        if base == -2:
            ea += plan.next           # rip-relative
        elif base >= 0:
            ea += v[base]
        if index >= 0:
            ea += v[index] * scale
        target = P.vm_read_u64(pid, ea & M64)
        if target is None:
            return False
    else:
        target = v[plan.ind_reg]
    if plan.ind_is_call:
        sp = (v[P.RSP] - 8) & M64
        if not P.vm_write_u64(pid, sp, plan.next):
            return False
        v[P.RSP] = sp
    v[P.RIP] = target
    return True
