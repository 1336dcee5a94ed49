"""Helper return conventions (kernel semantics), called directly and from programs run
by the interpreter."""

from __future__ import annotations

import os
import re
import struct
import threading
import time
from pathlib import Path

import pytest

from ubpf_py.errors import HelperError, VMFault
from ubpf_py.helpers import HELPER_NAMES, SUPPORTED_HELPERS, build_helper_table, check_helpers
from ubpf_py.helpers.task_helpers import jiffies64
from ubpf_py.isa import opcodes as op
from ubpf_py.isa.asm import assemble
from ubpf_py.isa.instruction import Instruction
from ubpf_py.maps import consts as C
from ubpf_py.maps import create_map
from ubpf_py.obj.spec import MapSpec
from ubpf_py.vm.env import ExecEnv, HitContext
from ubpf_py.vm.memory import HostBuffer, MemoryMap, Region

EFAULT, ERANGE, EINVAL = 14, 34, 22
USER_BASE = 0x10_0000_0000   # a fake target address range


class FakeUser:
    """UserMemory over one bytearray at USER_BASE."""

    def __init__(self, size: int = 4096) -> None:
        self.mem = bytearray(size)

    def _ok(self, addr: int, size: int) -> bool:
        return addr >= USER_BASE and addr + size <= USER_BASE + len(self.mem)

    def read(self, addr: int, size: int) -> bytes | None:
        return bytes(self.mem[addr - USER_BASE:addr - USER_BASE + size]) if self._ok(addr, size) else None

    def read_str(self, addr: int, max_size: int) -> bytes | None:
        if not self._ok(addr, 1):
            return None
        off = addr - USER_BASE
        end = self.mem.find(b"\0", off, off + max_size)
        if end < 0:
            if off + max_size - 1 > len(self.mem):
                return None
            return bytes(self.mem[off:off + max_size - 1])
        return bytes(self.mem[off:end])

    def write(self, addr: int, data: bytes) -> bool:
        if not self._ok(addr, len(data)):
            return False
        self.mem[addr - USER_BASE:addr - USER_BASE + len(data)] = data
        return True


class Rig:
    """An env with a few maps, a fake target and a 'stack' buffer for direct helper calls."""

    def __init__(self, *specs: MapSpec, ncpus: int = 2) -> None:
        self.user = FakeUser()
        self.signals: list[int] = []
        self.hit = HitContext(tgid=4242, tid=4243, uid=1000, gid=100, comm=b"target-process!", cpu=1,
                              func_ip=0x401136, cookie=0xC00C1E, user_memory=self.user,
                              unwind_user_stack=lambda n: [0x401000 + 16 * i for i in range(5)][:n],
                              send_signal=lambda s: self.signals.append(s) or 0)
        self.env = ExecEnv(MemoryMap(), self.hit)
        self.printed: list[str] = []
        self.env.printk = lambda hit, text: self.printed.append(text)
        self.maps = {}
        for s in specs:
            m = create_map(s, ncpus=ncpus)
            self.maps[s.name] = m
            self.env.maps_by_addr[m.handle_addr] = m
            for r in m.regions():
                self.env.memory.add(r)
        self.buf = HostBuffer(1024)
        self.env.memory.add(Region.of(self.buf, "test stack"))
        self.env.helpers = build_helper_table(self.env)

    def call(self, helper: int, *args: int) -> int:
        a = list(args) + [0] * (5 - len(args))
        return self.env.helpers[helper](*a)

    def at(self, off: int) -> int:
        return self.buf.addr + off

    def put(self, off: int, data: bytes) -> int:
        self.buf.view[off:off + len(data)] = data
        return self.buf.addr + off

    def get(self, off: int, size: int) -> bytes:
        return bytes(self.buf.view[off:off + size])

    def run(self, text: str, patch: dict[int, Instruction] | None = None, engine: str = "interp") -> int:
        insns = assemble(text)
        for i, ins in (patch or {}).items():
            insns[i] = ins
        if engine == "jit":
            jit = pytest.importorskip("ubpf_py.vm.jit")
            return jit.JitProgram(insns, self.env).run(0)
        from ubpf_py.vm.interpreter import Interpreter
        return Interpreter(insns, self.env).run(0)


