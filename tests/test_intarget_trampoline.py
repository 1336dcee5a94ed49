"""Probe sites and trampolines of the in-target path, run inside this test process.

The site planner is checked against every refusal reason and every relocation kind;
the trampolines are patched into a C library loaded with ctypes (see
tests/intarget_harness.py) and checked for unchanged results, exact pt_regs, preserved
registers, flags and red zone, return probes (value, ip, recursion, longjmp, a full
shadow stack), exact counts from 8 threads, and the busy guard against signal handlers.
"""

from __future__ import annotations

import ctypes
import faulthandler
import os
import resource
import shutil
import signal
import struct
import subprocess

import capstone
import pytest
from intarget_harness import Harness, build_lib, set_u64, u64

from ubpf_py.abi.kernel import PT_REGS, USER_CS, USER_SS
from ubpf_py.abi.runtime import (
    CACHE_LINE,
    PB_F_RETURN,
    PROBE_BLOCK,
    RUNTIME_HEADER,
    SHADOW_DEPTH,
    THREAD_BLOCK,
)
from ubpf_py.intarget.sites import SiteRefused, is_go_binary, plan_site, relocate
from ubpf_py.intarget.space import GATE_OFFSET
from ubpf_py.intarget.trampoline import fsgsbase_available, patch_bytes, return_bug_offset, thread_slot_index

pytestmark = [pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc"),
              pytest.mark.skipif(not fsgsbase_available(), reason="the CPU or kernel does not allow rdfsbase")]

_md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
_md.detail = True
R = {name: PT_REGS.word(name) for name in PT_REGS.offsets}


@pytest.fixture(scope="module")
def libs(tmp_path_factory):
    d = tmp_path_factory.mktemp("intarget")
    return {cf: build_lib(d, cf) for cf in ("none", "full")}


@pytest.fixture(scope="module")
def harnesses(libs):
    return {cf: Harness(path) for cf, path in libs.items()}


@pytest.fixture
def h(harnesses):
    hn = harnesses["none"]
    yield hn
    hn.unpatch_all()


@pytest.fixture(params=["none", "full"])
def hcf(request, harnesses):
    hn = harnesses[request.param]
    yield hn
    hn.unpatch_all()


def reset(h: Harness) -> None:
    h.set_global("prog_calls", 0)


# --- refusals -------------------------------------------------------------------------------------

@pytest.mark.parametrize("func, reason", [
    ("asm_short", "too short for a 5-byte jump"),
    ("asm_jmpback", "jumps into the patched bytes"),
    ("asm_early_ret", "control leaves the function"),
    ("asm_syscall", "a syscall instruction"),
    ("asm_int3", "an int3"),
    ("asm_loop", "jumps into the patched bytes"),
])
def test_refusals_on_real_code(h, func, reason):
    with pytest.raises(SiteRefused, match=reason):
        h.plan(func)


def test_refused_site_not_on_boundary_or_outside(h):
    start, end = h.func("asm_push")
    with pytest.raises(SiteRefused, match="not an instruction boundary"):
        plan_site(h.read, start, end, start + 2)
    with pytest.raises(SiteRefused, match="outside its function"):
        plan_site(h.read, start, end, end + 1)


def test_unknown_size(h):
    start, _ = h.func("asm_nop5")
    plan = plan_site(h.read, start, 0, start)
    assert "size unknown" in plan.note
    start, _ = h.func("asm_jcc")
    with pytest.raises(SiteRefused, match="size is unknown and the patched bytes hold a branch"):
        plan_site(h.read, start, 0, start)


def _synthetic(code: bytes, addr: int = 0x400000):
    def read(a: int, n: int) -> bytes:
        return code[a - addr:a - addr + n]
    return read, addr, addr + len(code)


