"""Userspace BPF maps with the kernel's semantics (return codes, limits, iteration).

``create_map(spec)`` builds the right family for a ``MapSpec``; see ``base.Map``
for the API every map shares.  One module per family:

* ``hash``        HASH, PERCPU_HASH, LRU_HASH, LRU_PERCPU_HASH
* ``array``       ARRAY (also global data), PERCPU_ARRAY
* ``ringbuf``     RINGBUF
* ``perf``        PERF_EVENT_ARRAY
* ``stack_trace`` STACK_TRACE
* ``fd_array``    PROG_ARRAY, ARRAY_OF_MAPS, HASH_OF_MAPS
* ``queue``       QUEUE, STACK, BLOOM_FILTER
* ``lpm``         LPM_TRIE
"""

from __future__ import annotations

from ubpf_py.errors import MapError, NotSupportedError
from ubpf_py.maps import consts
from ubpf_py.maps.array import ArrayMap, PercpuArrayMap
from ubpf_py.maps.base import Map, map_by_handle, map_by_id
from ubpf_py.maps.budget import check_map
from ubpf_py.maps.fd_array import ArrayOfMapsMap, HashOfMapsMap, ProgArrayMap
from ubpf_py.maps.hash import HashMap, LruHashMap, LruPercpuHashMap, PercpuHashMap
from ubpf_py.maps.lpm import LpmTrieMap
from ubpf_py.maps.perf import PerfEventArrayMap
from ubpf_py.maps.queue import BloomFilterMap, QueueMap, StackMap
from ubpf_py.maps.ringbuf import RingBufMap
from ubpf_py.maps.stack_trace import StackTraceMap
from ubpf_py.obj.spec import MapSpec
from ubpf_py.vm.memory import Allocator

MAP_CLASSES: dict[int, type[Map]] = {
    consts.HASH: HashMap,
    consts.ARRAY: ArrayMap,
    consts.PROG_ARRAY: ProgArrayMap,
    consts.PERF_EVENT_ARRAY: PerfEventArrayMap,
    consts.PERCPU_HASH: PercpuHashMap,
    consts.PERCPU_ARRAY: PercpuArrayMap,
    consts.STACK_TRACE: StackTraceMap,
    consts.LRU_HASH: LruHashMap,
    consts.LRU_PERCPU_HASH: LruPercpuHashMap,
    consts.LPM_TRIE: LpmTrieMap,
    consts.ARRAY_OF_MAPS: ArrayOfMapsMap,
    consts.HASH_OF_MAPS: HashOfMapsMap,
    consts.QUEUE: QueueMap,
    consts.STACK: StackMap,
    consts.RINGBUF: RingBufMap,
    consts.BLOOM_FILTER: BloomFilterMap,
}


def create_map(spec: MapSpec, *, ncpus: int | None = None, alloc: Allocator | None = None) -> Map:
    """A live map for ``spec``.  ``ncpus`` sizes per-CPU storage and perf buffers
    (default: the machine's possible CPUs, as the kernel); ``alloc`` gives every byte of
    its storage (default ``vm.memory.HEAP``; a ``SharedArena`` for in-target execution).  Raises MapError (with
    ``.errno``, the kernel's answer to the same attributes) or NotSupportedError."""
    if spec.type == consts.PERF_EVENT_ARRAY and spec.max_entries == 0:
        # libbpf sizes perf event arrays to the number of CPUs when the object leaves it out
        spec.max_entries = ncpus or consts.possible_cpus()
    check_map(spec, ncpus)      # unknown types, and what memory cannot honour, before allocating
    cls = MAP_CLASSES.get(spec.type)
    if cls is None:
        raise NotSupportedError(f"map type {spec.type_name} (map '{spec.name}')")
    return cls(spec, ncpus, alloc)


__all__ = [
    "MAP_CLASSES", "ArrayMap", "ArrayOfMapsMap", "BloomFilterMap", "HashMap", "HashOfMapsMap",
    "LpmTrieMap", "LruHashMap", "LruPercpuHashMap", "Map", "MapError", "PercpuArrayMap",
    "PercpuHashMap", "PerfEventArrayMap", "ProgArrayMap", "QueueMap", "RingBufMap", "StackMap",
    "StackTraceMap", "create_map", "map_by_handle", "map_by_id",
]
