"""trace_printk / trace_vprintk in the target: the C runtime records, the tracer formats
(intarget.printk_ring) -- the lines must be byte-identical to the Python helpers' for
every format of tests/test_printk.py."""

from __future__ import annotations

import ctypes
import os
import struct

import pytest
from intarget_fixture import make_frame, needs_runtime, tid
from test_printk import INVALID, STRINGS, STRMEM_SIZE, TRACE_CASES, VALID, Ours

from ubpf_py.abi.runtime import RUNTIME_HEADER
from ubpf_py.intarget import printk_ring, runtime_obj
from ubpf_py.intarget.arena import SharedArena
from ubpf_py.maps import consts as C
from ubpf_py.maps import create_map
from ubpf_py.obj.spec import MapSpec

pytestmark = needs_runtime
EINVAL = 22


@pytest.fixture(scope="module")
def setup():
    arena = SharedArena(32 << 20)
    ring = create_map(MapSpec("printk", C.RINGBUF, 0, 0, 1 << 20), alloc=arena)
    f = make_frame(arena)
    f.set_header("printk_ring", ring.handle_addr)
    strmem = arena.alloc(STRMEM_SIZE, 64)   # the strings in program memory, as Ours has them
    for off, data in STRINGS.items():
        strmem.view[off:off + len(data)] = data
    return runtime_obj.tracer_runtime(), f, ring, arena.alloc(4096, 64), strmem


def _arg(setup, a) -> int:
    return setup[4].addr + a[1] if isinstance(a, tuple) else a & 0xFFFFFFFFFFFFFFFF


def _c_lines(setup, fmt: bytes, args: list[int], helper: int) -> list[str]:
    rt, f, ring, work, _ = setup
    work.view[0:len(fmt) + 1] = fmt + b"\0"
    if helper == 6:
        a = [*args, 0, 0, 0][:3]
        rc = rt.helper(6)(work.addr, len(fmt) + 1, *a, f.addr)
    else:
        raw = struct.pack(f"<{len(args)}Q", *args)
        work.view[2048:2048 + len(raw)] = raw
        rc = rt.helper(177)(work.addr, len(fmt) + 1, work.addr + 2048 if args else 0, len(raw), 0, f.addr)
    assert rc == 0
    evs = list(printk_ring.events(ring.records()))
    for ev in evs:
        assert ev.tgid == os.getpid() and ev.tid == tid() and ev.uid == os.getuid()
    return [ev.text for ev in evs]


@pytest.mark.parametrize("entry", VALID + INVALID, ids=lambda e: e[0].decode("latin-1")[:40])
def test_vprintk_lines_identical(setup, entry):
    fmt, args = entry[0], entry[1]
    ours = Ours()
    a = [ours.arg(x) for x in args]
    w = ours.work
    w.view[0:len(fmt) + 1] = fmt + b"\0"
    raw = struct.pack(f"<{len(a)}Q", *a)
    w.view[512:512 + len(raw)] = raw
    ours.helpers[177](w.addr, len(fmt) + 1, w.addr + 512 if a else 0, len(raw), 0)
    assert _c_lines(setup, fmt, [_arg(setup, x) for x in args], 177) == ours.lines


@pytest.mark.parametrize("entry", TRACE_CASES + [e for e in VALID if len(e[1]) <= 3],
                         ids=lambda e: e[0].decode("latin-1")[:40])
def test_trace_printk_lines_identical(setup, entry):
    fmt, args = entry[0], entry[1]
    ours = Ours()
    ours.trace_printk(fmt, args)
    assert _c_lines(setup, fmt, [_arg(setup, x) for x in args], 6) == ours.lines


def test_vprintk_argument_checks_and_missing_ring(setup):
    rt, f, ring, work, _ = setup
    work.view[0:4] = b"%d\0\0"
    vp = rt.helper(177)
    neg = lambda e: (-e) & ((1 << 64) - 1)  # noqa: E731
    assert vp(work.addr, 3, work.addr + 512, 12, 0, f.addr) == neg(EINVAL)
    assert vp(work.addr, 3, work.addr + 512, 13 * 8, 0, f.addr) == neg(EINVAL)
    assert vp(work.addr, 3, 0, 8, 0, f.addr) == neg(EINVAL)
    f.set_header("printk_ring", 0)
    try:
        assert vp(work.addr, 3, work.addr + 512, 8, 0, f.addr) == neg(2)
    finally:
        f.set_header("printk_ring", ring.handle_addr)
    assert ring.consume() == []


def test_string_copied_at_call_time(setup):
    rt, f, ring, work, _ = setup
    s = ctypes.create_string_buffer(b"before")
    work.view[0:8] = b"s=%s\0\0\0\0"
    rt.helper(6)(work.addr, 5, ctypes.addressof(s), 0, 0, f.addr)
    s.value = b"after!"                 # changed before the tracer drains: the line keeps "before"
    assert [e.text for e in printk_ring.events(ring.records())] == ["s=before"]
    assert RUNTIME_HEADER.word("printk_ring") >= 0
