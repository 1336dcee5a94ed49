"""The bpf(2) system call through ctypes, with the ``union bpf_attr`` layouts we use.

Why ctypes and not libbpf: the kernel backend must see exactly what the spec-level
loader produced (instructions, maps, BTF) so that it can serve as an oracle for the
userspace engine; libbpf would re-parse the ELF and apply its own rules.  The attr
structures below are the kernel's UAPI layouts (include/uapi/linux/bpf.h); each
command only uses a prefix of the union, and the kernel accepts a shorter ``size``
as long as the fields it does not know are absent.

``bpf(cmd, attr)`` returns the syscall's non-negative result and raises
``KernelBackendError`` (message naming the command and the errno string, ``.errno``
set) on failure.  Callers that want a return code instead (map operations, so that
results can be compared with the userspace maps) use ``bpf_rc``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno as _errno
import os
import platform

from ubpf_py.errors import KernelBackendError

# bpf() syscall number per architecture (the project targets x86-64)
_SYSCALL_NR = {"x86_64": 321, "aarch64": 280}

# enum bpf_cmd
BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_PROG_LOAD = 5
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_TEST_RUN = 10
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_BTF_LOAD = 18
BPF_MAP_LOOKUP_AND_DELETE_ELEM = 21
BPF_MAP_FREEZE = 22
BPF_LINK_CREATE = 28

CMD_NAMES = {
    BPF_MAP_CREATE: "BPF_MAP_CREATE", BPF_MAP_LOOKUP_ELEM: "BPF_MAP_LOOKUP_ELEM",
    BPF_MAP_UPDATE_ELEM: "BPF_MAP_UPDATE_ELEM", BPF_MAP_DELETE_ELEM: "BPF_MAP_DELETE_ELEM",
    BPF_MAP_GET_NEXT_KEY: "BPF_MAP_GET_NEXT_KEY", BPF_PROG_LOAD: "BPF_PROG_LOAD",
    BPF_OBJ_PIN: "BPF_OBJ_PIN", BPF_OBJ_GET: "BPF_OBJ_GET", BPF_PROG_TEST_RUN: "BPF_PROG_TEST_RUN",
    BPF_OBJ_GET_INFO_BY_FD: "BPF_OBJ_GET_INFO_BY_FD", BPF_BTF_LOAD: "BPF_BTF_LOAD",
    BPF_MAP_LOOKUP_AND_DELETE_ELEM: "BPF_MAP_LOOKUP_AND_DELETE_ELEM",
    BPF_MAP_FREEZE: "BPF_MAP_FREEZE", BPF_LINK_CREATE: "BPF_LINK_CREATE",
}

# enum bpf_attach_type values we use
BPF_PERF_EVENT = 41


class MapCreateAttr(ctypes.Structure):
    """BPF_MAP_CREATE."""

    _fields_ = [
        ("map_type", ctypes.c_uint32), ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32), ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32), ("inner_map_fd", ctypes.c_uint32),
        ("numa_node", ctypes.c_uint32), ("map_name", ctypes.c_char * 16),
        ("map_ifindex", ctypes.c_uint32), ("btf_fd", ctypes.c_uint32),
        ("btf_key_type_id", ctypes.c_uint32), ("btf_value_type_id", ctypes.c_uint32),
        ("btf_vmlinux_value_type_id", ctypes.c_uint32), ("map_extra", ctypes.c_uint64),
    ]


class MapElemAttr(ctypes.Structure):
    """BPF_MAP_*_ELEM, GET_NEXT_KEY, FREEZE (``value`` doubles as ``next_key``)."""

    _fields_ = [
        ("map_fd", ctypes.c_uint32), ("_pad", ctypes.c_uint32),
        ("key", ctypes.c_uint64), ("value", ctypes.c_uint64), ("flags", ctypes.c_uint64),
    ]


class ProgLoadAttr(ctypes.Structure):
    """BPF_PROG_LOAD."""

    _fields_ = [
        ("prog_type", ctypes.c_uint32), ("insn_cnt", ctypes.c_uint32),
        ("insns", ctypes.c_uint64), ("license", ctypes.c_uint64),
        ("log_level", ctypes.c_uint32), ("log_size", ctypes.c_uint32),
        ("log_buf", ctypes.c_uint64), ("kern_version", ctypes.c_uint32),
        ("prog_flags", ctypes.c_uint32), ("prog_name", ctypes.c_char * 16),
        ("prog_ifindex", ctypes.c_uint32), ("expected_attach_type", ctypes.c_uint32),
        ("prog_btf_fd", ctypes.c_uint32), ("func_info_rec_size", ctypes.c_uint32),
        ("func_info", ctypes.c_uint64), ("func_info_cnt", ctypes.c_uint32),
        ("line_info_rec_size", ctypes.c_uint32), ("line_info", ctypes.c_uint64),
        ("line_info_cnt", ctypes.c_uint32), ("attach_btf_id", ctypes.c_uint32),
        ("attach_prog_fd", ctypes.c_uint32), ("core_relo_cnt", ctypes.c_uint32),
        ("fd_array", ctypes.c_uint64), ("core_relos", ctypes.c_uint64),
        ("core_relo_rec_size", ctypes.c_uint32), ("log_true_size", ctypes.c_uint32),
    ]


class TestRunAttr(ctypes.Structure):
    """BPF_PROG_TEST_RUN."""

    __test__ = False  # not a pytest class
    _fields_ = [
        ("prog_fd", ctypes.c_uint32), ("retval", ctypes.c_uint32),
        ("data_size_in", ctypes.c_uint32), ("data_size_out", ctypes.c_uint32),
        ("data_in", ctypes.c_uint64), ("data_out", ctypes.c_uint64),
        ("repeat", ctypes.c_uint32), ("duration", ctypes.c_uint32),
        ("ctx_size_in", ctypes.c_uint32), ("ctx_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_uint64), ("ctx_out", ctypes.c_uint64),
        ("flags", ctypes.c_uint32), ("cpu", ctypes.c_uint32), ("batch_size", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
    ]


class BtfLoadAttr(ctypes.Structure):
    """BPF_BTF_LOAD."""

    _fields_ = [
        ("btf", ctypes.c_uint64), ("btf_log_buf", ctypes.c_uint64),
        ("btf_size", ctypes.c_uint32), ("btf_log_size", ctypes.c_uint32),
        ("btf_log_level", ctypes.c_uint32), ("btf_log_true_size", ctypes.c_uint32),
    ]


class LinkCreateAttr(ctypes.Structure):
    """BPF_LINK_CREATE for a perf event (``bpf_cookie`` is the perf_event union member)."""

    _fields_ = [
        ("prog_fd", ctypes.c_uint32), ("target_fd", ctypes.c_uint32),
        ("attach_type", ctypes.c_uint32), ("flags", ctypes.c_uint32),
        ("bpf_cookie", ctypes.c_uint64), ("_rest", ctypes.c_uint64 * 4),
    ]


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def _syscall_nr() -> int:
    machine = platform.machine()
    if machine not in _SYSCALL_NR:
        from ubpf_py.errors import NotSupportedError

        raise NotSupportedError(f"kernel backend on {machine} (bpf() syscall number unknown)")
    return _SYSCALL_NR[machine]


def _as_buffer(attr: ctypes.Structure | bytes | bytearray) -> tuple[object, int]:
    """A pointer-able buffer for ``attr`` and its size.  Structures are passed by
    reference so that the kernel's writes (retval, log_true_size, ...) land in them."""
    if isinstance(attr, ctypes.Structure):
        return ctypes.byref(attr), ctypes.sizeof(attr)
    buf = ctypes.create_string_buffer(bytes(attr), len(attr))
    return buf, len(attr)


