"""The in-target runtime (runtime/*.c) linked into this process and called through ctypes
with fake hit frames: facts, reads, stacks, and that the object needs nothing from libc."""

from __future__ import annotations

import ctypes
import mmap
import os
import shutil
import struct
import subprocess
import threading
import time

import pytest
from intarget_fixture import cpu_has, make_frame, needs_runtime, tid

from ubpf_py.abi.runtime import PB_F_AT_ENTRY, RUNTIME_HEADER, THREAD_BLOCK
from ubpf_py.intarget import runtime_build, runtime_obj
from ubpf_py.intarget.arena import SharedArena

pytestmark = needs_runtime
EFAULT, EINVAL = 14, 22
M64 = (1 << 64) - 1


@pytest.fixture(scope="module")
def arena():
    return SharedArena(16 << 20)   # left mapped: the runtime may keep pointers into it


@pytest.fixture(scope="module")
def rt():
    return runtime_obj.tracer_runtime()


def neg(e: int) -> int:
    return (-e) & M64


def test_object_has_no_undefined_symbols_and_no_vector_registers(tmp_path):
    raw = runtime_obj.object_bytes()
    o = tmp_path / "rt.o"
    o.write_bytes(raw)
    if shutil.which("nm"):
        und = subprocess.run(["nm", "-u", str(o)], capture_output=True, text=True, check=True).stdout
        assert und.strip() == "", f"the runtime needs symbols from outside (libc?): {und}"
    if shutil.which("objdump"):
        dis = subprocess.run(["objdump", "-d", str(o)], capture_output=True, text=True, check=True).stdout
        assert "%xmm" not in dis and "%ymm" not in dis and "%zmm" not in dis
    assert {1, 2, 3, 4, 5, 6, 7, 8, 14, 15, 16, 25, 27, 36, 45, 67, 87, 88, 89, 93, 94, 109, 112, 113, 114, 115,
            117, 118, 125, 130, 131, 132, 133, 134, 160, 173, 174, 177, 182} <= runtime_obj.helper_ids()


def test_cached_build_is_reused_and_digest_tracks_sources(tmp_path):
    d1 = runtime_build.digest(runtime_obj.RUNTIME_DIR)
    assert d1 == runtime_build.digest(runtime_obj.RUNTIME_DIR)
    src = tmp_path / "rt"
    shutil.copytree(runtime_obj.RUNTIME_DIR, src)
    (src / "lib.c").write_text((src / "lib.c").read_text() + "\n/* changed */\n")
    assert runtime_build.digest(src) != d1


def test_clocks_vdso_and_syscall(arena, rt):
    for vdso in (True, False):
        f = make_frame(arena, vdso=vdso)
        for hid, clock in ((5, time.CLOCK_MONOTONIC), (125, time.CLOCK_BOOTTIME)):
            a = time.clock_gettime_ns(clock)
            v = rt.helper(hid)(0, 0, 0, 0, 0, f.addr)
            b = time.clock_gettime_ns(clock)
            assert a <= v <= b
        coarse = rt.helper(160)(0, 0, 0, 0, 0, f.addr)
        assert abs(coarse - time.clock_gettime_ns(6)) < 50_000_000   # 6: CLOCK_MONOTONIC_COARSE


def test_pid_tgid_uid_gid_comm_in_threads(arena, rt):
    f = make_frame(arena)
    got: dict[str, int | bytes] = {}

    def body():
        libc = ctypes.CDLL(None)
        libc.prctl(15, b"renamed-thread", 0, 0, 0)   # PR_SET_NAME: the kernel reads comm per call
        got["pt"] = rt.helper(14)(0, 0, 0, 0, 0, f.addr)
        got["tid"] = tid()
        buf = ctypes.create_string_buffer(b"\xaa" * 20)
        got["rc"] = rt.helper(16)(ctypes.addressof(buf), 20, 0, 0, 0, f.addr)
        got["comm"] = buf.raw[:20]
        small = ctypes.create_string_buffer(b"\xaa" * 6)
        rt.helper(16)(ctypes.addressof(small), 4, 0, 0, 0, f.addr)
        got["small"] = small.raw[:6]

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert got["pt"] == (os.getpid() << 32) | got["tid"]
    assert got["tid"] != tid()
    assert got["rc"] == 0 and got["comm"] == b"renamed-thread" + bytes(6)
    assert got["small"] == b"ren\0\xaa\xaa"
    assert rt.helper(14)(0, 0, 0, 0, 0, f.addr) == (os.getpid() << 32) | tid()
    assert rt.helper(15)(0, 0, 0, 0, 0, f.addr) == (os.getgid() << 32) | os.getuid()


