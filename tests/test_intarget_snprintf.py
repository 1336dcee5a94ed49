"""bpf_snprintf in the in-target runtime (runtime/snprintf.c) against the ptrace path's
(helpers/printk.py on printk_format.bprintf, itself checked against the kernel): random formats
built from every conversion the kernel allows (flags, widths, l/ll, %c %s %pks %pus %px %ps %pS
%pB %pI4 %pi4 %pI6 %pi6 %%) and from what it refuses, with integers, strings in program memory,
strings in the target's memory and bad pointers, into buffers of every size: the same return
value and the same bytes in the buffer (untouched on an error).  %p / %pK print a keyed hash
whose key is each side's own: checked for the kernel's shape instead."""

from __future__ import annotations

import ctypes
import os
import random
import re
import struct

import pytest
from intarget_fixture import make_frame, needs_runtime

from ubpf_py.helpers import build_helper_table
from ubpf_py.intarget import runtime_obj
from ubpf_py.intarget.arena import SharedArena
from ubpf_py.probe.hits import TargetMemory
from ubpf_py.vm.env import ExecEnv, HitContext
from ubpf_py.vm.memory import HostBuffer, MemoryMap, Region

pytestmark = needs_runtime
M64 = (1 << 64) - 1
USER = ctypes.create_string_buffer(b"user text\0", 64)       # the target's memory on both sides
STRINGS = [b"", b"a", b"hello world", b"x" * 300, "caf\u00e9".encode()]


class _Target(TargetMemory):
    """This process as the target, minus the tracer's program memory (on the ptrace path that
    lives in the tracer, not in the target, so a user read of it faults)."""

    __slots__ = ("hidden",)

    def __init__(self, hidden: HostBuffer) -> None:
        super().__init__(os.getpid())
        self.hidden = hidden

    def read_str(self, addr: int, max_size: int) -> bytes | None:
        if self.hidden.addr <= addr < self.hidden.addr + self.hidden.size:
            return None
        return super().read_str(addr, max_size)


class PySide:
    def __init__(self) -> None:
        mem = MemoryMap()
        self.buf = HostBuffer(1 << 16)
        mem.add(Region.of(self.buf, "scratch"))
        self.env = ExecEnv(memory=mem, hit=HitContext(uid=os.getuid(), user_memory=_Target(self.buf)))
        self.h = build_helper_table(self.env)
        self.addr, self.view = self.buf.addr, self.buf.view

    def call(self, *args: int) -> int:
        return self.h[165](*args) & M64


class CSide:
    def __init__(self, arena: SharedArena) -> None:
        self.f = make_frame(arena)
        self.fn = runtime_obj.tracer_runtime().helper(165)
        b = arena.alloc(1 << 16, 64)
        self.addr, self.view = b.addr, b.view

    def call(self, *args: int) -> int:
        return self.fn(*args, self.f.addr)


@pytest.fixture(scope="module")
def sides():
    return PySide(), CSide(SharedArena(8 << 20))


# program memory layout (same offsets on both sides): fmt at 0, args at 4096, strings from
# 8192 (one per 512 bytes), ip bytes at 12288, output at 16384
FMT, ARGS, STR, IP, OUT = 0, 4096, 8192, 12288, 16384


def _conv(rng: random.Random) -> tuple[str, str]:
    """(conversion text, argument kind)"""
    flags = "".join(rng.choice(["", "", "-", "+", " ", "0"]) for _ in range(rng.randrange(3)))
    width = rng.choice(["", "", "", str(rng.randrange(1, 24)), "300"])
    pick = rng.random()
    if pick < 0.35:
        return f"%{flags}{width}{rng.choice(['', 'l', 'll'])}{rng.choice('diuxX')}", "int"
    if pick < 0.55:
        return f"%{flags}{width}" + rng.choice(["s", "pks", "pus"]), "str"
    if pick < 0.62:
        return f"%{flags}{width}c", "int"
    if pick < 0.72:
        return f"%{flags}{width}" + rng.choice(["px", "ps", "pS", "pB"]), "int"
    if pick < 0.8:
        return "%" + rng.choice(["pI4", "pi4", "pI6", "pi6"]), "ip"
    if pick < 0.86:
        return "%%", ""
    return rng.choice(["%q", "%.3d", "%#x", "%sx", "%pZ", "%lq", "%h", "%", "%ls", "%pks9"]), "int"


