"""perf_event_open(2): uprobe events on the uprobe PMU, BPF attachment with a cookie,
and the per-CPU BPF_OUTPUT events that back PERF_EVENT_ARRAY maps.

Why the PMU and not tracefs ``uprobe_events``: a PMU uprobe is owned by its fd (it
disappears when we close it or die), needs no global names, and carries the pid
filter in the perf event itself, which is what libbpf does on current kernels.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

from ubpf_py.errors import KernelBackendError
from ubpf_py.kernel.syscall import (
    BPF_LINK_CREATE,
    BPF_PERF_EVENT,
    LinkCreateAttr,
    _libc,
    bpf_rc,
    errno_name,
)

_NR_PERF_EVENT_OPEN = 298  # x86-64

PERF_TYPE_SOFTWARE = 1
PERF_COUNT_SW_BPF_OUTPUT = 10
PERF_SAMPLE_RAW = 1 << 10
PERF_FLAG_FD_CLOEXEC = 1 << 3

# ioctls (linux/perf_event.h)
PERF_EVENT_IOC_ENABLE = 0x2400
PERF_EVENT_IOC_SET_BPF = 0x40042408

UPROBE_PMU = Path("/sys/bus/event_source/devices/uprobe")


class PerfEventAttr(ctypes.Structure):
    """struct perf_event_attr (PERF_ATTR_SIZE_VER8, 136 bytes).  ``flags`` holds the
    bitfield word: bit 0 disabled, bit 1 inherit, ... bit 11 watermark."""

    _fields_ = [
        ("type", ctypes.c_uint32), ("size", ctypes.c_uint32), ("config", ctypes.c_uint64),
        ("sample_period", ctypes.c_uint64), ("sample_type", ctypes.c_uint64),
        ("read_format", ctypes.c_uint64), ("flags", ctypes.c_uint64),
        ("wakeup_events", ctypes.c_uint32), ("bp_type", ctypes.c_uint32),
        ("config1", ctypes.c_uint64), ("config2", ctypes.c_uint64),
        ("branch_sample_type", ctypes.c_uint64), ("sample_regs_user", ctypes.c_uint64),
        ("sample_stack_user", ctypes.c_uint32), ("clockid", ctypes.c_int32),
        ("sample_regs_intr", ctypes.c_uint64), ("aux_watermark", ctypes.c_uint32),
        ("sample_max_stack", ctypes.c_uint16), ("_reserved2", ctypes.c_uint16),
        ("aux_sample_size", ctypes.c_uint32), ("_reserved3", ctypes.c_uint32),
        ("sig_data", ctypes.c_uint64), ("config3", ctypes.c_uint64),
    ]


def perf_event_open(attr: PerfEventAttr, pid: int, cpu: int, group_fd: int = -1,
                    flags: int = PERF_FLAG_FD_CLOEXEC, *, what: str = "perf event") -> int:
    attr.size = ctypes.sizeof(PerfEventAttr)
    ret = _libc.syscall(ctypes.c_long(_NR_PERF_EVENT_OPEN), ctypes.byref(attr), ctypes.c_int(pid),
                        ctypes.c_int(cpu), ctypes.c_int(group_fd), ctypes.c_ulong(flags))
    if ret < 0:
        err = ctypes.get_errno()
        raise KernelBackendError(f"perf_event_open for {what} failed: {os.strerror(err)} ({errno_name(err)})",
                                 errno=err)
    return int(ret)


def _pmu_int(path: Path, what: str) -> int:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError) as exc:
        raise KernelBackendError(f"cannot read {path} ({exc}): this kernel has no uprobe PMU for {what}") from None


def uprobe_pmu_type() -> int:
    """The dynamic PMU type number of uprobes."""
    return _pmu_int(UPROBE_PMU / "type", "uprobes")


def uprobe_retprobe_bit() -> int:
    """Which config bit makes a PMU uprobe a return probe (``config:0`` -> 0)."""
    try:
        text = (UPROBE_PMU / "format" / "retprobe").read_text().strip()
        return int(text.split(":")[1].split("-")[0])
    except (OSError, IndexError, ValueError) as exc:
        raise KernelBackendError(f"cannot read the uprobe PMU retprobe format ({exc})") from None


@dataclass
class UprobeLink:
    """One attached uprobe: the perf event fd and the BPF link fd that holds the program."""

    perf_fd: int
    link_fd: int
    path: str
    offset: int
    retprobe: bool
    cookie: int
    pid: int

    def close(self) -> None:
        for fd in (self.link_fd, self.perf_fd):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.link_fd = self.perf_fd = -1


def attach_uprobe(prog_fd: int, path: str, offset: int, *, pid: int = -1, retprobe: bool = False,
                  cookie: int = 0, ref_ctr_offset: int = 0) -> UprobeLink:
    """Create a PMU uprobe at ``path`` + file ``offset`` for ``pid`` (-1: every process)
    and attach ``prog_fd`` to it through a BPF_PERF_EVENT link carrying ``cookie``.

    ``path`` is resolved by the kernel relative to our working directory, as libbpf's
    is.  Falls back to PERF_EVENT_IOC_SET_BPF (no cookie) on kernels without perf links."""
    what = f"{'uretprobe' if retprobe else 'uprobe'} {path}+{offset:#x}"
    if not os.path.exists(path):
        raise KernelBackendError(f"{what}: no such file {path!r}; give the binary's path", errno=2)
    cpath = ctypes.create_string_buffer(os.fsencode(path))
    attr = PerfEventAttr(type=uprobe_pmu_type(), config1=ctypes.addressof(cpath), config2=offset)
    if retprobe:
        attr.config |= 1 << uprobe_retprobe_bit()
    if ref_ctr_offset:
        attr.config |= ref_ctr_offset << 32  # ref_ctr_offset format is config:32-63
    pfd = perf_event_open(attr, pid if pid >= 0 else -1, -1 if pid >= 0 else 0, what=what)
    link_fd = bpf_rc(BPF_LINK_CREATE, LinkCreateAttr(prog_fd=prog_fd, target_fd=pfd,
                                                     attach_type=BPF_PERF_EVENT, bpf_cookie=cookie))
    if link_fd < 0:
        err = -link_fd
        if cookie or err not in (22, 95, 524):  # EINVAL/EOPNOTSUPP/ENOTSUPP: old kernel, no perf links
            os.close(pfd)
            raise KernelBackendError(f"BPF_LINK_CREATE for {what} failed: {os.strerror(err)} ({errno_name(err)})",
                                     errno=err)
        try:
            fcntl.ioctl(pfd, PERF_EVENT_IOC_SET_BPF, prog_fd)
        except OSError as exc:
            os.close(pfd)
            raise KernelBackendError(f"PERF_EVENT_IOC_SET_BPF for {what} failed: {exc.strerror}",
                                     errno=exc.errno or 0) from None
        link_fd = -1
    try:
        fcntl.ioctl(pfd, PERF_EVENT_IOC_ENABLE, 0)
    except OSError as exc:
        os.close(pfd)
        if link_fd >= 0:
            os.close(link_fd)
        raise KernelBackendError(f"PERF_EVENT_IOC_ENABLE for {what} failed: {exc.strerror}",
                                 errno=exc.errno or 0) from None
    return UprobeLink(pfd, link_fd, path, offset, retprobe, cookie, pid)


def open_bpf_output(cpu: int) -> int:
    """A PERF_COUNT_SW_BPF_OUTPUT event on ``cpu`` (what bpf_perf_event_output writes to)."""
    attr = PerfEventAttr(type=PERF_TYPE_SOFTWARE, config=PERF_COUNT_SW_BPF_OUTPUT,
                         sample_type=PERF_SAMPLE_RAW, sample_period=1, wakeup_events=1)
    return perf_event_open(attr, -1, cpu, what=f"BPF output buffer on CPU {cpu}")