@pytest.mark.skipif(os.geteuid() != 0, reason="setresuid needs root")
def test_uid_gid_after_setresuid_in_a_child(arena, rt):
    f = make_frame(arena)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:   # the child changes its ids; the runtime must see the new ones at once
        try:
            f.header[RUNTIME_HEADER.word("generation")] += 1   # what the tracer does at a fork
            os.setresgid(1234, 1234, 1234)
            os.setresuid(4321, 4321, 4321)
            v = rt.helper(15)(0, 0, 0, 0, 0, f.addr)
            pt = rt.helper(14)(0, 0, 0, 0, 0, f.addr)
            os.write(w, struct.pack("<QQQ", v, pt, os.getpid()))
        finally:
            os._exit(0)
    os.close(w)
    data = os.read(r, 24)
    os.waitpid(pid, 0)
    v, pt, cpid = struct.unpack("<QQQ", data)
    assert v == (1234 << 32) | 4321
    assert pt >> 32 == cpid   # a forked child reports its own tgid (nothing stale in the arena)
    f.header[RUNTIME_HEADER.word("generation")] += 1   # (this test's thread block is shared)
    assert rt.helper(14)(0, 0, 0, 0, 0, f.addr) >> 32 == os.getpid()


def test_tgid_cache_follows_the_generation(arena, rt):
    f = make_frame(arena)
    gen = RUNTIME_HEADER.word("generation")
    assert rt.helper(14)(0, 0, 0, 0, 0, f.addr) >> 32 == os.getpid()
    assert f.thread[THREAD_BLOCK.word("tgid")] == os.getpid()
    f.thread[THREAD_BLOCK.word("tgid")] = 12345        # the cache is what is used...
    assert rt.helper(14)(0, 0, 0, 0, 0, f.addr) >> 32 == 12345
    f.header[gen] += 1                                  # ...until the tracer bumps the generation
    assert rt.helper(14)(0, 0, 0, 0, 0, f.addr) >> 32 == os.getpid()


def test_cpu_rdpid_rdtscp_and_getcpu(arena, rt):
    old = os.sched_getaffinity(0)
    try:
        for cpu in sorted(old)[:2]:
            os.sched_setaffinity(0, {cpu})
            for rdpid in (True, False):
                f = make_frame(arena, rdpid=rdpid)
                assert rt.helper(8)(0, 0, 0, 0, 0, f.addr) == cpu
    finally:
        os.sched_setaffinity(0, old)
    assert cpu_has("rdtscp")


def test_prandom_func_ip_cookie(arena, rt):
    f = make_frame(arena)
    vals = {rt.helper(7)(0, 0, 0, 0, 0, f.addr) for _ in range(200)}
    assert len(vals) > 190 and max(vals) < 1 << 32
    f.set_probe("func_ip", 0x401234)
    f.set_probe("cookie", 0xDEADBEEF12345678)
    assert rt.helper(173)(0, 0, 0, 0, 0, f.addr) == 0x401234
    assert rt.helper(174)(0, 0, 0, 0, 0, f.addr) == 0xDEADBEEF12345678


def _guarded_page():
    """A readable page followed by an unreadable one (the string-at-a-page-end case)."""
    m = mmap.mmap(-1, 2 * mmap.PAGESIZE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(m))
    libc = ctypes.CDLL(None)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    assert libc.mprotect(base + mmap.PAGESIZE, mmap.PAGESIZE, 0) == 0
    return m, base


def test_probe_read_user_and_faults(arena, rt):
    f = make_frame(arena)
    src = ctypes.create_string_buffer(b"0123456789abcdef")
    dst = ctypes.create_string_buffer(b"\xaa" * 16, 16)
    for hid in (112, 4):
        assert rt.helper(hid)(ctypes.addressof(dst), 8, ctypes.addressof(src), 0, 0, f.addr) == 0
        assert dst.raw[:8] == b"01234567" and dst.raw[8:] == b"\xaa" * 8
        ctypes.memset(dst, 0xAA, 16)
        for bad in (0, 8, 0xFFFF_8000_0000_0000, 0x7FFF_FFFF_F000):
            assert rt.helper(hid)(ctypes.addressof(dst), 16, bad, 0, 0, f.addr) == neg(EFAULT)
            assert dst.raw == bytes(16)
            ctypes.memset(dst, 0xAA, 16)
        assert rt.helper(hid)(ctypes.addressof(dst), 0, 0, 0, 0, f.addr) == 0
    m, base = _guarded_page()
    end = base + mmap.PAGESIZE
    assert rt.helper(112)(ctypes.addressof(dst), 16, end - 8, 0, 0, f.addr) == neg(EFAULT)
    assert dst.raw == bytes(16)
    m.close()


