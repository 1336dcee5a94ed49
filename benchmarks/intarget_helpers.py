"""ns per call of the in-target runtime's helpers, measured in this process.

The runtime object (runtime/*.c) is linked into this process exactly as it is into a
target, and a small C loop calls each helper through its address with a fake hit
frame (tests/intarget_fixture.py), so the numbers are the helpers' own cost with no
Python or ctypes per call.  Usage: ``python3 benchmarks/intarget_helpers.py [--quick]``.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from intarget_fixture import driver, make_frame

from ubpf_py.abi.runtime import RT_F_FSGSBASE
from ubpf_py.intarget import runtime_obj
from ubpf_py.intarget.arena import SharedArena
from ubpf_py.intarget.header import host_facts, tid_fs_offset, write_header
from ubpf_py.maps import consts as C
from ubpf_py.maps import create_map
from ubpf_py.obj.spec import MapSpec


class _Factory:
    def mktemp(self, name: str) -> Path:
        return Path(tempfile.mkdtemp(prefix=name))


def measure(n: int) -> list[tuple[str, float]]:
    rt = runtime_obj.tracer_runtime()
    lib = driver(_Factory())
    if lib is None:
        raise SystemExit("no C compiler")
    arena = SharedArena(512 << 20)
    f = make_frame(arena)
    arr = create_map(MapSpec("a", C.ARRAY, 4, 8, 16), alloc=arena)
    h = create_map(MapSpec("h", C.HASH, 4, 8, 1024), alloc=arena)
    lru = create_map(MapSpec("l", C.LRU_HASH, 4, 8, 1024), alloc=arena)
    rb = create_map(MapSpec("rb", C.RINGBUF, 0, 0, 64 << 20), alloc=arena)
    scratch = arena.alloc(4096, 64)
    key = scratch.addr
    val = scratch.addr + 64
    dst = scratch.addr + 128
    user = ctypes.create_string_buffer(b"abcdefg\0", 64)   # target memory: outside the arena
    src = ctypes.addressof(user)
    scratch.view[0:4] = (7).to_bytes(4, "little")
    for m in (h, lru):
        m.update((7).to_bytes(4, "little"), bytes(8))

    def addr(hid: int) -> int:
        return ctypes.cast(rt.helper(hid), ctypes.c_void_p).value

    cases = [
        ("map_lookup_elem, array", 1, (arr.handle_addr, key, 0, 0, 0)),
        ("map_lookup_elem, hash (hit)", 1, (h.handle_addr, key, 0, 0, 0)),
        ("map_lookup_elem, LRU hash (hit)", 1, (lru.handle_addr, key, 0, 0, 0)),
        ("map_update_elem, hash, existing key", 2, (h.handle_addr, key, val, 0, 0)),
        ("map_update_elem, array", 2, (arr.handle_addr, key, val, 0, 0)),
        ("ringbuf_output, 16 bytes", 130, (rb.handle_addr, src, 16, 0, 0)),
        ("probe_read_user, 8 bytes", 112, (dst, 8, src, 0, 0)),
        ("probe_read_user_str, 8 bytes", 114, (dst, 16, src, 0, 0)),
        ("ktime_get_ns (vDSO)", 5, (0, 0, 0, 0, 0)),
        ("get_smp_processor_id (rdpid)", 8, (0, 0, 0, 0, 0)),
        ("get_current_pid_tgid", 14, (0, 0, 0, 0, 0)),
        ("get_current_uid_gid", 15, (0, 0, 0, 0, 0)),
        ("get_prandom_u32", 7, (0, 0, 0, 0, 0)),
    ]
    def best(hid: int, args: tuple[int, ...]) -> float:
        """the fastest of 5 rounds: the machine is shared, the minimum is the helper's cost"""
        lib.bench(addr(hid), *args, f.addr, n // 10)     # warm up
        return min(lib.bench(addr(hid), *args, f.addr, n // 5) for _ in range(5))

    out = [(name, best(hid, args)) for name, hid, args in cases]
    facts = host_facts()
    libc = ctypes.CDLL(None)
    fs = ctypes.c_uint64()
    libc.syscall(158, 0x1003, ctypes.byref(fs))          # arch_prctl(ARCH_GET_FS)
    off = tid_fs_offset({threading.get_native_id(): ctypes.string_at(fs.value, 0x800)})
    if off and facts["flags"] & RT_F_FSGSBASE:
        write_header(f.header, flags=RT_F_FSGSBASE, tid_fs_off=off)
        out.append(("get_current_pid_tgid (libc tid word, tgid cached)", best(14, (0, 0, 0, 0, 0))))
        write_header(f.header, tid_fs_off=0)
    f.set_header("vdso_clock_gettime", 0)
    out.append(("ktime_get_ns (syscall, no vDSO)", best(5, (0, 0, 0, 0, 0))))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer calls (CI smoke run)")
    a = ap.parse_args()
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    rows = measure(20_000 if a.quick else 1_000_000)
    print("| helper | ns per call |\n| --- | ---: |")
    for name, ns in rows:
        print(f"| {name} | {ns:.1f} |")


if __name__ == "__main__":
    main()