def k32(i: int) -> bytes:
    return struct.pack("<I", i)


def v64(i: int) -> bytes:
    return struct.pack("<Q", i)


# ---- table / load-time check -------------------------------------------------------------------------
def test_table_covers_supported_and_check_helpers():
    rig = Rig()
    assert set(rig.env.helpers) == SUPPORTED_HELPERS - {12}
    assert HELPER_NAMES[6] == "bpf_trace_printk" and HELPER_NAMES[181] == "bpf_loop"
    check_helpers(assemble("call 1\ncall 12\nexit"))
    with pytest.raises(HelperError, match=r"unknown helper #41 \(bpf_set_hash_invalid\)"):
        check_helpers(assemble("mov %r0, 0\ncall 41\nexit"), program="p")


# ---- maps through programs ---------------------------------------------------------------------------------
ENGINES = pytest.mark.parametrize("engine", ["interp", "jit"])


@ENGINES
def test_map_ops_from_a_program(engine):
    rig = Rig(MapSpec("h", C.HASH, 4, 8, 4))
    h = rig.maps["h"]
    prog = f"""
        stw [%r10-4], 7
        stdw [%r10-16], 40
        lddw %r1, {h.handle_addr:#x}
        mov %r2, %r10
        add %r2, -4
        mov %r3, %r10
        add %r3, -16
        mov %r4, 0
        call 2
        lddw %r1, {h.handle_addr:#x}
        mov %r2, %r10
        add %r2, -4
        call 1
        jeq %r0, 0, miss
        ldxdw %r1, [%r0]
        add %r1, 2
        stxdw [%r0], %r1
        mov %r0, %r1
        exit
    miss:
        mov %r0, 99
        exit
    """
    assert rig.run(prog, engine=engine) == 42
    assert h.lookup(k32(7)) == v64(42)
    assert rig.call(1, h.handle_addr, rig.put(0, k32(8))) == 0
    assert rig.call(2, h.handle_addr, rig.put(0, k32(8)), rig.put(8, v64(1)), C.BPF_EXIST) == -C.ENOENT
    assert rig.call(3, h.handle_addr, rig.put(0, k32(7))) == 0
    assert rig.call(3, h.handle_addr, rig.put(0, k32(7))) == -C.ENOENT
    with pytest.raises(VMFault, match="not a map"):
        rig.call(1, 0x1234, rig.at(0))


def test_percpu_lookup_uses_hit_cpu():
    rig = Rig(MapSpec("pa", C.PERCPU_ARRAY, 4, 8, 1))
    m = rig.maps["pa"]
    rig.hit.cpu = 1
    assert rig.call(2, m.handle_addr, rig.put(0, k32(0)), rig.put(8, v64(5)), 0) == 0
    assert m.lookup_percpu(k32(0)) == [v64(0), v64(5)]
    assert rig.call(1, m.handle_addr, rig.put(0, k32(0))) == m.lookup_addr(k32(0), 1)


def test_map_in_map_lookup_returns_inner_handle():
    inner_t = MapSpec("in", C.ARRAY, 4, 8, 2)
    rig = Rig(MapSpec("out", C.ARRAY_OF_MAPS, 4, 4, 1, inner=inner_t))
    inner = create_map(MapSpec("in0", C.ARRAY, 4, 8, 2))
    inner.update(k32(1), v64(77))
    assert rig.maps["out"].update(k32(0), k32(inner.map_id)) == 0
    handle = rig.call(1, rig.maps["out"].handle_addr, rig.put(0, k32(0)))
    assert handle == inner.handle_addr
    vaddr = rig.call(1, handle, rig.put(0, k32(1)))          # inner map reachable, its memory too
    assert rig.env.memory.read(vaddr, 8) == v64(77)