@pytest.mark.parametrize("code, reason", [
    (bytes.fromhex("06") + b"\x90" * 8, "cannot decode"),                       # push es: invalid in 64-bit
    (bytes.fromhex("c7f800000000") + b"\x90" * 4, "cannot be relocated"),       # xbegin rel32
    (bytes.fromhex("ff542408") + b"\x90" * 4, "indirect call"),                 # call [rsp+8]
    (bytes.fromhex("0f0b") + b"\x90" * 6, "ud2"),
    (bytes.fromhex("8b0500000000") + b"\x90" * 4 + bytes.fromhex("ebf8"), "jumps into the patched bytes"),
    (bytes.fromhex("fa") + b"\x90" * 8, "cannot be relocated"),                  # cli: privileged
    (bytes.fromhex("cd80") + b"\x90" * 8, "software interrupt"),                   # int 0x80
    (bytes.fromhex("ffd0") + b"\x90" * 8, "would return into the patched bytes"),  # call rax; nops
    (bytes.fromhex("4889f84801f006c3"), "cannot decode the function"),            # push es after the patch
    # mov rax,rdi; add rax,rsi; loop back to the add (capstone files loop under no jump group)
    (bytes.fromhex("4889f84801f0e2fbc3"), "jumps into the patched bytes"),
])
def test_refusals_synthetic(code, reason):
    read, start, end = _synthetic(code)
    with pytest.raises(SiteRefused, match=reason):
        plan_site(read, start, end, start)


def test_displaced_call_refused_under_cpu_shadow_stack(h):
    start, end = h.func("asm_call")
    assert plan_site(h.read, start, end, start).insns[0].kind == "call"
    with pytest.raises(SiteRefused, match="shadow stack"):
        plan_site(h.read, start, end, start, shadow_stack=True)


def test_extra_ranges_are_scanned():
    # a "foo.cold" part jumping back into foo's first bytes
    foo = b"\x48\x89\xf8" + b"\x48\x01\xf0" + b"\xc3"                    # mov rax,rdi; add rax,rsi; ret
    read, start, end = _synthetic(foo + b"\xe9" + struct.pack("<i", -(len(foo) + 5) + 3))
    plan_site(read, start, start + len(foo), start)
    with pytest.raises(SiteRefused, match="jumps into"):
        plan_site(read, start, start + len(foo), start, extra_ranges=[(start + len(foo), end)])


# --- relocations -----------------------------------------------------------------------------------

def _decode(code: bytes, at: int):
    return list(_md.disasm(code, at))


@pytest.mark.parametrize("func", ["asm_push", "asm_endbr", "asm_nop5", "asm_riprel", "asm_jcc", "asm_call",
                                  "asm_callreg", "asm_loopfar", "asm_jrcxz"])
def test_relocation_keeps_meaning(h, func):
    plan = h.plan(func)
    at = plan.site + 0x7000_0000
    code = relocate(plan, at)
    insns = _decode(code, at)
    assert sum(i.size for i in insns) == len(code)
    kinds = [d.kind for d in plan.insns]
    for d, new in zip(plan.insns, insns, strict=False):   # one-to-one up to the first call
        if d.kind == "riprel":
            orig = _decode(d.raw, d.addr)[0]
            assert new.address + new.size + new.disp == orig.address + orig.size + orig.disp
            assert new.bytes[:orig.disp_offset] == orig.bytes[:orig.disp_offset]
    if func == "asm_riprel":
        i = insns[0]
        assert i.address + i.size + i.disp == h.addr("asm_global")
    if "jcc" in kinds:
        jz = next(i for i in insns if i.mnemonic == "je")
        assert jz.size == 6 and jz.operands[0].imm == plan.insns[-1].target
    if "call" in kinds or "call_reg" in kinds:
        # push imm32 + mov dword [rsp+4]: the ORIGINAL return address, then a jump to the callee
        push, mov, jmp = insns[-3:]
        lo = push.operands[0].imm & 0xFFFFFFFF
        hi = mov.operands[1].imm & 0xFFFFFFFF
        assert (hi << 32 | lo) == plan.resume and jmp.mnemonic == "jmp"
    if "loop" in kinds:
        short, over, far = insns[-4:-1]
        assert short.mnemonic in ("loop", "jrcxz") and short.operands[0].imm == far.address
        assert over.mnemonic == "jmp" and over.operands[0].imm == insns[-1].address
        assert far.operands[0].imm == plan.insns[-1].target
    if plan.falls_through:
        assert insns[-1].mnemonic == "jmp" and insns[-1].operands[0].imm == plan.resume
    assert bool(plan.exits()) == (func != "asm_callreg")    # an indirect call's target is dynamic


