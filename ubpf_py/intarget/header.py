"""The RUNTIME_HEADER facts the tracer knows about the host, and writing them.

The injector fills the per-target fields (vDSO addresses, thread table, pid, ...);
these are the machine-wide ones the runtime needs for kernel-exact answers: whether
``rdpid`` works (per-CPU maps, bpf_get_smp_processor_id), the deepest stack the
stack helpers return, and the jiffies calibration of bpf_jiffies64.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

from ubpf_py.abi.runtime import RT_F_FSGSBASE, RT_F_RDPID, RUNTIME_HEADER, TID_OFFSETS
from ubpf_py.helpers.task_helpers import _jiffies_base
from ubpf_py.intarget.vdso import has_fsgsbase
from ubpf_py.maps.consts import perf_event_max_stack
from ubpf_py.sysinfo import cpu_has


def host_facts() -> dict[str, int]:
    """Header fields that are the same for every process on this machine."""
    base, hz = _jiffies_base()
    flags = (RT_F_RDPID if cpu_has("rdpid") else 0) | (RT_F_FSGSBASE if has_fsgsbase() else 0)
    return {"flags": flags, "max_stack": perf_event_max_stack(), "hz": hz, "jiffies_base": base}


def tid_fs_offset(tcbs: Mapping[int, bytes]) -> int:
    """RUNTIME_HEADER.tid_fs_off from the bytes at each thread's FS base (``{tid: bytes}``,
    read by the tracer from the stopped threads): the offset where every thread holds its
    own tid as a u32.  A known libc offset wins; otherwise one common offset needs two
    threads or more to be believed.  0 (the runtime then calls gettid) when unsure."""
    if not tcbs:
        return 0
    n = min(len(b) for b in tcbs.values()) // 4 * 4

    def holds(off: int) -> bool:
        return off + 4 <= n and all(struct.unpack_from("<I", b, off)[0] == tid for tid, b in tcbs.items())

    for off in TID_OFFSETS:
        if holds(off):
            return off
    common = [off for off in range(8, n, 4) if holds(off)]
    return common[0] if len(common) == 1 and len(tcbs) >= 2 else 0


def write_header(header_view: memoryview, **fields: int) -> None:
    """Set RUNTIME_HEADER words by name (``flags`` is or-ed in, the rest replaced)."""
    w = header_view.cast("Q") if header_view.format != "Q" else header_view
    for name, value in fields.items():
        i = RUNTIME_HEADER.word(name)
        w[i] = (w[i] | value) if name == "flags" else value
