"""Loading programs into the kernel (BPF_PROG_LOAD) and running them (BPF_PROG_TEST_RUN).

``prog_load`` takes the project's instruction lists (``ubpf_py.isa.Instruction``,
encoded with ``ubpf_py.isa.encode``) so the kernel verifier sees exactly the bytes the
userspace engines run.  On rejection it raises ``KernelBackendError`` carrying the
verifier log in ``.log`` and the errno in ``.errno``; the message's first line says
which program and quotes the verifier's last meaningful line.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

from ubpf_py.errors import KernelBackendError, KernelVerifierError
from ubpf_py.isa.instruction import Instruction, encode
from ubpf_py.kernel.maps import kernel_object_name
from ubpf_py.kernel.syscall import (
    BPF_BTF_LOAD,
    BPF_PROG_LOAD,
    BPF_PROG_TEST_RUN,
    BtfLoadAttr,
    ProgLoadAttr,
    TestRunAttr,
    bpf_rc,
    errno_name,
)

# enum bpf_prog_type
SOCKET_FILTER = 1
KPROBE = 2
SYSCALL = 31

# prog_flags
BPF_F_SLEEPABLE = 1 << 4

#: default verifier log size when a log is requested or a load is retried for its log
DEFAULT_LOG_SIZE = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class TestRunResult:
    """What BPF_PROG_TEST_RUN reports."""

    __test__ = False  # not a pytest class
    retval: int
    duration_ns: int
    data_out: bytes
    ctx_out: bytes = b""


def _summary(log: str) -> str:
    """The verifier's error line: the last non-statistics line of the log."""
    lines = [ln for ln in log.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith(("processed ", "verification time", "stack depth", "max_states_per_insn")):
            continue
        return ln.strip()
    return ""


def prog_load(insns: list[Instruction] | bytes, prog_type: int, license: str = "GPL", *,
              log_level: int = 0, log_size: int = DEFAULT_LOG_SIZE, expected_attach_type: int = 0,
              kern_version: int = 0, prog_name: str = "", prog_flags: int = 0, btf_fd: int = 0,
              func_info: bytes | None = None, func_info_rec_size: int = 8,
              line_info: bytes | None = None, line_info_rec_size: int = 16,
              fd_array: list[int] | None = None, attach_btf_id: int = 0) -> int:
    """Load a program and return its fd.

    ``log_level`` 0 loads without a log and, on failure, retries once at level 1 so
    that the error always carries the verifier log (what libbpf does too).
    ``func_info``/``line_info`` are raw ``bpf_func_info``/``bpf_line_info`` records
    (need ``btf_fd``).  Raises KernelBackendError(.log, .errno) on rejection."""
    code = encode(insns) if not isinstance(insns, (bytes, bytearray)) else bytes(insns)
    if not code:
        raise KernelBackendError(f"BPF_PROG_LOAD of {prog_name or 'program'}: program has no instructions")
    keep: list[object] = []

    def addr_of(data: bytes | None) -> int:
        if not data:
            return 0
        buf = ctypes.create_string_buffer(data, len(data))
        keep.append(buf)
        return ctypes.addressof(buf)

    insn_buf = addr_of(code)
    lic = addr_of(license.encode() + b"\0")
    fd_arr = 0
    if fd_array:
        arr = (ctypes.c_int32 * len(fd_array))(*fd_array)
        keep.append(arr)
        fd_arr = ctypes.addressof(arr)

    def attempt(level: int) -> tuple[int, str]:
        log_buf = ctypes.create_string_buffer(log_size) if level else None
        attr = ProgLoadAttr(
            prog_type=prog_type, insn_cnt=len(code) // 8, insns=insn_buf, license=lic,
            log_level=level, log_size=log_size if level else 0,
            log_buf=ctypes.addressof(log_buf) if log_buf is not None else 0,
            kern_version=kern_version, prog_flags=prog_flags, prog_name=kernel_object_name(prog_name),
            expected_attach_type=expected_attach_type, prog_btf_fd=btf_fd,
            func_info_rec_size=func_info_rec_size if func_info else 0, func_info=addr_of(func_info),
            func_info_cnt=len(func_info) // func_info_rec_size if func_info else 0,
            line_info_rec_size=line_info_rec_size if line_info else 0, line_info=addr_of(line_info),
            line_info_cnt=len(line_info) // line_info_rec_size if line_info else 0,
            attach_btf_id=attach_btf_id, fd_array=fd_arr,
        )
        rc = bpf_rc(BPF_PROG_LOAD, attr)
        log = log_buf.value.decode(errors="replace") if log_buf is not None else ""
        return rc, log

    rc, log = attempt(log_level)
    if rc < 0 and log_level == 0:
        rc2, log = attempt(1)
        if rc2 >= 0:  # should not happen: same program; keep the fd rather than leak it
            return rc2
        rc = rc2
    if rc < 0:
        err = -rc
        what = _summary(log)
        name = prog_name or "program"
        msg = f"kernel verifier rejected {name}: {what}" if what else \
            f"BPF_PROG_LOAD of {name} failed: {os.strerror(err)} ({errno_name(err)})"
        cls = KernelVerifierError if what else KernelBackendError
        raise cls(msg, errno=err, log=log)
    return rc


def prog_test_run(fd: int, data_in: bytes = b"", ctx_in: bytes | None = None, repeat: int = 1, *,
                  data_out_size: int | None = None, ctx_out_size: int = 0, flags: int = 0,
                  cpu: int = 0) -> TestRunResult:
    """BPF_PROG_TEST_RUN (socket filters, XDP, tc, SYSCALL ...; kprobe programs have no
    test_run in the kernel and get EOPNOTSUPP/ENOTSUPP)."""
    keep: list[object] = []

    def buf(data: bytes, size: int) -> int:
        b = ctypes.create_string_buffer(data, max(size, len(data), 1))
        keep.append(b)
        return ctypes.addressof(b)

    out_size = data_out_size if data_out_size is not None else (len(data_in) + 256 if data_in else 0)
    out_buf = ctypes.create_string_buffer(max(out_size, 1))
    ctx_out_buf = ctypes.create_string_buffer(max(ctx_out_size, 1))
    attr = TestRunAttr(
        prog_fd=fd, data_size_in=len(data_in), data_size_out=out_size,
        data_in=buf(data_in, len(data_in)) if data_in else 0,
        data_out=ctypes.addressof(out_buf) if out_size else 0, repeat=repeat,
        ctx_size_in=len(ctx_in) if ctx_in else 0, ctx_in=buf(ctx_in, len(ctx_in)) if ctx_in else 0,
        ctx_size_out=ctx_out_size, ctx_out=ctypes.addressof(ctx_out_buf) if ctx_out_size else 0,
        flags=flags, cpu=cpu,
    )
    rc = bpf_rc(BPF_PROG_TEST_RUN, attr)
    if rc < 0:
        err = -rc
        why = "ENOTSUPP: this program type has no test_run" if err == 524 else \
            f"{os.strerror(err)} ({errno_name(err)})"
        raise KernelBackendError(f"BPF_PROG_TEST_RUN of fd {fd} failed: {why}", errno=err)
    return TestRunResult(
        retval=attr.retval, duration_ns=attr.duration,
        data_out=out_buf.raw[: attr.data_size_out] if out_size else b"",
        ctx_out=ctx_out_buf.raw[: attr.ctx_size_out] if ctx_out_size else b"",
    )


def btf_load(raw_btf: bytes, *, log_level: int = 0, log_size: int = DEFAULT_LOG_SIZE) -> int:
    """BPF_BTF_LOAD of a raw .BTF section; returns the BTF fd.  On failure retries with
    a log so the error carries the kernel's reason (KernelBackendError .log/.errno)."""
    data = ctypes.create_string_buffer(bytes(raw_btf), len(raw_btf))

    def attempt(level: int) -> tuple[int, str]:
        log_buf = ctypes.create_string_buffer(log_size) if level else None
        attr = BtfLoadAttr(btf=ctypes.addressof(data), btf_size=len(raw_btf),
                           btf_log_buf=ctypes.addressof(log_buf) if log_buf is not None else 0,
                           btf_log_size=log_size if level else 0, btf_log_level=level)
        rc = bpf_rc(BPF_BTF_LOAD, attr)
        return rc, (log_buf.value.decode(errors="replace") if log_buf is not None else "")

    rc, log = attempt(log_level)
    if rc < 0 and log_level == 0:
        rc2, log = attempt(1)
        if rc2 >= 0:
            return rc2
        rc = rc2
    if rc < 0:
        err = -rc
        raise KernelBackendError(f"BPF_BTF_LOAD failed: {os.strerror(err)} ({errno_name(err)})"
                                 + (f": {_summary(log)}" if log else ""), errno=err, log=log)
    return rc
