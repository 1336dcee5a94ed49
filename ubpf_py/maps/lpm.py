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
"""

from __future__ import annotations

import struct

from ubpf_py.maps import consts as C
from ubpf_py.maps.base import Map, check_flags_common, map_create_error
from ubpf_py.maps.storage import SlotStore
from ubpf_py.obj.spec import MapSpec
from ubpf_py.vm.memory import Allocator, Region

LPM_CREATE_FLAG_MASK = C.BPF_F_NO_PREALLOC | C.BPF_F_NUMA_NODE | C.ACCESS_MASK
LPM_DATA_SIZE_MAX = 256
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
        self._keys = SlotStore(f"{self.name}.keys", self.max_entries, C.round8(self.key_size), False,
                               readonly=True, alloc=self.alloc)
        self._vals = SlotStore(f"{self.name}.values", self.max_entries, C.round8(self.value_size), False,
                               readonly=self.readonly_for_programs, alloc=self.alloc)
        self._index: dict[tuple[int, bytes], int] = {}
        self._plens: dict[int, int] = {}      # prefix length -> entries with it
        self._plen_order: list[int] = []     # lengths in use, longest first
        self._order: list[tuple[int, bytes]] | None = None

    def regions(self) -> list[Region]:
        return self._keys.regions() + self._vals.regions()

    def add_region_listener(self, fn) -> None:
        self._keys.listeners.append(fn)
        self._vals.listeners.append(fn)

    def _split(self, key: bytes) -> tuple[int, bytes]:
        self._check_key(key)
        return _U32.unpack_from(key)[0], bytes(key[4:])

    def _match(self, key: bytes) -> int:
        plen, data = _U32.unpack_from(key)[0], key[4:]
        plen = min(plen, self.max_prefixlen)
        for p in self._plen_order:
            if p <= plen:
                slot = self._index.get((p, _mask(data, p)))
                if slot is not None:
                    return slot
        return -1

    def lookup_addr(self, key: bytes, cpu: int = 0) -> int:
        slot = self._match(key)
        return 0 if slot < 0 else self._vals.addr(slot)

    def lookup(self, key: bytes) -> bytes | None:
        self._check_key(key)
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
            self._order = sorted(self._index, key=lambda ident: _bits(ident[1], ident[0]) + "2")
        return self._order

    def get_next_key(self, key: bytes | None) -> bytes | None:
        order = self._postorder()
        if not order:
            return None
        nxt = order[0]
        if key is not None:
            plen, data = self._split(bytes(key))
            ident = (plen, _mask(data, plen))
            if plen <= self.max_prefixlen and ident in self._index:
                i = order.index(ident)
                if i + 1 >= len(order):
                    return None
                nxt = order[i + 1]
        return self._keys.read(self._index[nxt], self.key_size)

    def items(self):
        for ident in self._postorder():
            slot = self._index[ident]
            yield self._keys.read(slot, self.key_size), self._vals.read(slot, self.value_size)

    def keys(self) -> list[bytes]:
        return [self._keys.read(self._index[i], self.key_size) for i in self._postorder()]

    def __len__(self) -> int:
        return len(self._index)