def _case(rng: random.Random) -> tuple[bytes, list[tuple[str, int]], int]:
    parts, kinds = [], []
    for _ in range(rng.randrange(0, 6)):
        if rng.random() < 0.5:
            parts.append(rng.choice(["abc", " ", "-", ": ", "\t", "x=", "\u00e9", "\x01" if rng.random() < 0.05 else ""]))
        text, kind = _conv(rng)
        parts.append(text)
        if kind:
            kinds.append(kind)
    fmt = "".join(parts).encode()
    args = []
    for kind in kinds + (["int"] if rng.random() < 0.2 else []):
        if kind == "int":
            args.append(("int", rng.choice([0, 1, -1 & M64, 0x7FFFFFFF, 0x80000000, rng.randrange(1 << 64),
                                             rng.randrange(256), 0xFFFFFFFFFFFFF000])))
        elif kind == "str":
            where = rng.choice(["prog", "prog", "user", "bad"])
            args.append((where, rng.randrange(len(STRINGS))))
        else:
            args.append((rng.choice(["ip", "ip", "user", "bad"]), 0))
    if rng.random() < 0.1:
        args = args[:-1]                                  # fewer arguments than conversions
    return fmt, args, rng.choice([0, 1, 2, 8, 17, 64, 200, 1024])


def _arg(side, kind: str, v: int) -> int:
    if kind == "int":
        return v
    if kind == "prog":
        return side.addr + STR + 512 * v
    if kind == "ip":
        return side.addr + IP
    if kind == "user":
        return ctypes.addressof(USER)
    return 16                                             # unmapped


def _prepare(side) -> None:
    for i, s in enumerate(STRINGS):
        side.view[STR + 512 * i:STR + 512 * i + len(s) + 1] = s + b"\0"
    side.view[IP:IP + 16] = bytes(range(0xF0, 0x100))


def test_snprintf_matches_the_ptrace_path(sides):
    rng = random.Random(1234)
    for s in sides:
        _prepare(s)
    refused = formatted = 0
    for step in range(4000):
        fmt, args, size = _case(rng)
        results = []
        for s in sides:
            s.view[FMT:FMT + len(fmt) + 1] = fmt + b"\0"
            raw = [_arg(s, k, v) for k, v in args]
            s.view[ARGS:ARGS + 8 * len(raw)] = struct.pack(f"<{len(raw)}Q", *raw)
            s.view[OUT:OUT + 1100] = b"\xaa" * 1100
            rc = s.call(s.addr + OUT, size, s.addr + FMT, s.addr + ARGS, 8 * len(raw))
            results.append((rc, bytes(s.view[OUT:OUT + 1100])))
        assert results[0] == results[1], f"step {step}: fmt {fmt!r} args {args} size {size}"
        if results[0][0] > 1 << 63:
            refused += 1
        else:
            formatted += 1
    assert refused > 200 and formatted > 1000


def test_snprintf_argument_checks(sides):
    for s in sides:
        s.view[FMT:FMT + 4] = b"%d\0\0"
        for data_len in (4, 13 * 8):                      # not a multiple of 8, too many
            assert s.call(s.addr + OUT, 8, s.addr + FMT, s.addr + ARGS, data_len) == (-22) & M64
        assert s.call(s.addr + OUT, 8, s.addr + FMT, 0, 8) == (-22) & M64


def test_hashed_pointers_have_the_kernel_shape(sides):
    c = sides[1]
    for fmt, arg, want in [(b"%p", 0, "0000000000000000"), (b"%p", M64 - 3, "fffffffffffffffc"),
                           (b"%p", 0x7FFF12345678, None), (b"%px", 0x7FFF12345678, "00007fff12345678")]:
        c.view[FMT:FMT + len(fmt) + 1] = fmt + b"\0"
        c.view[ARGS:ARGS + 8] = struct.pack("<Q", arg)
        assert c.call(c.addr + OUT, 64, c.addr + FMT, c.addr + ARGS, 8) == 17
        text = bytes(c.view[OUT:OUT + 16]).decode()
        assert text == want if want else re.fullmatch("00000000[0-9a-f]{8}", text) and text != "0000000012345678"