def test_queue_helpers_zero_fill_on_empty():
    rig = Rig(MapSpec("q", C.QUEUE, 0, 8, 2), MapSpec("b", C.BLOOM_FILTER, 0, 8, 16, map_extra=2))
    q, b = rig.maps["q"], rig.maps["b"]
    rig.put(16, b"\xff" * 8)
    assert rig.call(88, q.handle_addr, rig.at(16)) == -C.ENOENT and rig.get(16, 8) == bytes(8)
    assert rig.call(87, q.handle_addr, rig.put(0, v64(3)), 0) == 0
    assert rig.call(89, q.handle_addr, rig.at(16)) == 0 and rig.get(16, 8) == v64(3)
    assert rig.call(88, q.handle_addr, rig.at(16)) == 0 and q.pop() == -C.ENOENT
    assert rig.call(87, b.handle_addr, rig.put(0, v64(9)), 0) == 0
    assert rig.call(89, b.handle_addr, rig.put(0, v64(9))) == 0


# ---- ring buffer / perf --------------------------------------------------------------------------------------
def test_ringbuf_helpers():
    rig = Rig(MapSpec("rb", C.RINGBUF, 0, 0, 4096))
    rb = rig.maps["rb"]
    assert rig.call(130, rb.handle_addr, rig.put(0, b"hello"), 5, 0) == 0
    assert rig.call(130, rb.handle_addr, rig.put(0, b"hello"), 5, 8) == -C.EINVAL
    assert rig.call(131, rb.handle_addr, 16, 1) == 0            # reserve flags must be 0
    rec = rig.call(131, rb.handle_addr, 16, 0)
    assert rec
    rig.env.memory.write(rec, b"A" * 16)                          # the program may write it
    assert rig.call(134, rb.handle_addr, C.BPF_RB_AVAIL_DATA) == 16 + 24
    assert rig.call(132, rec, 0) == 0
    d = rig.call(131, rb.handle_addr, 8, 0)
    assert rig.call(133, d, 0) == 0
    assert rb.consume() == [b"hello", b"A" * 16]
    assert rig.call(134, rb.handle_addr, C.BPF_RB_RING_SIZE) == 4096
    with pytest.raises(VMFault):
        rig.call(132, rig.at(0), 0)
    while rig.call(130, rb.handle_addr, rig.at(0), 500, 0) == 0:
        pass
    assert rig.call(130, rb.handle_addr, rig.at(0), 500, 0) == -C.EAGAIN
    assert rig.call(131, rb.handle_addr, 500, 0) == 0 and rb.dropped == 3


@ENGINES
def test_ringbuf_record_from_a_program(engine):
    rig = Rig(MapSpec("rb", C.RINGBUF, 0, 0, 4096))
    rb = rig.maps["rb"]
    prog = f"""
        lddw %r1, {rb.handle_addr:#x}
        mov %r2, 12
        mov %r3, 0
        call 131
        jeq %r0, 0, out
        stdw [%r0], 0x1122
        stw [%r0+8], 7
        mov %r1, %r0
        mov %r2, 0
        call 132
        mov %r0, 1
    out:
        exit
    """
    assert rig.run(prog, engine=engine) == 1
    assert rb.consume() == [v64(0x1122) + k32(7)]


def test_perf_event_output_current_cpu():
    rig = Rig(MapSpec("ev", C.PERF_EVENT_ARRAY, 4, 4, 0))
    ev = rig.maps["ev"]
    rig.hit.cpu = 1
    assert rig.call(25, 0, ev.handle_addr, C.BPF_F_CURRENT_CPU, rig.put(0, b"abc"), 3) == 0
    assert rig.call(25, 0, ev.handle_addr, 0, rig.at(0), 3) == -C.EOPNOTSUPP
    assert rig.call(25, 0, ev.handle_addr, 7, rig.at(0), 3) == -C.E2BIG
    assert ev.consume() == [(1, b"abc" + bytes(1))]


