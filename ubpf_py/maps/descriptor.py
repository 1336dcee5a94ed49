"""Native map descriptors: what JIT code needs to look a key up without Python.

Every map's ``handle_addr`` points at a small ``HostBuffer`` (the handle).  Its
first bytes are a *descriptor*: u64 words, defined here once for the maps that
fill them and the JIT that reads them (``vm.jit.fastpath``).  ``kind`` 0 means
"no native lookup" (every map type without a fast path, and fast-path maps in
shapes we do not handle natively), so readers must fall back to the Python helper.

ARRAY / PERCPU_ARRAY: ``value = base + index * stride + cpu * cpu_stride``
(index < max_entries, else NULL).

HASH family: an open-addressing index (linear probing, power-of-two table of u64
entries: 0 empty, ``TOMBSTONE`` deleted, else slot + 1) kept in step by the
Python map code on every insertion and deletion.  Each index change is a single
u64 store done with the GIL held, and JIT code also holds the GIL while it runs,
so a reader never sees a half-made change; a rebuilt table is published with one
store of its address.  The table always keeps a quarter of its entries empty
(``live <= cap/2``, tombstones ``<= cap/4``), so probes terminate.
"""

from __future__ import annotations

import ctypes
import struct
from typing import Any

from ubpf_py.abi.maps import (  # noqa: F401  (re-exported: the map code's names for them)
    FNV_BASIS,
    FNV_PRIME,
    KIND_ARRAY,
    KIND_ARRAY_OF_MAPS,
    KIND_BLOOM,
    KIND_HASH,
    KIND_HASH_OF_MAPS,
    KIND_LPM,
    KIND_NONE,
    KIND_PERF,
    KIND_QUEUE,
    KIND_RINGBUF,
    KIND_STACK,
    LRU_NIL,
    MAP_DESC,
    RB_BUSY,
    RB_SHARED,
    RB_WAKEUP,
    REBUILD_DIV,
    TOMBSTONE,
    table_entries,
)

#: descriptor words (u64 index into the handle buffer), from the one layout in ubpf_py.abi.maps
D_KIND = MAP_DESC.word("kind")
D_KEY_SIZE = MAP_DESC.word("key_size")
D_LIMIT = MAP_DESC.word("limit")            # array: max_entries; hash: table mask
D_TABLE = MAP_DESC.word("table")            # array: element stride; hash: table address
D_VALUES = MAP_DESC.word("values")          # value storage base (slot / element 0)
D_CPU_STRIDE = MAP_DESC.word("cpu_stride")  # bytes between per-CPU copies (0 for shared values)
D_KEYS = MAP_DESC.word("keys")              # hash: key storage base
D_KEY_STRIDE = MAP_DESC.word("key_stride")  # hash: bytes between stored keys
D_VAL_STRIDE = MAP_DESC.word("val_stride")  # bytes between value slots / array elements
D_REF = MAP_DESC.word("ref")                # LRU hash: per-slot reference bytes (0 otherwise)
D_VALUE_SIZE = MAP_DESC.word("value_size_small")  # value_size when native updates may copy (<= 255)
#: RINGBUF: the ring's positions and counters live here so native output can move them
D_RB_PROD = MAP_DESC.word("rb_prod")
D_RB_CONS = MAP_DESC.word("rb_cons")
D_RB_PEND = MAP_DESC.word("rb_pend")
D_RB_DROPPED = MAP_DESC.word("rb_dropped")
D_RB_FLAGS = MAP_DESC.word("rb_flags")      # RB_WAKEUP / RB_BUSY / RB_SHARED
#: every descriptor word by its field name (the words the C runtime uses too)
W = {f.name: MAP_DESC.word(f.name) for f in MAP_DESC.fields if f.count == 1}
HANDLE_SIZE = MAP_DESC.size

#: largest key (value) a native lookup (update) checks with the region guard (one-byte size)
MAX_NATIVE_KEY = 255

_M64 = (1 << 64) - 1
_Q = struct.Struct("<Q")