def test_relocation_synthetic_forms():
    """call [rip+d], a near jcc, a 5-byte tail-call jmp and ``bnd jmp`` keep their targets."""
    at = 0x4000_0000
    # call qword ptr [rip+0x100]; ret
    read, start, end = _synthetic(bytes.fromhex("ff1500010000c3"))
    plan = plan_site(read, start, end, start)
    push, mov, jmp = _decode(relocate(plan, at), at)
    assert (mov.operands[1].imm << 32 | push.operands[0].imm & 0xFFFFFFFF) == start + 6
    assert jmp.mnemonic == "jmp" and jmp.address + jmp.size + jmp.disp == start + 6 + 0x100
    # jne rel32 (+0x20); nop; ret  (padded so the target is inside the function)
    code = bytes.fromhex("0f8520000000") + b"\x90" * 0x20 + b"\xc3"
    read, start, end = _synthetic(code)
    plan = plan_site(read, start, end, start)
    jne, back = _decode(relocate(plan, at), at)
    assert jne.mnemonic == "jne" and jne.operands[0].imm == start + 6 + 0x20 and back.operands[0].imm == start + 6
    for code in (bytes.fromhex("e9fb0f0000"), bytes.fromhex("f2e9fa0f0000")):   # jmp / bnd jmp +0x1000
        read, start, end = _synthetic(code)
        plan = plan_site(read, start, end, start)
        assert not plan.falls_through
        (jmp,) = _decode(relocate(plan, at), at)
        assert jmp.operands[0].imm == start + 0x1000


def test_relocation_out_of_reach(h):
    plan = h.plan("asm_riprel")
    with pytest.raises(SiteRefused, match="out of"):
        relocate(plan, plan.site + (3 << 30))
    with pytest.raises(SiteRefused, match="out of"):
        patch_bytes(plan.site, plan.site + (3 << 30), plan.length)


def test_patch_bytes_pad_with_nops():
    code = patch_bytes(0x1000, 0x2000, 13)
    insns = _decode(code, 0x1000)
    assert insns[0].mnemonic == "jmp" and insns[0].operands[0].imm == 0x2000
    assert all(i.mnemonic == "nop" for i in insns[1:]) and sum(i.size for i in insns) == 13


def test_is_go_binary_on_the_corpus_go_target():
    from paths import BUILD
    go = BUILD / "go_args"
    if not go.exists():
        pytest.skip(f"corpus Go target not built at {go}")
    assert is_go_binary(str(go))


def test_is_go_binary(libs, tmp_path):
    assert not is_go_binary(str(libs["none"]))
    fake = tmp_path / "go.so"
    empty = tmp_path / "empty"
    empty.write_bytes(b"\0" * 16)
    subprocess.run(["objcopy", "--add-section", f".go.buildinfo={empty}", str(libs["none"]), str(fake)],
                   check=True)
    assert is_go_binary(str(fake))
    assert not is_go_binary(str(tmp_path / "missing"))


# --- entry trampolines in this process ---------------------------------------------------------------

CASES = [
    ("asm_push", (5, 7), 19), ("asm_endbr", (50, 7), 43), ("asm_nop5", (5, 7), 12),
    ("asm_riprel", (5,), 1005), ("asm_jcc", (0,), 22), ("asm_jcc", (3,), 11),
    ("asm_call", (5,), 11), ("asm_callreg", (5, "asm_callee"), 12),
    ("asm_loopfar", (1,), 1), ("asm_loopfar", (5,), 2), ("asm_jrcxz", (0,), 2), ("asm_jrcxz", (3,), 1),
]


