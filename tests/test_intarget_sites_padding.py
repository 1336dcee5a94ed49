"""Short functions: the 5-byte jump may overlap the alignment padding after a function when that
padding is only NOPs/int3 up to the next function and the function ends by leaving (ret/jmp)."""

from __future__ import annotations

import pytest

from ubpf_py.intarget.sites import SiteRefused, plan_site, relocate

BASE = 0x401000
LEA_RET = bytes.fromhex("8d0437c3")             # lea eax,[rdi+rsi]; ret  (4 bytes)


def reader(code: bytes):
    def read(addr: int, n: int) -> bytes:
        off = addr - BASE
        return code[off:off + n]
    return read


@pytest.mark.parametrize("padding", [b"\x90" * 12, b"\xcc" * 12, bytes.fromhex("66 0f 1f 84 00 00 00 00 00 90 90 90")])
def test_short_function_followed_by_padding_is_patched(padding):
    code = LEA_RET + padding
    plan = plan_site(reader(code), BASE, BASE + 4, BASE, pad_end=BASE + len(code))
    assert plan.length == 5 and [d.text.split()[0] for d in plan.insns] == ["lea", "ret"]
    assert "padding" in plan.note
    assert relocate(plan, 0x500000) == LEA_RET        # position-independent: copied as is, ends with ret


def test_short_function_without_padding_is_refused():
    code = LEA_RET + bytes.fromhex("4883ec08")       # the next function starts right away
    with pytest.raises(SiteRefused, match="too short"):
        plan_site(reader(code), BASE, BASE + 4, BASE, pad_end=BASE + 4)


def test_padding_must_be_nops_only():
    code = LEA_RET + bytes.fromhex("4883ec08") + b"\x90" * 8     # code, not padding, after the end
    with pytest.raises(SiteRefused, match="too short"):
        plan_site(reader(code), BASE, BASE + 4, BASE, pad_end=BASE + len(code))


def test_short_function_must_end_by_leaving():
    code = bytes.fromhex("8d0437") + b"\x90" * 13            # lea, then falls into the padding
    with pytest.raises(SiteRefused, match="too short"):
        plan_site(reader(code), BASE, BASE + 3, BASE, pad_end=BASE + len(code))


def test_branch_into_the_covered_bytes_is_refused():
    # 2-byte function: jmp back to itself+1?  a short jump to BASE+1 from inside the function
    code = bytes.fromhex("eb ff") + b"\x90" * 14              # jmp BASE+1 (lands inside the patch)
    with pytest.raises(SiteRefused):
        plan_site(reader(code), BASE, BASE + 2, BASE, pad_end=BASE + len(code))
