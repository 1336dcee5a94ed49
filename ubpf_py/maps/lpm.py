"""BPF_MAP_TYPE_LPM_TRIE: longest-prefix-match lookups, as kernel/bpf/lpm_trie.c.

Keys are ``struct bpf_lpm_trie_key { u32 prefixlen; u8 data[]; }`` with data bits
counted most significant bit first.  Instead of a pointer trie we index entries
by ``(prefixlen, data masked to prefixlen)`` and keep the set of prefix lengths
in use: a lookup tries the lengths present, longest first (at most
``8 * data_size + 1`` dictionary probes).  Iteration follows the kernel's
post-order (more specific prefixes before the prefixes containing them, "0"
branches before "1"), so get_next_key walks entries in the same order.
Like the kernel, the map must be created with BPF_F_NO_PREALLOC, and a full
trie refuses new prefixes with -ENOSPC.

On a shared arena (in-target execution) the elements live where the in-target runtime
reads them (``abi.maps`` KIND_LPM): a C hash store keyed by (prefixlen, masked data)
holding the value and the key as given, plus a bitmap and counts of the prefix lengths
in use.  Lookups, updates and deletes are then runtime/maps.c's -- the same search by
prefix length, longest first -- for the target's threads and the tracer alike, and
iteration reads the store.
"""

from __future__ import annotations

import ctypes
import struct

from ubpf_py.abi.maps import LPM_DATA_SIZE_MAX
from ubpf_py.maps import consts as C
from ubpf_py.maps import descriptor as D
from ubpf_py.maps.base import Map, check_flags_common, map_create_error
from ubpf_py.maps.hash import HashMap
from ubpf_py.maps.native_ops import runtime_for
from ubpf_py.maps.storage import SlotStore
from ubpf_py.obj.spec import MapSpec
from ubpf_py.vm.memory import Allocator, Region

LPM_CREATE_FLAG_MASK = C.BPF_F_NO_PREALLOC | C.BPF_F_NUMA_NODE | C.ACCESS_MASK
_U32 = struct.Struct("<I")


def _mask(data: bytes, plen: int) -> bytes:
    full, rest = divmod(plen, 8)
    out = bytearray(len(data))
    out[:full] = data[:full]
    if rest:
        out[full] = data[full] & (0xFF << (8 - rest)) & 0xFF
    return bytes(out)


def _bits(data: bytes, plen: int) -> str:
    return "".join("1" if data[i >> 3] & (0x80 >> (i & 7)) else "0" for i in range(plen))


def _postorder_key(ident: tuple[int, bytes]) -> str:
    """Sort key of (prefixlen, masked data) for the kernel's post-order walk: more specific
    prefixes before those containing them, "0" branches before "1"."""
    return _bits(ident[1], ident[0]) + "2"


