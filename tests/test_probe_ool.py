"""Instruction plans of the probe engine (no process needed): classification, out-of-line
slots with re-targeted rip-relative operands, jcc conditions and sub flags."""

from __future__ import annotations

import capstone
import pytest

from ubpf_py.errors import NotSupportedError
from ubpf_py.probe import ool as O
from ubpf_py.probe import ptrace as P

MD = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
MD.detail = True


@pytest.mark.parametrize("code,kind,extra", [
    (b"\xf3\x0f\x1e\xfa", O.K_SKIP, {}),
    (b"\x0f\x1f\x44\x00\x00", O.K_SKIP, {}),
    (b"\x55", O.K_PUSH, {"reg": P.RBP}),
    (b"\x41\x57", O.K_PUSH, {"reg": P.R15}),
    (b"\x48\x89\xe5", O.K_MOVRBP, {}),
    (b"\x48\x83\xec\x18", O.K_SUBRSP, {"imm": 0x18}),
    (b"\x48\x81\xec\x00\x01\x00\x00", O.K_SUBRSP, {"imm": 0x100}),
    (b"\xeb\x05", O.K_JMP, {"target": 0x1007}),
    (b"\xe9\x00\x01\x00\x00", O.K_JMP, {"target": 0x1105}),
    (b"\x74\x05", O.K_JCC, {"target": 0x1007, "cond": 4}),
    (b"\x0f\x8f\x10\x00\x00\x00", O.K_JCC, {"target": 0x1016, "cond": 15}),
    (b"\xe8\x10\x00\x00\x00", O.K_CALL, {"target": 0x1015}),
    (b"\xc3", O.K_RET, {"imm": 0}),
    (b"\xc2\x10\x00", O.K_RET, {"imm": 16}),
    (b"\xff\xd0", O.K_IND, {"ind_is_call": True, "ind_reg": P.RAX}),
    (b"\xff\x25\x10\x00\x00\x00", O.K_IND, {"ind_is_call": False, "ind_mem": (-2, -1, 1, 0x10)}),
    (b"\x8d\x04\x37", O.K_OOL, {"rip_rel": False}),
    (b"\x48\x8b\x05\x10\x00\x00\x00", O.K_OOL, {"rip_rel": True, "disp_off": 3}),
    (b"\x0f\x05", O.K_OOL, {}),
])
def test_analyze(code, kind, extra):
    plan = O.analyze(code + b"\x90" * 8, 0x1000)
    assert plan.kind == kind and plan.length == len(code) and plan.next == 0x1000 + len(code)
    for k, v in extra.items():
        assert getattr(plan, k) == v, k


@pytest.mark.parametrize("code", [b"\xcc", b"\xcd\x80", b"\x0f\x34"])
def test_refused(code):
    with pytest.raises(NotSupportedError):
        O.analyze(code + b"\x90" * 8, 0x1000)


@pytest.mark.parametrize("slot", [0x1000 - 0x7000_0000, 0x1000 + 0x12345678, 0x1000 + 64])
def test_slot_retargets_rip_relative_and_jumps_back(slot):
    addr = 0x7F00_0000_1000
    slot += addr - 0x1000
    code = b"\x48\x8b\x05\x10\x00\x00\x00"          # mov rax, [rip+0x10]
    plan = O.analyze(code, addr)
    data = O.slot_code(plan, slot, plan.disp_off)
    insns = list(MD.disasm(data, slot))
    first, back = insns[0], insns[1]
    mem = first.operands[1].mem
    assert mem.base == capstone.x86.X86_REG_RIP
    assert slot + first.size + mem.disp == addr + 7 + 0x10      # same absolute operand
    assert back.mnemonic == "jmp" and back.operands[0].imm == addr + 7


def test_slot_out_of_reach():
    plan = O.analyze(b"\x48\x8b\x05\x10\x00\x00\x00", 0x1000)
    with pytest.raises(NotSupportedError):
        O.slot_code(plan, 0x1000 + (3 << 31), plan.disp_off)


def test_far_slot_uses_absolute_jump_back():
    plan = O.analyze(b"\x8d\x04\x37", 0x1000)
    data = O.slot_code(plan, 0x1000 + (3 << 31), 0)
    assert data[3:9] == b"\xff\x25\x00\x00\x00\x00" and int.from_bytes(data[9:17], "little") == 0x1003


@pytest.mark.parametrize("cond,flags,taken", [
    (4, O.ZF, True), (4, 0, False), (5, 0, True),            # je / jne
    (2, O.CF, True), (7, O.CF, False), (7, 0, True),           # jb / ja
    (12, O.SF, True), (12, O.SF | O.OF, False),                # jl
    (15, 0, True), (15, O.ZF, False), (14, O.ZF, True),        # jg / jle
])
def test_conditions(cond, flags, taken):
    assert O.cond_true(cond, flags, 0) is taken


def test_rcx_conditions():
    assert O.cond_true(16, 0, 0) and not O.cond_true(16, 0, 1)
    assert O.cond_true(17, 0, 1 << 32)                          # jecxz looks at ecx only
    assert O.cond_true(18, 0, 3) and not O.cond_true(18, 0, 0)


@pytest.mark.parametrize("a,b,res,set_,clear", [
    (0x18, 0x18, 0, O.ZF | O.PF, O.CF | O.SF | O.OF),
    (0x10, 0x18, (0x10 - 0x18) % (1 << 64), O.CF | O.SF | O.AF, O.ZF | O.OF),
    (1 << 63, 1, (1 << 63) - 1, O.OF | O.PF | O.AF, O.CF | O.SF | O.ZF),
    (0x7FFF_FFFF_E000, 0x28, 0x7FFF_FFFF_DFD8, O.AF, O.CF | O.ZF | O.SF | O.OF),
])
def test_sub_flags(a, b, res, set_, clear):
    r, fl = O.sub_flags(0x202, a, b)
    assert r == res
    assert fl & set_ == set_ and fl & clear == 0
    assert fl & 0x200                                           # IF untouched