def test_probe_read_user_in_the_stack_pointer_page(arena, rt):
    """At a function's entry, reads inside the page holding rsp (where the call just wrote the
    return address) are plain copies; reads crossing that page, and reads at other sites, take the
    safe path and fault cleanly on an unreadable page."""
    f = make_frame(arena)
    m, base = _guarded_page()                   # page 0 readable, page 1 not
    ctypes.memmove(base + 100, b"stack bytes!", 12)
    f.set_probe("flags", PB_F_AT_ENTRY)
    f.set_reg("rsp", base + 64)                 # the "stack pointer" lies in the readable page
    dst = ctypes.create_string_buffer(b"\xaa" * 16, 16)
    assert rt.helper(112)(ctypes.addressof(dst), 12, base + 100, 0, 0, f.addr) == 0
    assert dst.raw[:12] == b"stack bytes!"
    # crossing the page end leaves the fast path: the unreadable page makes it -EFAULT, zeroed
    assert rt.helper(112)(ctypes.addressof(dst), 16, base + mmap.PAGESIZE - 8, 0, 0, f.addr) == neg(EFAULT)
    assert dst.raw == bytes(16)
    f.set_probe("flags", 0)                     # a site inside a function proves nothing about rsp
    f.set_reg("rsp", base + mmap.PAGESIZE + 64)
    assert rt.helper(112)(ctypes.addressof(dst), 8, base + mmap.PAGESIZE + 8, 0, 0, f.addr) == neg(EFAULT)
    assert dst.raw[:8] == bytes(8)
    m.close()


def test_probe_read_user_str(arena, rt):
    f = make_frame(arena)
    src = ctypes.create_string_buffer(b"hello world")
    dst = ctypes.create_string_buffer(b"\xaa" * 32, 32)
    for hid in (114, 45):
        ctypes.memset(dst, 0xAA, 32)
        assert rt.helper(hid)(ctypes.addressof(dst), 32, ctypes.addressof(src), 0, 0, f.addr) == 12
        # the kernel copies 8-byte words: the rest of the word holding the NUL is zeroed,
        # nothing after it is touched
        assert dst.raw[:16] == b"hello world\0" + bytes(4) and dst.raw[16:] == b"\xaa" * 16
        ctypes.memset(dst, 0xAA, 32)
        assert rt.helper(hid)(ctypes.addressof(dst), 6, ctypes.addressof(src), 0, 0, f.addr) == 6
        assert dst.raw[:7] == b"hello\0\xaa"
        assert rt.helper(hid)(ctypes.addressof(dst), 32, 16, 0, 0, f.addr) == neg(EFAULT)
        assert dst.raw == bytes(32)
    m, base = _guarded_page()
    end = base + mmap.PAGESIZE
    ctypes.memmove(end - 4, b"abc\0", 4)     # ends right before an unreadable page
    ctypes.memset(dst, 0xAA, 32)
    assert rt.helper(114)(ctypes.addressof(dst), 32, end - 4, 0, 0, f.addr) == 4
    assert dst.raw[:8] == b"abc\0\xaa\xaa\xaa\xaa"  # its word runs into the page: byte at a time
    ctypes.memmove(end - 4, b"abcd", 4)      # runs into it: -EFAULT like strncpy_from_user
    assert rt.helper(114)(ctypes.addressof(dst), 32, end - 4, 0, 0, f.addr) == neg(EFAULT)
    assert dst.raw == bytes(32)
    m.close()


