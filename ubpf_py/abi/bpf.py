"""Numbers of the kernel's BPF ABI that several layers name (``enum bpf_map_type``), defined once.

Everything that needs a map type number or name imports it from here: the object loader
(names in listings), the maps package, the kernel backend, the live loader.
"""

from __future__ import annotations

from enum import IntEnum


class MapType(IntEnum):
    """``enum bpf_map_type`` (include/uapi/linux/bpf.h)."""

    HASH = 1
    ARRAY = 2
    PROG_ARRAY = 3
    PERF_EVENT_ARRAY = 4
    PERCPU_HASH = 5
    PERCPU_ARRAY = 6
    STACK_TRACE = 7
    CGROUP_ARRAY = 8
    LRU_HASH = 9
    LRU_PERCPU_HASH = 10
    LPM_TRIE = 11
    ARRAY_OF_MAPS = 12
    HASH_OF_MAPS = 13
    DEVMAP = 14
    SOCKMAP = 15
    CPUMAP = 16
    XSKMAP = 17
    SOCKHASH = 18
    CGROUP_STORAGE = 19
    REUSEPORT_SOCKARRAY = 20
    PERCPU_CGROUP_STORAGE = 21
    QUEUE = 22
    STACK = 23
    SK_STORAGE = 24
    DEVMAP_HASH = 25
    STRUCT_OPS = 26
    RINGBUF = 27
    INODE_STORAGE = 28
    TASK_STORAGE = 29
    BLOOM_FILTER = 30
    USER_RINGBUF = 31
    CGRP_STORAGE = 32
    ARENA = 33


#: type number -> libbpf's lower-case name ("hash", "prog_array", ...)
MAP_TYPE_NAMES: dict[int, str] = {t.value: t.name.lower() for t in MapType}
