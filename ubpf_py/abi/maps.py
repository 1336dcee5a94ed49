"""The map descriptor: the u64 words at a map's handle address that native code reads.

One flat layout for every map kind (fields a kind does not use stay 0).  Python
map code fills it (``maps.descriptor`` re-exports the word indices), the JIT's
fast paths read it (``vm.jit.fastpath``) and the in-target runtime
(``runtime/maps.c``, ``runtime/ringbuf.c``) reads and updates it through the
generated ``struct ubpf_map_desc``.

Hash maps (``kind == KIND_HASH``): an open-addressing index (``table``, ``mask + 1``
u64 entries: 0 empty, ``TOMBSTONE`` deleted, else slot + 1, FNV-1a of the key,
linear probing), key and value slots, and the slot allocator state: a stack of
free slots (``free``/``nfree``) used before never-used ones (``fresh``), a live
flag per slot (``used``) for iteration, and for LRU maps a list in insertion order
(``lru_prev``/``lru_next``/``lru_head``/``lru_tail``) plus reference bytes
(``ref``).  Inserts and deletes hold ``lock`` (a spinlock word, taken by the
target's threads and by the tracer through the same C code); lookups take no lock
and retry a miss when ``seq`` moved.  A rebuild (tombstones past a quarter of the
table) fills ``spare_table``, publishes it with one store of ``table`` and bumps
``seq``: a reader still in the old table sees a complete, slightly stale index.
"""

from __future__ import annotations

from ubpf_py.abi.layout import Layout, u64, u64s

MAP_DESC = Layout("ubpf_map_desc", [
    u64("kind", "KIND_*; 0: no native operations (use the Python map)"),
    u64("key_size"),
    u64("limit", "array: max_entries; hash: table mask; ringbuf: data mask"),
    u64("table", "array: element stride; hash: index table address"),
    u64("values", "value storage base (slot / element 0); ringbuf: data"),
    u64("cpu_stride", "bytes between per-CPU copies (0 for shared values)"),
    u64("keys", "hash: key storage base"),
    u64("key_stride"),
    u64("val_stride", "bytes between value slots / array elements"),
    u64("ref", "LRU hash: address of the per-slot reference bytes (0 otherwise)"),
    u64("value_size_small", "value_size when <= 255 (what JIT fast updates copy), else 0"),
    u64("rb_prod", "ringbuf producer position"),
    u64("rb_cons", "ringbuf consumer position"),
    u64("rb_pend", "ringbuf: oldest record not committed yet"),
    u64("rb_dropped", "ringbuf reservations that failed"),
    u64("rb_flags", "RB_*"),
    u64("lock", "spinlock word: hash inserts/deletes, ringbuf producers"),
    u64("seq", "hash index sequence: odd while the table is rebuilt"),
    u64("value_size"),
    u64("max_entries"),
    u64("ncpus", "per-CPU copies in a slot"),
    u64("count", "hash: live elements"),
    u64("tombs", "hash: tombstones in the table"),
    u64("free", "hash: address of the u32 free-slot stack"),
    u64("nfree", "hash: entries on the free-slot stack"),
    u64("fresh", "hash: never-used slots handed out so far"),
    u64("used", "hash: address of the per-slot live bytes"),
    u64("lru_prev", "LRU: address of the u32 previous-slot array"),
    u64("lru_next", "LRU: address of the u32 next-slot array"),
    u64("lru_head", "LRU: oldest slot (NIL when empty)"),
    u64("lru_tail", "LRU: youngest slot"),
    u64("spin_off", "offset + 1 of the value's struct bpf_spin_lock, 0: none"),
    u64("evictions", "LRU elements evicted to make room"),
    u64("perf_rings", "perf event array: address of ncpus PERF_RING headers"),
    u64("spare_table", "hash: the other index table; a rebuild fills it and swaps it with ``table``"),
    u64("head", "queue/stack: next slot to push"),
    u64("tail", "queue/stack: oldest element"),
    u64("lifo", "stack: 1 (pop the newest)"),
    u64("seed", "bloom filter: hash seed"),
    u64("nr_hash", "bloom filter: hash functions"),
], doc="a map's native descriptor, at its handle address", align=64)