def test_get_stack_user_frame_pointer_walk(arena, rt):
    f = make_frame(arena)
    stack = arena.alloc(4096, 16)
    w = stack.view.cast("Q")
    base = stack.addr
    # three frames: [fp] = next fp, [fp + 8] = return address; the last has a zero next
    w[64], w[65] = base + 96 * 8, 0x401111
    w[96], w[97] = base + 128 * 8, 0x402222
    w[128], w[129] = 0, 0x403333
    w[10] = 0x404444                          # [rsp]: the return address at a function entry
    f.set_reg("rip", 0x400000)
    f.set_reg("rbp", base + 64 * 8)
    f.set_reg("rsp", base + 10 * 8)
    buf = ctypes.create_string_buffer(b"\xaa" * 64, 64)
    get = rt.helper(67)
    USER = 1 << 8
    assert get(0, ctypes.addressof(buf), 64, USER, 0, f.addr) == 32
    assert struct.unpack("<8Q", buf.raw) == (0x400000, 0x401111, 0x402222, 0x403333, 0, 0, 0, 0)
    f.set_probe("flags", PB_F_AT_ENTRY)
    assert get(0, ctypes.addressof(buf), 64, USER | 1, 0, f.addr) == 32   # skip 1
    assert struct.unpack("<8Q", buf.raw)[:4] == (0x404444, 0x401111, 0x402222, 0x403333)
    f.set_probe("flags", 0)
    assert get(0, ctypes.addressof(buf), 16, USER, 0, f.addr) == 16
    assert get(0, ctypes.addressof(buf), 64, USER | 9, 0, f.addr) == neg(EFAULT)
    assert buf.raw == bytes(64)
    # a uprobe has no kernel stack: nothing (or -EFAULT when frames are skipped)
    ctypes.memset(buf, 0xAA, 64)
    assert get(0, ctypes.addressof(buf), 64, 0, 0, f.addr) == 0 and buf.raw == bytes(64)
    assert get(0, ctypes.addressof(buf), 64, 2, 0, f.addr) == neg(EFAULT)
    assert get(0, ctypes.addressof(buf), 12, USER, 0, f.addr) == neg(EINVAL)
    f.set_reg("rbp", 0x10)                   # unreadable frame pointer: just the ip
    assert get(0, ctypes.addressof(buf), 64, USER, 0, f.addr) == 8


def test_ret_trampoline_frames_show_the_original_return(arena, rt):
    from ubpf_py.abi.runtime import SHADOW_ENTRY

    f = make_frame(arena)
    stack = arena.alloc(4096, 16)
    w = stack.view.cast("Q")
    w[64], w[65] = 0, 0x7000                  # a replaced return address
    f.set_reg("rip", 0x400000)
    f.set_reg("rbp", stack.addr + 64 * 8)
    f.set_header("ret_trampoline", 0x7000)
    sh = THREAD_BLOCK.word("shadow")
    f.thread[sh + SHADOW_ENTRY.word("ret_addr")] = 0x405555
    f.thread[THREAD_BLOCK.word("shadow_depth")] = 1
    buf = ctypes.create_string_buffer(32)
    assert rt.helper(67)(0, ctypes.addressof(buf), 32, 1 << 8, 0, f.addr) == 16
    assert struct.unpack("<4Q", buf.raw)[:2] == (0x400000, 0x405555)
    f.set_header("ret_trampoline", 0)


def test_user_reads_refuse_program_memory(arena, rt):
    """Maps and runtime stacks are kernel memory to the kernel: probe_read_user faults on
    them, probe_read (user or kernel) reads them."""
    f = make_frame(arena)
    src = arena.alloc(16, 8)
    src.view[0:8] = b"inarena\0"
    dst = ctypes.create_string_buffer(b"\xaa" * 8, 8)
    assert rt.helper(112)(ctypes.addressof(dst), 8, src.addr, 0, 0, f.addr) == neg(EFAULT)
    assert dst.raw == bytes(8)
    assert rt.helper(114)(ctypes.addressof(dst), 8, src.addr, 0, 0, f.addr) == neg(EFAULT)
    assert rt.helper(4)(ctypes.addressof(dst), 8, src.addr, 0, 0, f.addr) == 0 and dst.raw == b"inarena\0"
    assert rt.helper(45)(ctypes.addressof(dst), 8, src.addr, 0, 0, f.addr) == 8


def test_spin_lock_word(arena, rt):
    f = make_frame(arena)
    v = arena.alloc(16, 8)
    w = v.view.cast("I")
    assert rt.helper(93)(v.addr, 0, 0, 0, 0, f.addr) == 0 and w[0] == 1
    t0 = time.monotonic()
    assert rt.helper(93)(v.addr, 0, 0, 0, 0, f.addr) == 0    # held: gives up, never hangs the target
    assert time.monotonic() - t0 < 30
    assert rt.helper(94)(v.addr, 0, 0, 0, 0, f.addr) == 0 and w[0] == 0


def test_built_object_carries_its_source_digest(tmp_path):
    out = tmp_path / "rt.o"
    runtime_build.build(runtime_obj.RUNTIME_DIR, out)
    assert runtime_obj._object_digest(out.read_bytes()) == runtime_build.digest(runtime_obj.RUNTIME_DIR)