class LpmTrieMap(Map):
    """Longest prefix match map."""

    def __init__(self, spec: MapSpec, ncpus: int | None = None, alloc: Allocator | None = None) -> None:
        super().__init__(spec, ncpus, alloc)
        check_flags_common(spec, LPM_CREATE_FLAG_MASK)
        if not spec.flags & C.BPF_F_NO_PREALLOC:
            raise map_create_error(spec, "LPM tries must be created with BPF_F_NO_PREALLOC "
                                   "(add __uint(map_flags, BPF_F_NO_PREALLOC))")
        if (spec.max_entries == 0 or not 5 <= spec.key_size <= 4 + LPM_DATA_SIZE_MAX
                or spec.value_size == 0):
            raise map_create_error(spec, f"LPM tries need key_size 5..260 (4-byte prefixlen + data), "
                                   f"value_size > 0 and max_entries > 0 (got key {spec.key_size}, "
                                   f"value {spec.value_size}, max_entries {spec.max_entries})")
        self.data_size = spec.key_size - 4
        self.max_prefixlen = 8 * self.data_size
        self._c = runtime_for(self.alloc)
        if self._c is not None:
            self._shared_setup()
            return
        self._keys = SlotStore(f"{self.name}.keys", self.max_entries, C.round8(self.key_size), False,
                               readonly=True, alloc=self.alloc)
        self._vals = SlotStore(f"{self.name}.values", self.max_entries, C.round8(self.value_size), False,
                               readonly=self.readonly_for_programs, alloc=self.alloc)
        self._index: dict[tuple[int, bytes], int] = {}
        self._plens: dict[int, int] = {}      # prefix length -> entries with it
        self._plen_order: list[int] = []     # lengths in use, longest first
        self._order: list[tuple[int, bytes]] | None = None

    def _shared_setup(self) -> None:
        """The store, prefix-length bitmap and counts of the shared layout (``abi.maps``)."""
        a, ks = self.alloc, self.key_size
        self._key_off = C.round8(self.value_size)
        # programs may not write a BPF_F_RDONLY_PROG trie's values: nor the store's (regions)
        self._store = HashMap(MapSpec(f"{self.name}.prefixes", C.HASH, ks, self._key_off + ks, self.max_entries,
                                      self.flags & C.BPF_F_RDONLY_PROG), alloc=a)
        bits = a.alloc(8 * (self.max_prefixlen // 64 + 1), 64)
        counts = a.alloc(4 * (self.max_prefixlen + 1), 64)
        D.write_descriptor(self._handle.view, {
            D.D_KEY_SIZE: ks, D.D_LIMIT: self.max_prefixlen, D.D_VALUES: self._store.handle_addr,
            D.D_KEYS: bits.addr, D.D_TABLE: counts.addr, D.W["value_size"]: self.value_size,
            D.W["max_entries"]: self.max_entries, D.D_KIND: D.KIND_LPM})

    def regions(self) -> list[Region]:
        if self._c is not None:
            return self._store.regions()
        return self._keys.regions() + self._vals.regions()

    def add_region_listener(self, fn) -> None:
        if self._c is not None:
            return                   # the store is preallocated: no regions come later
        self._keys.listeners.append(fn)
        self._vals.listeners.append(fn)

    def _shared_entries(self) -> list[tuple[tuple[int, bytes], bytes, bytes]]:
        """((prefixlen, masked data), key as given, value) of every element of the store, in the
        kernel's post-order (the order ``_postorder`` gives the Python index)."""
        out = []
        for canon, v in self._store.items():
            plen = _U32.unpack_from(canon)[0]
            out.append(((plen, bytes(canon[4:])), bytes(v[self._key_off:self._key_off + self.key_size]),
                        bytes(v[:self.value_size])))
        return sorted(out, key=lambda e: _postorder_key(e[0]))

    def _split(self, key: bytes) -> tuple[int, bytes]:
        self._check_key(key)
        return _U32.unpack_from(key)[0], bytes(key[4:])

    def _match(self, key: bytes) -> int:
        plen, data = _U32.unpack_from(key)[0], key[4:]
        if plen > self.max_prefixlen:
            return -1                  # the kernel's trie_lookup_elem: no match (checked on 6.18)
        for p in self._plen_order:
            if p <= plen:
                slot = self._index.get((p, _mask(data, p)))
                if slot is not None:
                    return slot
        return -1

    def lookup_addr(self, key: bytes, cpu: int = 0) -> int:
        if self._c is not None:
            return self._c.map_lookup(self.handle_addr, bytes(key), 0)
        slot = self._match(key)
        return 0 if slot < 0 else self._vals.addr(slot)

    def lookup(self, key: bytes) -> bytes | None:
        self._check_key(key)
        if self._c is not None:
            addr = self._c.map_lookup(self.handle_addr, bytes(key), 0)
            return ctypes.string_at(addr, self.value_size) if addr else None
        slot = self._match(bytes(key))
        return None if slot < 0 else self._vals.read(slot, self.value_size)

    def update(self, key: bytes, value: bytes, flags: int = C.BPF_ANY, cpu: int | None = None) -> int:
        if flags > C.BPF_EXIST:
            return -C.EINVAL
        plen, data = self._split(key)
        if plen > self.max_prefixlen:
            return -C.EINVAL
        if cpu is None and (self.frozen or self.flags & C.BPF_F_RDONLY):
            return -C.EPERM
        if len(value) != self.value_size:
            raise ValueError(f"map {self.name}: value is {len(value)} bytes, value_size is {self.value_size}")
        if self._c is not None:
            return self._c.map_update(self.handle_addr, bytes(key), bytes(value), flags, -1)
        ident = (plen, _mask(data, plen))
        with self.lock:
            slot = self._index.get(ident)
            if slot is not None:
                if flags == C.BPF_NOEXIST:
                    return -C.EEXIST
            else:
                if flags == C.BPF_EXIST:
                    return -C.ENOENT
                if len(self._index) >= self.max_entries:
                    return -C.ENOSPC
                slot = self._keys.alloc()
                if self._vals.alloc() != slot:
                    raise AssertionError("LPM slot stores out of step")
                self._index[ident] = slot
                self._plens[plen] = self._plens.get(plen, 0) + 1
                self._plen_order = sorted(self._plens, reverse=True)
                self._order = None
            self._keys.write(slot, bytes(key))
            self._vals.write(slot, bytes(value))
        return 0

    def delete(self, key: bytes, cpu: int | None = None) -> int:
        plen, data = self._split(key)
        if plen > self.max_prefixlen:
            return -C.EINVAL
        if cpu is None and (self.frozen or self.flags & C.BPF_F_RDONLY):
            return -C.EPERM
        if self._c is not None:
            return self._c.map_delete(self.handle_addr, bytes(key))
        with self.lock:
            slot = self._index.pop((plen, _mask(data, plen)), None)
            if slot is None:
                return -C.ENOENT
            self._keys.free(slot)
            self._vals.free(slot)
            self._plens[plen] -= 1
            if not self._plens[plen]:
                del self._plens[plen]
                self._plen_order = sorted(self._plens, reverse=True)
            self._order = None
        return 0

    def _postorder(self) -> list[tuple[int, bytes]]:
        if self._order is None:
            self._order = sorted(self._index, key=_postorder_key)
        return self._order

    def get_next_key(self, key: bytes | None) -> bytes | None:
        if self._c is not None:
            entries = self._shared_entries()
            if not entries:
                return None
            if key is not None:
                plen, data = self._split(bytes(key))
                ident = (plen, _mask(data, plen)) if plen <= self.max_prefixlen else None
                idents = [e[0] for e in entries]
                if ident in idents:
                    i = idents.index(ident)
                    return entries[i + 1][1] if i + 1 < len(entries) else None
            return entries[0][1]
        order = self._postorder()
        if not order:
            return None
        nxt = order[0]
        if key is not None:
            plen, data = self._split(bytes(key))
            # the kernel starts over at the leftmost element for a prefixlen past the data
            ident = (plen, _mask(data, plen)) if plen <= self.max_prefixlen else None
            if ident in self._index:
                i = order.index(ident)
                if i + 1 >= len(order):
                    return None
                nxt = order[i + 1]
        return self._keys.read(self._index[nxt], self.key_size)

    def items(self):
        if self._c is not None:
            for _ident, k, v in self._shared_entries():
                yield k, v
            return
        for ident in self._postorder():
            slot = self._index[ident]
            yield self._keys.read(slot, self.key_size), self._vals.read(slot, self.value_size)

    def keys(self) -> list[bytes]:
        if self._c is not None:
            return [k for k, _v in self.items()]
        return [self._keys.read(self._index[i], self.key_size) for i in self._postorder()]

    def __len__(self) -> int:
        if self._c is not None:
            return len(self._store)
        return len(self._index)
