"""bpf_printk lines in the format of /sys/kernel/tracing/trace_pipe.

The kernel prints ``<comm>-<pid> [<cpu>] <flags> <secs>.<usecs>: bpf_trace_printk: <msg>``
with the comm right-aligned in 16 columns and the pid left-aligned in 7.  Flags
describe kernel interrupt state, which has no meaning in userspace: we print dots.
"""

from __future__ import annotations


def format_trace_line(comm: str, tid: int, cpu: int, timestamp_ns: int, message: str) -> str:
    secs, nsecs = divmod(timestamp_ns, 1_000_000_000)
    return f"{comm:>16}-{tid:<7} [{cpu:03d}] ..... {secs:5d}.{nsecs // 1000:06d}: bpf_trace_printk: {message}"
