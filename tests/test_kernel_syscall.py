"""Low-level kernel API: bpf() maps, program load with verifier log, test_run."""

from __future__ import annotations

import errno
import struct
from pathlib import Path

import pytest

from ubpf_py.errors import KernelBackendError
from ubpf_py.isa import Instruction, decode
from ubpf_py.kernel.maps import BPF_EXIST, BPF_NOEXIST, KernelMap, possible_cpus
from ubpf_py.kernel.prog import SOCKET_FILTER, prog_load, prog_test_run
from ubpf_py.kernel.syscall import BPF_MAP_CREATE, MapCreateAttr, bpf, kernel_bpf_skip_reason

pytestmark = pytest.mark.kernel


@pytest.fixture(autouse=True)
def _need_kernel_bpf() -> None:
    reason = kernel_bpf_skip_reason()
    if reason:
        pytest.skip(reason)


def u32(v: int) -> bytes:
    return struct.pack("<I", v)


def u64(v: int) -> bytes:
    return struct.pack("<Q", v)


def test_possible_cpus_matches_sysfs() -> None:
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    last = int(text.replace(",", "-").split("-")[-1])
    assert possible_cpus() >= 1
    assert possible_cpus() <= last + 1


def test_bpf_raises_with_command_and_errno() -> None:
    with pytest.raises(KernelBackendError) as info:
        bpf(BPF_MAP_CREATE, MapCreateAttr(map_type=2, key_size=4, value_size=0, max_entries=1))
    assert info.value.errno == errno.EINVAL
    assert "BPF_MAP_CREATE" in str(info.value) and "EINVAL" in str(info.value)


def test_hash_map_operations_return_codes() -> None:
    with KernelMap.create(1, 4, 8, 2, name="h") as m:
        assert m.fd >= 0
        assert m.lookup(u32(1)) is None
        assert m.update(u32(1), u64(10)) == 0
        assert m.update(u32(1), u64(11), BPF_NOEXIST) == -errno.EEXIST
        assert m.update(u32(2), u64(20), BPF_EXIST) == -errno.ENOENT
        assert m.update(u32(2), u64(20)) == 0
        assert m.update(u32(3), u64(30)) == -errno.E2BIG
        assert m.lookup(u32(1)) == u64(10)
        assert sorted(m.all_keys()) == [u32(1), u32(2)]
        first = m.get_next_key(None)
        assert first in (u32(1), u32(2))
        assert m.get_next_key(first) not in (None, first)
        assert m.delete(u32(1)) == 0
        assert m.delete(u32(1)) == -errno.ENOENT
        assert m.lookup_and_delete(u32(2)) == u64(20)
        assert m.all_keys() == []


def test_array_map_and_freeze() -> None:
    with KernelMap.create(2, 4, 4, 3) as m:
        assert m.lookup(u32(2)) == u32(0)
        assert m.lookup(u32(3)) is None
        assert m.update(u32(0), u32(5)) == 0
        assert m.update(u32(0), u32(5), BPF_NOEXIST) == -errno.EEXIST
        assert m.delete(u32(0)) == -errno.EINVAL
        assert m.freeze() == 0
        assert m.update(u32(0), u32(6)) == -errno.EPERM
        assert m.lookup(u32(0)) == u32(5)


def test_percpu_values_are_rounded_and_replicated() -> None:
    n = possible_cpus()
    with KernelMap.create(6, 4, 4, 1) as m:
        assert m.update(u32(0), u32(7)) == 0
        assert len(m.lookup(u32(0))) == 8 * n
        assert m.lookup_percpu(u32(0)) == [u32(7)] * n
        per_cpu = b"".join(u32(i) + bytes(4) for i in range(n))
        assert m.update(u32(0), per_cpu) == 0
        assert m.lookup_percpu(u32(0)) == [u32(i) for i in range(n)]


def test_queue_and_stack() -> None:
    with KernelMap.create(22, 0, 4, 2) as q:
        assert q.peek() == -errno.ENOENT
        assert q.push(b"aaaa") == 0 and q.push(b"bbbb") == 0
        assert q.push(b"cccc") == -errno.E2BIG
        assert q.push(b"cccc", BPF_EXIST) == 0
        assert q.peek() == b"bbbb"
        assert [q.pop(), q.pop(), q.pop()] == [b"bbbb", b"cccc", -errno.ENOENT]
    with KernelMap.create(23, 0, 4, 4) as s:
        s.push(b"aaaa")
        s.push(b"bbbb")
        assert s.pop() == b"bbbb"


def test_load_and_test_run_socket_filter() -> None:
    # r0 = 42; exit
    fd = prog_load([Instruction(0xB7, 0, 0, 0, 42), Instruction(0x95)], SOCKET_FILTER, prog_name="ret42")
    try:
        res = prog_test_run(fd, b"\0" * 64, repeat=5)
        assert res.retval == 42
        assert len(res.data_out) == 64
    finally:
        import os

        os.close(fd)


def test_program_reads_map_through_fd() -> None:
    """lddw src=1 (BPF_PSEUDO_MAP_FD) + map_lookup_elem: the return value is the map value."""
    with KernelMap.create(2, 4, 8, 1) as m:
        m.update(u32(0), u64(1234))
        insns = [
            Instruction(0x62, 10, 0, -4, 0),            # *(u32 *)(r10 - 4) = 0
            Instruction(0xBF, 2, 10),                    # r2 = r10
            Instruction(0x07, 2, 0, 0, -4),              # r2 += -4
            Instruction(0x18, 1, 1, 0, m.fd, 0),         # r1 = map fd
            Instruction(0),
            Instruction(0x85, 0, 0, 0, 1),               # call map_lookup_elem
            Instruction(0x15, 0, 0, 1, 0),               # if r0 == 0 goto +1
            Instruction(0x79, 0, 0, 0, 0),               # r0 = *(u64 *)(r0 + 0)
            Instruction(0x95),
        ]
        fd = prog_load(insns, SOCKET_FILTER)
        try:
            assert prog_test_run(fd, b"\0" * 64).retval == 1234
        finally:
            import os

            os.close(fd)


def test_rejected_program_carries_verifier_log() -> None:
    with pytest.raises(KernelBackendError) as info:
        prog_load(decode(bytes.fromhex("9500000000000000")), SOCKET_FILTER, prog_name="noret")
    err = info.value
    assert err.errno == errno.EACCES
    assert "R0 !read_ok" in err.log
    assert "noret" in str(err) and "R0 !read_ok" in str(err)
    assert "\n" not in str(err)