def test_no_compiler_means_a_clear_reason(tmp_path, monkeypatch):
    from ubpf_py.errors import NotSupportedError
    from ubpf_py.maps import consts as C
    from ubpf_py.maps import create_map
    from ubpf_py.maps.native_ops import runtime_for
    from ubpf_py.obj.spec import MapSpec

    monkeypatch.setattr(runtime_build, "compiler", lambda: None)
    monkeypatch.setattr(runtime_obj, "PACKAGED", tmp_path / "absent.o")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    runtime_obj._locate.cache_clear()
    try:
        why = runtime_obj.unavailable_reason()
        assert why is not None and "C compiler" in why
        with pytest.raises(NotSupportedError, match=r"in-target execution: .*C compiler"):
            runtime_obj.object_bytes()
        with SharedArena(1 << 20) as a:
            # maps in an arena keep their Python implementation (the in-target path is off)
            m = create_map(MapSpec("h", C.HASH, 4, 8, 4), alloc=a)
            assert runtime_for(a) is None and m._c is None
            assert m.update(b"\1\0\0\0", bytes(8)) == 0 and len(m) == 1
    finally:
        runtime_obj._locate.cache_clear()


def test_vdso_clock_gettime_found_and_callable():
    from ubpf_py.intarget.vdso import vdso_symbols

    syms = vdso_symbols()
    fn_addr = syms.get("__vdso_clock_gettime")
    assert fn_addr
    ts = (ctypes.c_long * 2)()
    fn = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p)(fn_addr)
    a = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    assert fn(time.CLOCK_MONOTONIC, ts) == 0
    b = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    assert a <= ts[0] * 1_000_000_000 + ts[1] <= b


def test_jiffies_from_the_host_calibration(arena, rt):
    from ubpf_py.helpers.task_helpers import jiffies64
    from ubpf_py.intarget.header import host_facts, write_header

    f = make_frame(arena)
    facts = host_facts()
    write_header(f.header, **facts)
    assert facts["max_stack"] >= 1 and facts["hz"] in (100, 250, 300, 1000)
    a = jiffies64()
    v = rt.helper(118)(0, 0, 0, 0, 0, f.addr)
    b = jiffies64()
    assert a <= v <= b


def _my_tcb(size: int = 0x800) -> tuple[int, int, bytes]:
    """(tid, FS base, bytes at the FS base) of the calling thread."""
    libc = ctypes.CDLL(None, use_errno=True)
    fs = ctypes.c_uint64()
    assert libc.syscall(158, 0x1003, ctypes.byref(fs)) == 0   # arch_prctl(ARCH_GET_FS)
    return tid(), fs.value, ctypes.string_at(fs.value, size)


@pytest.mark.skipif(not cpu_has("fsgsbase"), reason="no FSGSBASE")
def test_tid_from_the_libc_word_without_a_syscall(arena, rt):
    from ubpf_py.abi.runtime import RT_F_FSGSBASE
    from ubpf_py.intarget.header import host_facts, tid_fs_offset

    if not host_facts()["flags"] & RT_F_FSGSBASE:
        pytest.skip("the kernel does not let user space use rdfsbase")
    got: dict[int, bytes] = {}

    def grab():
        t, _fs, raw = _my_tcb()
        got[t] = raw

    ts = [threading.Thread(target=grab) for _ in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    off = tid_fs_offset(got)
    assert off, "no struct pthread tid word found"
    assert tid_fs_offset({1: bytes(0x800)}) == 0
    shared = make_frame(arena)               # one thread block for every thread: must revalidate
    own = [make_frame(arena) for _ in range(5)]   # (make_frame rewrites the shared header: first)
    shared.set_header("tid_fs_off", off)
    shared.set_header("flags", shared.header[RUNTIME_HEADER.word("flags")] | RT_F_FSGSBASE)
    results: list[tuple[int, int, int, int]] = []

    def body():
        mine = own.pop()
        for _ in range(3):
            a = rt.helper(14)(0, 0, 0, 0, 0, shared.addr)
            b = rt.helper(14)(0, 0, 0, 0, 0, mine.addr)
            results.append((a & 0xFFFFFFFF, b & 0xFFFFFFFF, tid(), mine.thread[THREAD_BLOCK.word("tid")]))

    ts = [threading.Thread(target=body) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    body()
    for a, b, real, cached in results:
        assert a == b == real and cached == real     # cached after its check: no syscall next time
    shared.set_header("tid_fs_off", 0)
