"""Detach helpers of the in-target path: return addresses to put back, threads inside trampolines."""

from __future__ import annotations

import ctypes
import shutil
import struct

import pytest
from intarget_harness import Harness, build_lib

from ubpf_py.abi.runtime import PB_F_RETURN, SHADOW_ENTRY, THREAD_BLOCK
from ubpf_py.intarget.sites import plan_site
from ubpf_py.intarget.trampoline import build_entry_trampoline, displaced_offset, fsgsbase_available
from ubpf_py.intarget.unpatch import (
    EntryTrampoline,
    ReturnFix,
    find_thread_block,
    is_busy,
    locate,
    return_fixes,
)

RET_TRAMP = 0x7000_0000


class Memory:
    """A sparse little-endian memory for the pure helpers."""

    def __init__(self) -> None:
        self.words: dict[int, int] = {}

    def put(self, addr: int, value: int) -> None:
        self.words[addr] = value

    def read(self, addr: int, n: int) -> bytes:
        assert n == 8
        return struct.pack("<Q", self.words.get(addr, 0))


def _block(mem: Memory, tb: int, entries: list[tuple[int, int]]) -> None:
    """Thread block ``tb`` whose shadow stack holds (ret_addr, rsp) entries, oldest first."""
    mem.put(tb + THREAD_BLOCK.off("shadow_depth"), len(entries))
    for i, (ret, rsp) in enumerate(entries):
        e = tb + THREAD_BLOCK.off("shadow") + i * SHADOW_ENTRY.size
        mem.put(e + SHADOW_ENTRY.off("ret_addr"), ret)
        mem.put(e + SHADOW_ENTRY.off("rsp"), rsp)


def test_return_fixes_rules():
    mem, tb = Memory(), 0x10000
    _block(mem, tb, [
        (0x401000, 0x7ff0),        # live, replaced: fix
        (0x402000, 0x7f00),        # longjmp'd over; its slot was reused by the newer entry below
        (0x403000, 0x7e00),        # dead, slot overwritten since: leave alone
        (0x404000, 0x7f00),        # newest owner of 0x7f00
        (0x405000, 0x7d00),        # tail call: the older entry of 0x7d00 has the real address ...
        (RET_TRAMP, 0x7d00),       # ... this chained one holds the trampoline's own address
    ])
    for slot in (0x7ff0, 0x7f00, 0x7d00):
        mem.put(slot, RET_TRAMP)
    mem.put(0x7e00, 0x1234)
    fixes = return_fixes(mem.read, tb, RET_TRAMP)
    assert sorted(fixes, key=lambda f: f.addr) == [
        ReturnFix(0x7d00, 0x405000), ReturnFix(0x7f00, 0x404000), ReturnFix(0x7ff0, 0x401000)]


def test_locate_in_entry_trampoline():
    code = bytes.fromhex("554889e5488d0477")                 # push rbp; mov rbp,rsp; lea rax,[rdi+rsi*2]
    site = 0x401000

    def read(a: int, n: int) -> bytes:
        return code[a - site:a - site + n]

    plan = plan_site(read, site, site + len(code), site)
    t = 0x500000
    tramp = build_entry_trampoline(plan, t, runtime_header=1, site_block=2, return_trampoline=3)
    entries = [EntryTrampoline(t, len(tramp), plan)]
    assert locate(0x600000, entries, (0x700000, 64)) is None
    assert locate(0x700010, entries, (0x700000, 64)).kind == "return"
    assert locate(t, entries, (0x700000, 64)).resume_at == site
    mid = locate(t + 40, entries, (0x700000, 64))
    assert mid.resume_at is None and mid.exits == (plan.resume,)
    d = t + displaced_offset()
    assert locate(d, entries, (0x700000, 64)).resume_at == site
    assert locate(d + 1, entries, (0x700000, 64)).resume_at == site + 1       # mov rbp, rsp
    assert locate(d + 4, entries, (0x700000, 64)).resume_at == site + 4       # lea
    assert locate(d + 8, entries, (0x700000, 64)).resume_at == plan.resume    # the jump back
    assert locate(d + 2, entries, (0x700000, 64)).resume_at is None


@pytest.mark.skipif(shutil.which("gcc") is None or not fsgsbase_available(), reason="needs gcc and rdfsbase")
def test_fixes_from_a_live_recursion(tmp_path):
    """At the entry of c_rec(1), called down from c_rec(5): the four outer frames hold the trampoline's
    address (c_rec(1)'s own return probe runs after the snapshot program on the same site)."""
    h = Harness(build_lib(tmp_path, "none"))
    try:
        h.probe("c_rec", [("prog_snapshot", 0), ("prog_count", PB_F_RETURN)])
        assert h.fn("c_rec")(5) == 15
        assert h.global_u64("snap_taken") == 1
        snap = ctypes.string_at(h.addr("snap_tb"), THREAD_BLOCK.size)
        depth = struct.unpack_from("<Q", snap, THREAD_BLOCK.off("shadow_depth"))[0]
        assert depth == 4
        slots = [h.global_u64("snap_slots", i) for i in range(depth)]
        tb = next(iter(h.thread_blocks()))
        entries = [struct.unpack_from("<QQQ", snap, THREAD_BLOCK.off("shadow") + i * SHADOW_ENTRY.size)
                   for i in range(depth)]

        def read(addr: int, n: int) -> bytes:
            if tb <= addr < tb + THREAD_BLOCK.size:
                return snap[addr - tb:addr - tb + n]
            return struct.pack("<Q", slots[[e[1] for e in entries].index(addr)])

        assert is_busy(read, tb)                     # the snapshot was taken inside a program
        assert not is_busy(h.read, tb)
        fixes = return_fixes(read, tb, h.ret_tramp)
        assert len(fixes) == depth and all(v == h.ret_tramp for v in slots)
        start, end = h.func("c_rec")
        inner = [f for f in fixes if start <= f.value < end]     # returns into c_rec itself
        assert len(inner) == depth - 1 and len({f.value for f in inner}) == 1
        assert [f.value for f in fixes if f not in inner] == [entries[0][0]]
    finally:
        h.unpatch_all()


@pytest.mark.skipif(shutil.which("gcc") is None or not fsgsbase_available(), reason="needs gcc and rdfsbase")
def test_find_thread_block(tmp_path):
    h = Harness(build_lib(tmp_path, "none"))
    try:
        h.probe("asm_push", [("prog_record", 0)])
        h.fn("asm_push")(1, 2)
        fs = ctypes.c_uint64()
        libc = ctypes.CDLL(None)
        assert libc.syscall(158, 0x1003, ctypes.byref(fs)) == 0      # arch_prctl(ARCH_GET_FS)
        assert find_thread_block(h.read, h.arena, fs.value) == h.global_u64("seen_frame", 2)
        assert find_thread_block(h.read, h.arena, fs.value ^ 0x1000) is None
        assert find_thread_block(h.read, h.arena, 0) is None
    finally:
        h.unpatch_all()
