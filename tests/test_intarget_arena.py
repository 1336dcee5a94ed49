"""SharedArena: one memfd, same bytes wherever it is mapped, fixed addresses, bump allocation."""

from __future__ import annotations

import itertools
import mmap
import os
import threading

import pytest

from ubpf_py.abi.runtime import RUNTIME_HEADER, RUNTIME_MAGIC
from ubpf_py.intarget.arena import ArenaError, SharedArena


def test_header_reserved_and_filled():
    with SharedArena(1 << 20) as a:
        w = a.header.view.cast("Q")
        assert w[RUNTIME_HEADER.word("magic")] == RUNTIME_MAGIC
        assert w[RUNTIME_HEADER.word("arena_base")] == a.addr
        assert w[RUNTIME_HEADER.word("arena_size")] == 1 << 20
        b = a.alloc(8)
        assert b.addr >= a.addr + RUNTIME_HEADER.size


def test_second_mapping_of_the_fd_sees_the_same_bytes():
    with SharedArena(1 << 20) as a:
        b = a.alloc(100, align=64)
        assert b.addr % 64 == 0
        b.view[0:5] = b"hello"
        b.array[5] = 33
        with open(f"/proc/self/fd/{a.fd}", "r+b") as f:
            m = mmap.mmap(f.fileno(), 1 << 20, mmap.MAP_SHARED)
            off = b.addr - a.addr
            assert m[off:off + 6] == b"hello!"
            m[off:off + 1] = b"J"
            m.close()
        assert bytes(b.view[0:6]) == b"Jello!"
        assert os.pread(a.fd, 6, b.addr - a.addr) == b"Jello!"


def test_fixed_address_and_conflict():
    with SharedArena(1 << 20) as a:
        b = None
        for step in range(1, 16):   # mmap grows down: addresses well below are usually free
            hint = a.addr - (step << 28)
            try:
                b = SharedArena(1 << 20, addr_hint=hint)
                break
            except ArenaError:
                continue
        assert b is not None
        with b:
            assert b.addr == hint
            with pytest.raises(ArenaError, match=r"taken|choose another"):
                SharedArena(1 << 20, addr_hint=hint)


def test_full_and_bad_args():
    with SharedArena(1 << 16) as a:
        with pytest.raises(ArenaError, match="arena full"):
            a.alloc(1 << 17)
        with pytest.raises(ValueError):
            a.alloc(8, align=3)
    with pytest.raises(ArenaError, match="multiple"):
        SharedArena(1000)


def test_concurrent_allocations_do_not_overlap():
    with SharedArena(1 << 22) as a:
        got: list[tuple[int, int]] = []
        lock = threading.Lock()

        def work():
            mine = [a.alloc(24 + i % 40, align=8) for i in range(500)]
            with lock:
                got.extend((b.addr, b.size) for b in mine)

        ts = [threading.Thread(target=work) for _ in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        got.sort()
        assert len(got) == 2000
        for (a1, s1), (a2, _s2) in itertools.pairwise(got):
            assert a1 + s1 <= a2