# ---- stacks -------------------------------------------------------------------------------------------------
def test_get_stackid_and_get_stack():
    rig = Rig(MapSpec("st", C.STACK_TRACE, 4, 8 * 3, 16))
    st = rig.maps["st"]
    sid = rig.call(27, 0, st.handle_addr, C.BPF_F_USER_STACK)
    assert sid >= 0 and st.frames(sid) == [0x401000, 0x401010, 0x401020]   # max depth 3
    assert rig.call(27, 0, st.handle_addr, C.BPF_F_USER_STACK | 1) != sid
    assert st.frames(rig.call(27, 0, st.handle_addr, C.BPF_F_USER_STACK | 1)) == [0x401010, 0x401020, 0x401030]
    assert rig.call(27, 0, st.handle_addr, 0) == -C.EFAULT               # no kernel stack in a uprobe
    assert rig.call(27, 0, st.handle_addr, 1 << 12) == -C.EINVAL
    rig.hit.unwind_user_stack = None
    assert rig.call(27, 0, st.handle_addr, C.BPF_F_USER_STACK) == -C.EFAULT
    rig.hit.unwind_user_stack = lambda n: [0x1, 0x2][:n]
    rig.put(0, b"\xff" * 32)
    assert rig.call(67, 0, rig.at(0), 32, C.BPF_F_USER_STACK) == 16
    assert rig.get(0, 32) == struct.pack("<4Q", 1, 2, 0, 0)
    rig.put(0, b"\xff" * 32)
    assert rig.call(67, 0, rig.at(0), 30, C.BPF_F_USER_STACK) == -C.EINVAL and rig.get(0, 30) == bytes(30)
    assert rig.call(67, 0, rig.at(0), 32, C.BPF_F_USER_STACK | 3) == -C.EFAULT
    assert rig.call(67, 0, rig.at(0), 32, 0) == 0                          # empty kernel stack
    assert rig.call(67, 0, rig.at(0), 64, C.BPF_F_USER_STACK | C.BPF_F_USER_BUILD_ID) == 64


# ---- memory helpers ------------------------------------------------------------------------------------------
def test_probe_read_family():
    rig = Rig()
    rig.user.mem[0:6] = b"corpus"
    rig.put(100, b"local\0")
    rig.put(0, b"\xaa" * 16)
    assert rig.call(112, rig.at(0), 6, USER_BASE) == 0 and rig.get(0, 6) == b"corpus"
    assert rig.call(112, rig.at(0), 8, USER_BASE + 4092) == -EFAULT and rig.get(0, 8) == bytes(8)
    assert rig.call(112, rig.at(0), 0, 0) == 0
    assert rig.call(113, rig.at(0), 6, rig.at(100)) == 0 and rig.get(0, 6) == b"local\0"
    assert rig.call(113, rig.at(0), 4, USER_BASE) == -ERANGE               # user address, kernel read
    assert rig.call(113, rig.at(0), 4, 0xFFFF_8880_0000_0000) == -EFAULT
    assert rig.call(4, rig.at(0), 6, rig.at(100)) == 0 and rig.get(0, 6) == b"local\0"
    assert rig.call(4, rig.at(0), 6, USER_BASE) == 0 and rig.get(0, 6) == b"corpus"
    # strings: length including the NUL; size when truncated; rest of the buffer untouched
    rig.put(0, b"\xaa" * 16)
    assert rig.call(114, rig.at(0), 16, USER_BASE) == 7 and rig.get(0, 8) == b"corpus\0\0"  # the NUL's word is zeroed (strncpy_from_user)
    assert rig.call(114, rig.at(0), 4, USER_BASE) == 4 and rig.get(0, 4) == b"cor\0"
    assert rig.call(114, rig.at(0), 8, 0x42) == -EFAULT and rig.get(0, 8) == bytes(8)
    assert rig.call(115, rig.at(0), 16, rig.at(100)) == 6 and rig.get(0, 6) == b"local\0"
    assert rig.call(115, rig.at(0), 16, USER_BASE) == -ERANGE
    assert rig.call(45, rig.at(0), 16, USER_BASE) == 7
    assert rig.call(45, rig.at(0), 16, rig.at(100)) == 6
    # probe_write_user
    assert rig.call(36, USER_BASE + 10, rig.put(0, b"XY"), 2) == 0 and rig.user.mem[10:12] == b"XY"
    assert rig.call(36, 0x42, rig.at(0), 2) == -EFAULT


