"""The RUNTIME_HEADER facts the tracer knows about the host, and writing them.

The injector fills the per-target fields (vDSO addresses, thread table, pid, ...);
these are the machine-wide ones the runtime needs for kernel-exact answers: whether
``rdpid`` works (per-CPU maps, bpf_get_smp_processor_id), the deepest stack the
stack helpers return, and the jiffies calibration of bpf_jiffies64.
"""

from __future__ import annotations

from ubpf_py.abi.runtime import RT_F_RDPID, RUNTIME_HEADER
from ubpf_py.helpers.task_helpers import _jiffies_base
from ubpf_py.maps.consts import perf_event_max_stack
from ubpf_py.sysinfo import cpu_has


def host_facts() -> dict[str, int]:
    """Header fields that are the same for every process on this machine."""
    base, hz = _jiffies_base()
    return {"flags": RT_F_RDPID if cpu_has("rdpid") else 0, "max_stack": perf_event_max_stack(),
            "hz": hz, "jiffies_base": base}


def write_header(header_view: memoryview, **fields: int) -> None:
    """Set RUNTIME_HEADER words by name (``flags`` is or-ed in, the rest replaced)."""
    w = header_view.cast("Q") if header_view.format != "Q" else header_view
    for name, value in fields.items():
        i = RUNTIME_HEADER.word(name)
        w[i] = (w[i] | value) if name == "flags" else value
