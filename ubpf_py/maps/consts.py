"""Kernel constants the maps follow: map type numbers, flags and errno values.

Numbers come from <linux/bpf.h> and <errno.h>; they are facts of the kernel ABI,
kept in one place so every map family and the helpers agree on them.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from ubpf_py.abi.bpf import MapType
from ubpf_py.sysinfo import possible_cpus  # noqa: F401 - re-exported: maps size per-CPU storage by it

# enum bpf_map_type (defined once in abi.bpf)
HASH = MapType.HASH
ARRAY = MapType.ARRAY
PROG_ARRAY = MapType.PROG_ARRAY
PERF_EVENT_ARRAY = MapType.PERF_EVENT_ARRAY
PERCPU_HASH = MapType.PERCPU_HASH
PERCPU_ARRAY = MapType.PERCPU_ARRAY
STACK_TRACE = MapType.STACK_TRACE
CGROUP_ARRAY = MapType.CGROUP_ARRAY
LRU_HASH = MapType.LRU_HASH
LRU_PERCPU_HASH = MapType.LRU_PERCPU_HASH
LPM_TRIE = MapType.LPM_TRIE
ARRAY_OF_MAPS = MapType.ARRAY_OF_MAPS
HASH_OF_MAPS = MapType.HASH_OF_MAPS
QUEUE = MapType.QUEUE
STACK = MapType.STACK
RINGBUF = MapType.RINGBUF
BLOOM_FILTER = MapType.BLOOM_FILTER

# update flags
BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2
BPF_F_LOCK = 4

# map_flags at creation
BPF_F_NO_PREALLOC = 1 << 0
BPF_F_NO_COMMON_LRU = 1 << 1
BPF_F_NUMA_NODE = 1 << 2
BPF_F_RDONLY = 1 << 3
BPF_F_WRONLY = 1 << 4
BPF_F_STACK_BUILD_ID = 1 << 5
BPF_F_ZERO_SEED = 1 << 6
BPF_F_RDONLY_PROG = 1 << 7
BPF_F_WRONLY_PROG = 1 << 8
BPF_F_MMAPABLE = 1 << 10
BPF_F_PRESERVE_ELEMS = 1 << 11
BPF_F_INNER_MAP = 1 << 12
ACCESS_MASK = BPF_F_RDONLY | BPF_F_WRONLY | BPF_F_RDONLY_PROG | BPF_F_WRONLY_PROG

# stack trace helper flags
BPF_F_SKIP_FIELD_MASK = 0xFF
BPF_F_USER_STACK = 1 << 8
BPF_F_FAST_STACK_CMP = 1 << 9
BPF_F_REUSE_STACKID = 1 << 10
BPF_F_USER_BUILD_ID = 1 << 11

# ring buffer
BPF_RINGBUF_BUSY_BIT = 1 << 31
BPF_RINGBUF_DISCARD_BIT = 1 << 30
BPF_RINGBUF_HDR_SZ = 8
BPF_RB_NO_WAKEUP = 1
BPF_RB_FORCE_WAKEUP = 2
BPF_RB_AVAIL_DATA = 0
BPF_RB_RING_SIZE = 1
BPF_RB_CONS_POS = 2
BPF_RB_PROD_POS = 3

# perf_event_output
BPF_F_INDEX_MASK = 0xFFFFFFFF
BPF_F_CURRENT_CPU = BPF_F_INDEX_MASK

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

# errno values (Linux)
EPERM = 1
ENOENT = 2
ESRCH = 3
EBADF = 9
EAGAIN = 11
ENOMEM = 12
EFAULT = 14
ERANGE = 34
#: x86-64 TASK_SIZE_MAX: addresses below are user space to the kernel
TASK_SIZE = 0x00007FFFFFFFF000
EBUSY = 16
EEXIST = 17
EINVAL = 22
ENOSPC = 28
E2BIG = 7
EOPNOTSUPP = 95
ENOTSUPP = 524  # kernel-internal "operation not supported" (what map ops return)


def round8(n: int) -> int:
    return (n + 7) & ~7





@functools.cache
def perf_event_max_stack() -> int:
    """kernel.perf_event_max_stack (127 by default): the deepest stack helpers return."""
    try:
        return int(Path("/proc/sys/kernel/perf_event_max_stack").read_text())
    except (OSError, ValueError):
        return 127