def test_strncmp():
    rig = Rig()
    s2 = rig.put(200, b"hello\0")
    assert rig.call(182, rig.put(0, b"hello\0xx"), 8, s2) == 0
    assert rig.call(182, rig.put(0, b"help"), 4, s2) == 1
    assert rig.call(182, rig.put(0, b"hela"), 4, s2) == -1
    assert rig.call(182, rig.put(0, b"hel"), 3, s2) == 0
    assert rig.call(182, rig.put(0, b"hello!"), 6, s2) == 1


# ---- task / time ---------------------------------------------------------------------------------------------
def test_task_facts():
    rig = Rig()
    assert rig.call(14) == (4242 << 32) | 4243
    assert rig.call(15) == (100 << 32) | 1000
    assert rig.call(8) == 1
    assert rig.call(173) == 0x401136 and rig.call(174) == 0xC00C1E
    rig.put(0, b"\xff" * 20)
    assert rig.call(16, rig.at(0), 16) == 0 and rig.get(0, 16) == b"target-process!\0"
    assert rig.call(16, rig.at(0), 4) == 0 and rig.get(0, 5) == b"tar\0e"
    assert rig.call(109, 10) == 0 and rig.signals == [10]
    assert rig.call(109, 65) == -EINVAL
    rig.hit.send_signal = None
    assert rig.call(109, 10) == -1
    vals = {rig.call(7) for _ in range(20)}
    assert len(vals) > 15 and all(0 <= v < 1 << 32 for v in vals)


def test_clocks():
    rig = Rig()
    t0 = time.monotonic_ns()
    t = rig.call(5)
    assert t0 <= t <= time.monotonic_ns()
    mono = rig.call(5)
    assert rig.call(125) >= mono                              # boot time includes suspend
    assert abs(rig.call(160) - time.monotonic_ns()) < 50_000_000
    try:
        before = jiffies64()
        text = Path("/proc/timer_list").read_text()
        after = jiffies64()
    except OSError:
        pytest.skip("/proc/timer_list not readable (root only): jiffies are checked against the kernel "
                    "in test_hit_facts instead")
    kernel_j = int(re.search(r"^jiffies: (\d+)", text, re.M).group(1))
    # the kernel's value was read between our two samples (the file is long: on a loaded machine the
    # read itself can take several jiffies); one jiffy of quantisation either side
    assert before - 1 <= kernel_j <= after + 1


def test_get_ns_current_pid_tgid():
    rig = Rig()
    rig.hit.tgid, rig.hit.tid = os.getpid(), threading.get_native_id()
    st = os.stat("/proc/self/ns/pid")
    assert rig.call(120, st.st_dev, st.st_ino, rig.at(0), 8) == 0
    status = Path("/proc/self/status").read_text()
    nspid = int(re.search(r"^NSpid:\s+(.*)$", status, re.M).group(1).split()[-1])
    assert struct.unpack("<II", rig.get(0, 8)) == (threading.get_native_id() if nspid == os.getpid()
                                                    else nspid, nspid)
    assert rig.call(120, st.st_dev, st.st_ino + 1, rig.at(0), 8) == -EINVAL and rig.get(0, 8) == bytes(8)
    assert rig.call(120, st.st_dev, st.st_ino, rig.at(0), 4) == -EINVAL