@pytest.mark.parametrize("func, args, result", CASES)
def test_entry_probe_results_and_pt_regs(h, func, args, result):
    args = tuple(h.addr(a) if isinstance(a, str) else a for a in args)
    f = h.fn(func, len(args))
    assert f(*args) == result
    reset(h)
    site = h.probe(func, [("prog_record", 0)])
    h.set_global("callee_ret_addr", 0)
    assert f(*args) == result
    assert h.global_u64("prog_calls") == 1
    assert h.counter(site.probes[0], "hits") == 1 and h.counter(site.probes[0], "missed") == 0
    regs = [h.global_u64("seen_regs", i) for i in range(21)]
    for name, value in zip(("rdi", "rsi"), args, strict=False):
        assert regs[R[name]] == value
    assert regs[R["rip"]] == site.plan.site
    assert regs[R["cs"]] == USER_CS and regs[R["ss"]] == USER_SS and regs[R["orig_rax"]] == 2**64 - 1
    frame = [h.global_u64("seen_frame", i) for i in range(4)]
    assert frame[1] == site.probes[0] and frame[3] == h.arena and frame[2] in h.thread_blocks()
    assert frame[0] == frame[2] + h.slot_size - PT_REGS.size   # pt_regs tops the runtime stack
    if func.startswith("asm_call"):
        assert h.global_u64("callee_ret_addr") == site.plan.resume


@pytest.mark.parametrize("args", [(3, 4, 5, 6, 7, 8), (8, 9, 10, 11, 12, 13)])
def test_c_functions_both_cf_protection(hcf, args):
    f = hcf.fn("c_mix", 6)
    want = f(*args)
    reset(hcf)
    site = hcf.probe("c_mix", [("prog_record", 0)])
    assert site.plan.insns[0].text.startswith("endbr64") == ("full" in hcf.path.name)
    assert f(*args) == want
    regs = [hcf.global_u64("seen_regs", i) for i in range(21)]
    assert [regs[R[n]] for n in ("rdi", "rsi", "rdx", "rcx", "r8", "r9")] == list(args)
    assert hcf.global_u64("prog_calls") == 1


def test_registers_flags_and_pt_regs_exact(h):
    site = h.probe("regs_check", [("prog_record", 0), ("prog_record", 0)], site="regs_site")
    reset(h)
    h.fn("regs_check")()
    assert h.global_u64("prog_calls") == 2
    assert all(h.counter(pb, "hits") == 1 for pb in site.probes)
    order = ["rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"]
    rsp = h.global_u64("regs_rsp")
    after = {n: h.global_u64("regs_after", i) for i, n in enumerate(order)}
    seen = [h.global_u64("seen_regs", i) for i in range(21)]
    for i, n in enumerate(order):
        want = rsp if n == "rsp" else 0x1111111111111100 + i
        assert after[n] == want, n
        assert seen[R[n]] == want, n
    flags = 0xCD7 | 0x200
    assert h.global_u64("regs_flags_after") == flags
    assert seen[R["eflags"]] == flags
    assert seen[R["rip"]] == h.addr("regs_site")


def test_red_zone_untouched(h):
    f = h.fn("rz_func", 1)
    h.probe("rz_func", [("prog_record", 0)], site="rz_site")
    reset(h)
    for v in (1, 0x123456789, 2**60 + 5):
        assert f(v) == 3 * v % 2**64
    assert h.global_u64("prog_calls") == 3


def test_no_red_zone_variant_uses_56_bytes(h):
    """For Go (no red zone): data 64+ bytes below rsp survives, data 8 bytes below does not."""
    far = h.fn("rz_far", 1)
    site = h.probe("rz_far", [("prog_record", 0)], site="rz_far_site", red_zone=False)
    reset(h)
    assert far(21) == 42
    assert h.global_u64("seen_regs", PT_REGS.word("rip")) == site.plan.site
    h.probe("rz_func", [("prog_record", 0)], site="rz_site", red_zone=False)
    assert h.fn("rz_func", 1)(5) != 15
    assert h.global_u64("prog_calls") == 2


