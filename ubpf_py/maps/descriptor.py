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

#: descriptor words (u64 index into the handle buffer)
D_KIND = 0
D_KEY_SIZE = 1
D_LIMIT = 2        # array: max_entries; hash: table mask
D_TABLE = 3        # array: element stride; hash: table address
D_VALUES = 4       # value storage base (slot / element 0)
D_CPU_STRIDE = 5   # bytes between per-CPU copies (0 for shared values)
D_KEYS = 6         # hash: key storage base
D_KEY_STRIDE = 7   # hash: bytes between stored keys
D_VAL_STRIDE = 8   # bytes between value slots / array elements
D_REF = 9          # LRU hash: address of the per-slot reference bytes (0 otherwise)
D_VALUE_SIZE = 10  # value_size when native updates may copy values (<= 255), else 0
#: RINGBUF: the ring's positions and counters live here so native output can move them
D_RB_PROD = 11
D_RB_CONS = 12
D_RB_PEND = 13
D_RB_DROPPED = 14
D_RB_FLAGS = 15    # RB_WAKEUP: a consumer waits (wakeups are Python); RB_BUSY: Python is inside
D_WORDS = 16
RB_WAKEUP = 1
RB_BUSY = 2
HANDLE_SIZE = 16 * 8

KIND_NONE = 0
KIND_ARRAY = 1
KIND_HASH = 3
KIND_RINGBUF = 4

#: largest key (value) a native lookup (update) checks with the region guard (one-byte size)
MAX_NATIVE_KEY = 255

TOMBSTONE = (1 << 64) - 1
FNV_BASIS = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
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
        cap = 64   # small maps get room so tombstones rarely force a rebuild
        while cap < 2 * max_entries:
            cap <<= 1
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
        if self.tombs > self.cap // 4:
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