def key_hash(key: bytes) -> int:
    """The index hash both sides use: FNV-1a over little-endian u64 words of the key
    (the last word zero-padded), folded so the low bits see the high ones."""
    h = FNV_BASIS
    n = len(key)
    if n == 4:   # the common case (u32 keys / pids)
        h = ((h ^ int.from_bytes(key, "little")) * FNV_PRIME) & _M64
    else:
        for i in range(0, n, 8):
            h = ((h ^ int.from_bytes(key[i:i + 8], "little")) * FNV_PRIME) & _M64
    return h ^ (h >> 32)


def write_descriptor(view: memoryview, words: dict[int, int]) -> None:
    """Fill the descriptor fields (``kind`` last, so a reader never sees a kind whose
    fields are not set yet)."""
    for idx, value in sorted(words.items(), key=lambda kv: kv[0] == D_KIND):
        _Q.pack_into(view, idx * 8, value & _M64)


class NativeIndex:
    """The hash maps' native key index (see the module docstring for its invariants).

    ``insert``/``remove`` are called by the map with its lock held, after the key
    bytes are in key storage (insert) and before the slot is freed (remove).
    """

    __slots__ = ("_alloc", "_buf", "_handle", "_pos", "_spare", "_tab", "cap", "live", "mask", "tombs")

    #: largest max_entries given a native index (its table is 16 bytes per entry)
    MAX_ENTRIES = 1 << 22

    def __init__(self, max_entries: int, handle: memoryview, alloc: Any = None) -> None:
        cap = table_entries(max_entries)
        self.cap = cap
        self.mask = cap - 1
        self.live = 0
        self.tombs = 0
        self._handle = handle
        self._alloc = alloc
        #: slot -> its entry's position in the table (deletion needs no hashing)
        self._pos = [0] * max_entries
        self._spare: Any = None
        self._buf = self._new_buffer()
        self._publish(self._buf.view.cast("Q"))

    def _new_buffer(self) -> Any:
        from ubpf_py.vm.memory import HEAP

        return (self._alloc or HEAP).alloc(self.cap * 8)

    def _publish(self, tab: memoryview) -> None:
        self._tab = tab
        _Q.pack_into(self._handle, D_TABLE * 8, self._buf.addr)

    @property
    def table_addr(self) -> int:
        return self._buf.addr

    def insert(self, key: bytes, slot: int) -> None:
        tab, mask = self._tab, self.mask
        i = key_hash(key) & mask
        e = tab[i]
        while e and e != TOMBSTONE:
            i = (i + 1) & mask
            e = tab[i]
        if e == TOMBSTONE:
            self.tombs -= 1
        tab[i] = slot + 1
        self._pos[slot] = i
        self.live += 1

    def remove(self, key: bytes, slot: int, entries: dict[bytes, int]) -> None:
        """Forget ``key`` (stored at ``slot``); ``entries`` (key -> slot, without ``key``)
        rebuilds the table when tombstones pile up."""
        tab = self._tab
        i = self._pos[slot]
        if tab[i] != slot + 1:
            raise AssertionError(f"native hash index lost slot {slot} of key {key.hex()}")
        tab[i] = TOMBSTONE
        self.tombs += 1
        self.live -= 1
        if self.tombs > self.cap // REBUILD_DIV:
            self.rebuild(entries)

    def rebuild(self, entries: dict[bytes, int]) -> None:
        """A tombstone-free table with ``entries``, published with one store.  Built in
        the spare buffer (the previous table; no reader can still be inside it: readers
        hold the GIL for a whole lookup), so rebuilding allocates nothing."""
        old_buf = self._buf
        buf = self._spare if self._spare is not None else self._new_buffer()
        buf.array.fill(0)
        self._buf = buf
        tab = buf.view.cast("Q")
        mask = self.mask
        for key, slot in entries.items():
            i = key_hash(key) & mask
            while tab[i]:
                i = (i + 1) & mask
            tab[i] = slot + 1
            self._pos[slot] = i
        self.live = len(entries)
        self.tombs = 0
        self._publish(tab)
        self._spare = old_buf


def read_word(handle_addr: int, index: int) -> int:
    """Descriptor word ``index`` of the map whose handle is at ``handle_addr``."""
    return _Q.unpack(ctypes.string_at(handle_addr + 8 * index, 8))[0]