def test_disabled_probe_and_no_program(h):
    site = h.probe("asm_push", [("prog_record", 0), (None, 0)])
    reset(h)
    set_u64(site.probes[0] + PROBE_BLOCK.off("enabled"), 0)
    f = h.fn("asm_push")
    assert f(1, 2) == 5
    assert h.global_u64("prog_calls") == 0
    assert h.counter(site.probes[0], "hits") == 0 and h.counter(site.probes[1], "hits") == 1


def _has_rdpid() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " rdpid" in line for line in f)
    except OSError:
        return False


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2 or not _has_rdpid(), reason="needs 2 CPUs and rdpid")
def test_per_cpu_hit_counters_are_a_cache_line_apart(h):
    """With ``pcpu_hits`` set, a hit counts on the line of the CPU it runs on (rdpid & mask),
    CACHE_LINE bytes apart: threads calling a probed function on two CPUs share no written line
    (the multi-thread benchmark's scaling depends on it); the shared ``hits`` word stays 0."""
    import threading

    site = h.probe("asm_nop5", [("prog_count", 0)])
    reset(h)
    pb = site.probes[0]
    lines = 4
    counters = h._alloc(lines * CACHE_LINE)
    set_u64(pb + PROBE_BLOCK.off("pcpu_mask"), lines - 1)
    set_u64(pb + PROBE_BLOCK.off("pcpu_hits"), counters)
    cpus = sorted(os.sched_getaffinity(0))[:2]
    f = h.fn("asm_nop5", 2)
    calls = {cpu: 5_000 + 1_000 * i for i, cpu in enumerate(cpus)}

    def run(cpu: int) -> None:
        os.sched_setaffinity(0, {cpu})       # this thread only
        for i in range(calls[cpu]):
            f(i, 1)

    threads = [threading.Thread(target=run, args=(c,)) for c in cpus]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    want = [0] * lines
    for cpu in cpus:
        want[cpu & (lines - 1)] += calls[cpu]
    assert [u64(counters + i * CACHE_LINE) for i in range(lines)] == want
    assert h.counter(pb, "hits") == 0 and h.global_u64("prog_calls") == sum(calls.values())


def test_closed_gate_runs_and_counts_nothing(h):
    """A fork child sees the gate word zero (its page is MADV_WIPEONFORK): entry and return
    probes run no program and count nothing (the arena is the parent's), results unchanged."""
    site = h.probe("c_rec", [("prog_count", 0), ("prog_count", PB_F_RETURN)])
    reset(h)
    set_u64(h.arena + GATE_OFFSET, 0)
    try:
        assert h.fn("c_rec")(20) == 210
    finally:
        set_u64(h.arena + GATE_OFFSET, 1)
    assert h.global_u64("prog_calls") == 0
    assert [h.counter(pb, k) for pb in site.probes for k in ("hits", "missed")] == [0, 0, 0, 0]
    assert h.fn("c_rec")(20) == 210 and h.global_u64("prog_calls") == 42