def bpf_rc(cmd: int, attr: ctypes.Structure | bytes | bytearray) -> int:
    """Run bpf(cmd, attr) and return its result, or ``-errno`` on failure (never raises
    for kernel refusals; map operations use this so codes compare with ours)."""
    ptr, size = _as_buffer(attr)
    ret = _syscall(ctypes.c_long(_syscall_nr()), ctypes.c_long(cmd), ptr, ctypes.c_uint(size))
    if ret < 0:
        return -ctypes.get_errno()
    return int(ret)


def bpf(cmd: int, attr: ctypes.Structure | bytes | bytearray) -> int:
    """Run bpf(cmd, attr); return the (non-negative) result, e.g. a new fd.

    Raises ``KernelBackendError`` naming the command and the errno string."""
    ret = bpf_rc(cmd, attr)
    if ret < 0:
        err = -ret
        name = CMD_NAMES.get(cmd, f"bpf command {cmd}")
        raise KernelBackendError(f"{name} failed: {os.strerror(err)} ({_errno.errorcode.get(err, err)})",
                                 errno=err)
    return ret


def errno_name(code: int) -> str:
    """``-2`` or ``2`` -> ``ENOENT`` (for messages and comparisons in tests)."""
    return _errno.errorcode.get(abs(code), str(code))


_skip_cache: list[str | None] = []


def kernel_bpf_skip_reason() -> str | None:
    """None when this process can create maps and load programs; else why not (for
    ``pytest.skip``).  Checks root, then actually creates an array map and loads a
    two-instruction program, so a locked-down kernel (lockdown, unprivileged BPF off,
    seccomp in a container) is detected instead of guessed."""
    if _skip_cache:
        return _skip_cache[0]
    reason: str | None = None
    if platform.machine() not in _SYSCALL_NR:
        reason = f"kernel backend not available on {platform.machine()}"
    elif os.geteuid() != 0:
        reason = "kernel BPF tests need root"
    else:
        attr = MapCreateAttr(map_type=2, key_size=4, value_size=8, max_entries=1)
        fd = bpf_rc(BPF_MAP_CREATE, attr)
        if fd < 0:
            reason = f"kernel refuses BPF_MAP_CREATE: {os.strerror(-fd)}"
        else:
            os.close(fd)
            # r0 = 0; exit  (socket filter: the most widely allowed program type)
            code = bytes.fromhex("b700000000000000" "9500000000000000")
            insns = ctypes.create_string_buffer(code, len(code))
            lic = ctypes.create_string_buffer(b"GPL")
            pattr = ProgLoadAttr(prog_type=1, insn_cnt=2, insns=ctypes.addressof(insns),
                                 license=ctypes.addressof(lic))
            pfd = bpf_rc(BPF_PROG_LOAD, pattr)
            if pfd < 0:
                reason = f"kernel refuses BPF_PROG_LOAD: {os.strerror(-pfd)}"
            else:
                os.close(pfd)
    _skip_cache.append(reason)
    return reason