def test_spin_lock():
    rig = Rig(MapSpec("a", C.ARRAY, 4, 8, 1))
    addr = rig.maps["a"].lookup_addr(k32(0))
    assert rig.call(93, addr) == 0 and rig.env.memory.load(addr, 4) == 1
    assert rig.call(94, addr) == 0 and rig.env.memory.load(addr, 4) == 0
    with pytest.raises(VMFault):
        rig.call(94, addr)


# ---- callbacks ----------------------------------------------------------------------------------------------
def _pseudo_func(insns_text: str, at: int, dst: int, target: int) -> dict[int, Instruction]:
    return {at: Instruction(op.LDDW, dst, op.BPF_PSEUDO_FUNC, 0, target - at - 1, 0)}


@ENGINES
def test_bpf_loop_from_a_program(engine):
    rig = Rig()
    # main: r6 = counter on the stack; bpf_loop(10, cb, &counter, 0); return counter*1000 + ret
    prog = """
        stdw [%r10-8], 0
        mov %r1, 10
        lddw %r2, 0
        mov %r3, %r10
        add %r3, -8
        mov %r4, 0
        call 181
        ldxdw %r1, [%r10-8]
        mul %r1, 1000
        add %r0, %r1
        exit
        ldxdw %r3, [%r2]
        add %r3, %r1
        stxdw [%r2], %r3
        mov %r0, 0
        jne %r1, 6, +1
        mov %r0, 1
        exit
    """
    patch = _pseudo_func(prog, 2, 2, 12)
    # callback adds i (0..6) then stops at i == 6: sum 21, returns 7
    assert rig.run(prog, patch, engine) == 21 * 1000 + 7
    assert rig.run(prog.replace("mov %r4, 0", "mov %r4, 1"), patch, engine) == (-EINVAL & (2 ** 64 - 1))
    assert rig.run(prog.replace("mov %r1, 10", "lddw %r1, 0x800001"),
                   {3: Instruction(op.LDDW, 2, op.BPF_PSEUDO_FUNC, 0, 13 - 3 - 1, 0)}, engine) \
        == (-C.E2BIG & (2 ** 64 - 1))


@ENGINES
def test_for_each_map_elem_from_a_program(engine):
    rig = Rig(MapSpec("h", C.HASH, 4, 8, 8), MapSpec("a", C.ARRAY, 4, 8, 5))
    h, a = rig.maps["h"], rig.maps["a"]
    for i in range(4):
        h.update(k32(i), v64(10 * i))
        a.update(k32(i), v64(i))
    # callback(map, key, value, ctx): *ctx += *value; stop when *key == 2 for the array
    prog = f"""
        stdw [%r10-8], 0
        lddw %r1, {h.handle_addr:#x}
        lddw %r2, 0
        mov %r3, %r10
        add %r3, -8
        mov %r4, 0
        call 164
        ldxdw %r1, [%r10-8]
        mul %r1, 100
        add %r0, %r1
        exit
        ldxdw %r1, [%r3]
        ldxdw %r5, [%r4]
        add %r5, %r1
        stxdw [%r4], %r5
        mov %r0, 0
        ldxw %r1, [%r2]
        jne %r1, 2, +1
        mov %r0, {{stop}}
        exit
    """
    patch = {3: Instruction(op.LDDW, 2, op.BPF_PSEUDO_FUNC, 0, 13 - 3 - 1, 0)}
    assert rig.run(prog.format(stop=0), patch, engine) == 60 * 100 + 4
    prog_a = prog.replace(f"{h.handle_addr:#x}", f"{a.handle_addr:#x}").format(stop=1)
    assert rig.run(prog_a, patch, engine) == (0 + 1 + 2) * 100 + 3