def test_eight_threads_exact(h):
    site = h.probe("asm_nop5", [("prog_count", 0)])
    reset(h)
    n, calls = 8, 100_000
    total = h.fn("run_threads")(n, ctypes.c_uint64(calls))
    assert total == n * (calls * (calls - 1) // 2 + calls)
    assert h.global_u64("prog_calls") == n * calls
    assert h.counter(site.probes[0], "hits") == n * calls
    assert h.counter(site.probes[0], "missed") == 0
    keys = [u64(b + THREAD_BLOCK.off("key")) for b in h.thread_blocks()]
    assert len(set(keys)) == len(keys) and all(u64(b + THREAD_BLOCK.off("busy")) == 0
                                               for b in h.thread_blocks())


def test_signal_handler_while_busy_is_missed(h):
    h.fn("install_handler")()
    site = h.probe("asm_nop5", [("prog_record", 0)])
    reset(h)
    h.set_global("raise_in_prog", 1)
    h.set_global("handler_result", 0)
    assert h.fn("asm_nop5")(1, 2) == 3
    assert h.global_u64("handler_result") == 42       # the handler's call ran, unprobed
    assert h.counter(site.probes[0], "hits") == 1
    assert h.counter(site.probes[0], "missed") == 1
    assert h.global_u64("prog_calls") == 1


def test_signal_storm(h):
    """Signals land at every point of the entry and return trampolines; handlers call the
    probed function too: results stay right and every call is either run or missed."""
    site = h.probe("asm_nop5", [("prog_count", 0), ("prog_count", PB_F_RETURN)])
    reset(h)
    errors = ctypes.c_uint64()
    storm = h.fn("signal_storm")
    storm.argtypes = [ctypes.c_uint64, ctypes.POINTER(ctypes.c_uint64)]
    total = storm(1_500, ctypes.byref(errors))
    assert errors.value == 0
    assert total > 1_500
    for pb in site.probes:
        assert h.counter(pb, "hits") + h.counter(pb, "missed") == total
    assert h.global_u64("prog_calls") == sum(h.counter(pb, "hits") for pb in site.probes)
    assert all(u64(b + THREAD_BLOCK.off("busy")) == 0 for b in h.thread_blocks())


def test_table_full_is_missed(h):
    """One slot, held by another thread's key: no slot for this thread, the hit is missed."""
    site = h.probe("asm_push", [("prog_record", 0)])
    slots_at = h.arena + RUNTIME_HEADER.off("thread_slots")
    saved_slots, saved_key = u64(slots_at), u64(h.table)
    try:
        set_u64(slots_at, 1)
        set_u64(h.table, 0xDEAD000)
        assert h.fn("asm_push")(1, 1) == 3
        assert h.counter(site.probes[0], "missed") == 1 and h.counter(site.probes[0], "hits") == 0
    finally:
        set_u64(slots_at, saved_slots)
        set_u64(h.table, saved_key)


def test_thread_slot_index_matches_asm(h):
    reset(h)
    h.probe("asm_push", [("prog_record", 0)])
    h.fn("asm_push")(1, 1)
    tb = h.global_u64("seen_frame", 2)
    key = u64(tb + THREAD_BLOCK.off("key"))
    i = (tb - h.table) // h.slot_size
    # linear probing: the slot is at or after the hashed one
    assert (i - thread_slot_index(key, h.slots)) % h.slots < len(h.thread_blocks())


# --- return probes --------------------------------------------------------------------------------

def _depth(h: Harness) -> int:
    return u64(h.global_u64("seen_frame", 2) + THREAD_BLOCK.off("shadow_depth"))


def test_return_probe_value_ip_and_rsp(h):
    site = h.probe("rp_func", [("prog_record", PB_F_RETURN)])
    reset(h)
    assert h.fn("call_rp")(7) == 22
    assert h.global_u64("prog_calls") == 1
    regs = [h.global_u64("seen_regs", i) for i in range(21)]
    assert regs[R["rax"]] == 22
    assert regs[R["rip"]] == h.addr("call_rp_ret")
    assert regs[R["rsp"]] == h.global_u64("call_rp_rsp")
    assert h.global_u64("seen_frame", 1) == site.probes[0]
    assert h.counter(site.probes[0], "hits") == 1 and _depth(h) == 0


def test_recursion_entry_and_return_on_one_site(hcf):
    h = hcf
    site = h.probe("c_rec", [("prog_count", 0), ("prog_count", PB_F_RETURN)])
    reset(h)
    assert h.fn("c_rec")(20) == 210
    assert h.global_u64("prog_calls") == 42
    assert h.counter(site.probes[0], "hits") == 21 and h.counter(site.probes[1], "hits") == 21


def test_shadow_stack_full_is_missed(h):
    site = h.probe("c_rec", [("prog_count", PB_F_RETURN)])
    reset(h)
    n = SHADOW_DEPTH + 10
    assert h.fn("c_rec")(n - 1) == n * (n - 1) // 2
    assert h.counter(site.probes[0], "hits") == SHADOW_DEPTH
    assert h.counter(site.probes[0], "missed") == n - SHADOW_DEPTH


def test_longjmp_over_probed_frames(h):
    site_j = h.probe("c_jumper", [("prog_count", PB_F_RETURN)])
    site_r = h.probe("rp_func", [("prog_record", PB_F_RETURN)])
    reset(h)
    for _ in range(3):
        assert h.fn("longjmp_then")(5, 4) == 13
    assert h.counter(site_j.probes[0], "hits") == 0
    assert h.counter(site_r.probes[0], "hits") == 3
    assert h.global_u64("seen_shadow_depth") == 0     # the stale entries were discarded
    assert _depth(h) == 0


def test_return_without_shadow_entry_stops_at_ud2(h):
    """Entered with no shadow entry for the frame: SIGILL at the documented ud2, never a guess."""
    assert h.read(h.ret_tramp + return_bug_offset(), 2) == b"\x0f\x0b"
    pid = os.fork()
    if pid == 0:
        try:
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            faulthandler.disable()
            ctypes.CFUNCTYPE(ctypes.c_uint64)(h.ret_tramp)()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGILL


# --- cost ------------------------------------------------------------------------------------------

def test_cost_per_probed_call(h, capsys):
    bench = h.fn("bench_ns")
    bench.argtypes = [ctypes.c_void_p, ctypes.c_uint64]
    fn = h.addr("asm_nop5")
    n, runs = 20_000, 15
    base = min(bench(fn, n) for _ in range(runs)) / n
    site = h.probe("asm_nop5", [("prog_empty", 0)])
    probed = min(bench(fn, n) for _ in range(runs)) / n
    assert h.counter(site.probes[0], "hits") == runs * n
    with capsys.disabled():
        print(f"\nin-process entry probe: {base:.1f} ns unprobed, {probed:.1f} ns probed, "
              f"+{probed - base:.1f} ns per call")
    assert probed > base


def test_threads_with_entry_and_return_probes(h):
    site = h.probe("asm_nop5", [("prog_count", 0), ("prog_count", PB_F_RETURN)])
    reset(h)
    n, calls = 4, 50_000
    assert h.fn("run_threads")(n, ctypes.c_uint64(calls)) == n * (calls * (calls - 1) // 2 + calls)
    assert h.global_u64("prog_calls") == 2 * n * calls
    assert [h.counter(pb, "hits") for pb in site.probes] == [n * calls, n * calls]
    assert all(u64(b + THREAD_BLOCK.off("shadow_depth")) == 0 for b in h.thread_blocks())


def test_cost_of_return_probe(h, capsys):
    bench = h.fn("bench_ns")
    bench.argtypes = [ctypes.c_void_p, ctypes.c_uint64]
    fn = h.addr("call_rp")
    n, runs = 20_000, 15
    base = min(bench(fn, n) for _ in range(runs)) / n
    site = h.probe("rp_func", [("prog_empty", PB_F_RETURN)])
    probed = min(bench(fn, n) for _ in range(runs)) / n
    assert h.counter(site.probes[0], "hits") == runs * n
    with capsys.disabled():
        print(f"\nin-process return probe: {base:.1f} ns unprobed, {probed:.1f} ns probed, "
              f"+{probed - base:.1f} ns per call")


def test_site_block_limits(h):
    from ubpf_py.abi.runtime import SITE_MAX_PROBES
    from ubpf_py.errors import NotSupportedError
    from ubpf_py.intarget.trampoline import site_block

    plan = h.plan("asm_push")
    assert len(site_block(plan, 0x1000, [0x2000] * SITE_MAX_PROBES)) > 0
    with pytest.raises(NotSupportedError, match="more than"):
        site_block(plan, 0x1000, [0x2000] * (SITE_MAX_PROBES + 1))