KIND_NONE = 0
KIND_ARRAY = 1
KIND_HASH = 3
KIND_RINGBUF = 4
KIND_PERF = 5
#: STACK_TRACE (no build ids): values = frames (val_stride = value_size apart), limit =
#: buckets - 1, table = u32 hashes, keys = u32 frame counts, used = present bytes, count
KIND_STACK = 6
#: QUEUE / STACK: values = max_entries + 1 slots of value_size (val_stride), limit = slots
KIND_QUEUE = 7
#: BLOOM_FILTER: values = bit array, limit = bits - 1
KIND_BLOOM = 8
#: ARRAY_OF_MAPS: values = u64[limit] inner map handle addresses (0: empty slot), limit =
#: max_entries; a program's lookup returns the handle itself.  The tracer changes a slot with
#: one aligned 8-byte store and inner descriptors are never freed (arena), so a lookup racing
#: an update sees the old or the new inner map, both valid
KIND_ARRAY_OF_MAPS = 9
#: HASH_OF_MAPS: values = handle address of a KIND_HASH map (same key size, 8-byte values:
#: the inner map handles) that holds the elements; inserts/deletes are that map's (locked)
KIND_HASH_OF_MAPS = 10
#: LPM_TRIE: values = handle address of a KIND_HASH store keyed by the canonical key
#: (prefixlen, data masked to it) whose values are the trie's value then, at
#: round8(value_size), the key as given; keys = bitmap of the prefix lengths in use
#: ((limit + 64) // 64 u64 words), table = u32 count per prefix length; limit = max
#: prefixlen; lock = the trie's update lock (runtime/maps.c LPM_TRIE)
KIND_LPM = 11
#: largest LPM data part (the kernel's LPM_DATA_SIZE_MAX) and whole key
LPM_DATA_SIZE_MAX = 256
LPM_KEY_MAX = 4 + LPM_DATA_SIZE_MAX

RB_WAKEUP = 1   # a Python consumer waits: Python producers wake it
RB_BUSY = 2     # JIT fast paths must defer to the helper (Python inside, or positions owned by C)
RB_SHARED = 4   # producers are the C runtime (in the target or the tracer): never clear RB_BUSY

#: hash index entry of a deleted element (probes continue past it; inserts reuse it)
TOMBSTONE = (1 << 64) - 1
#: the index hash: FNV-1a (64-bit) over the key's little-endian u64 words, the last one
#: zero-padded, folded as ``h ^ (h >> 32)`` (maps/descriptor.py key_hash, the JIT's
#: @bpf_fast_hash and runtime/maps.c key_hash compute it from these)
FNV_BASIS = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
#: a hash index is rebuilt when its tombstones exceed 1/REBUILD_DIV of the table
REBUILD_DIV = 4
#: fewest entries of a hash index table: small maps get room so tombstones rarely force a rebuild
MIN_TABLE = 64


def table_entries(max_entries: int) -> int:
    """Entries of a hash map's index table: a power of two, at least twice max_entries
    (a quarter of the table always stays empty, so probes terminate) and at least MIN_TABLE."""
    cap = MIN_TABLE
    while cap < 2 * max_entries:
        cap <<= 1
    return cap


LRU_NIL = 0xFFFFFFFF
#: attempts to take a map lock (pause, then sched_yield so a preempted holder can run); a
#: holder that died or is stopped gives -EBUSY after this many, never a hung target
LOCK_SPINS = 1 << 14

PERF_RING = Layout("ubpf_perf_ring", [
    u64("data", "address of the ring bytes"),
    u64("size", "ring bytes (a power of two)"),
    u64("head", "producer position (free running)"),
    u64("tail", "consumer position"),
    u64("lost", "samples dropped: the ring was full"),
    u64("lock", "producer spinlock word"),
    u64s("reserved", 2),
], doc="one CPU's perf buffer of a PERF_EVENT_ARRAY (records as the kernel writes them)", align=64)

ALL = [MAP_DESC, PERF_RING]
CONSTANTS = {
    "UBPF_KIND_NONE": KIND_NONE, "UBPF_KIND_ARRAY": KIND_ARRAY, "UBPF_KIND_HASH": KIND_HASH,
    "UBPF_KIND_RINGBUF": KIND_RINGBUF, "UBPF_KIND_PERF": KIND_PERF, "UBPF_KIND_STACK": KIND_STACK,
    "UBPF_KIND_QUEUE": KIND_QUEUE, "UBPF_KIND_BLOOM": KIND_BLOOM,
    "UBPF_KIND_ARRAY_OF_MAPS": KIND_ARRAY_OF_MAPS, "UBPF_KIND_HASH_OF_MAPS": KIND_HASH_OF_MAPS,
    "UBPF_KIND_LPM": KIND_LPM, "UBPF_LPM_KEY_MAX": LPM_KEY_MAX,
    "UBPF_RB_WAKEUP": RB_WAKEUP, "UBPF_RB_BUSY": RB_BUSY, "UBPF_RB_SHARED": RB_SHARED,
    "UBPF_TOMBSTONE": TOMBSTONE, "UBPF_LRU_NIL": LRU_NIL, "UBPF_LOCK_SPINS": LOCK_SPINS,
    "UBPF_FNV_BASIS": FNV_BASIS, "UBPF_FNV_PRIME": FNV_PRIME, "UBPF_HASH_REBUILD_DIV": REBUILD_DIV,
}
