"""HASH, PERCPU_HASH, LRU_HASH and LRU_PERCPU_HASH maps.

Storage: keys and values in ``SlotStore`` slabs plus a ``dict`` from key bytes
to slot number (the index; it holds no values).  Like the kernel's
preallocated hash table, an entry keeps its value address for as long as it
exists: updates of an existing key copy in place, and a deleted slot is reused
by the next insertion.

LRU: the kernel keeps active/inactive lists and a reference bit that lookups set;
when the map is full an insertion evicts an element that has not been referenced
recently.  We keep the same shape -- the index's insertion order is the list,
lookups set a per-slot reference bit, eviction gives referenced elements a
second chance -- which gives the guarantees the kernel documents: never more than
max_entries elements, an insertion never fails for lack of room, and the element
just inserted or recently used is kept.
"""

from __future__ import annotations

from ubpf_py.maps import consts as C
from ubpf_py.maps import descriptor as D
from ubpf_py.maps.base import Map, check_flags_common, check_update_flags, map_create_error, write_value
from ubpf_py.maps.descriptor import NativeIndex
from ubpf_py.maps.native_ops import runtime_for
from ubpf_py.maps.storage import SlotStore
from ubpf_py.obj.spec import MapSpec
from ubpf_py.vm.memory import Allocator, Region

PCPU_MIN_UNIT_SIZE = 32 << 10
HTAB_CREATE_FLAG_MASK = (C.BPF_F_NO_PREALLOC | C.BPF_F_NO_COMMON_LRU | C.BPF_F_NUMA_NODE
                         | C.ACCESS_MASK | C.BPF_F_ZERO_SEED)


class HashMap(Map):
    """Kernel BPF_MAP_TYPE_HASH (and, through class attributes, its per-CPU / LRU kin)."""

    lru = False
    #: the C runtime's operations (``maps.native_ops``) when storage is shared with a target
    _c = None

    def __init__(self, spec: MapSpec, ncpus: int | None = None, alloc: Allocator | None = None) -> None:
        super().__init__(spec, ncpus, alloc)
        self._validate(spec)
        if self.lru and (spec.flags & C.BPF_F_NO_COMMON_LRU):
            # per-CPU LRU lists: the kernel rounds max_entries to a multiple of the CPU count
            n = self.ncpus
            rounded = -(-spec.max_entries // n) * n
            self.max_entries = rounded if rounded >= spec.max_entries else spec.max_entries // n * n
        self._c = runtime_for(self.alloc)
        # shared storage is always preallocated (the arena is sparse: untouched slots cost nothing)
        prealloc = self._c is not None or not (spec.flags & C.BPF_F_NO_PREALLOC)
        self._vstride = C.round8(self.value_size)
        slot_size = self._vstride * (self.ncpus if self.percpu else 1)
        self._keys = SlotStore(f"{self.name}.keys", self.max_entries, C.round8(self.key_size), prealloc,
                               readonly=True, alloc=self.alloc)
        self._vals = SlotStore(f"{self.name}.values", self.max_entries, slot_size, prealloc,
                               readonly=self.readonly_for_programs, alloc=self.alloc)
        self._index: dict[bytes, int] = {}
        #: key -> value address: the one dictionary probe bpf_map_lookup_elem needs
        self._addrs: dict[bytes, int] = {}
        self._ref = self.alloc.alloc(self.max_entries).array if self.lru else None
        self._evictions = 0
        # fast path of a program updating an existing element of a shared-value map
        self._fast_update = (not self.percpu and not self.lru and self._vals.single and self._c is None
                             and bool(self._vals.buffers))    # NO_PREALLOC: nothing allocated yet
        self._vbase = self._vals.bases[0] if self._vals.buffers else 0
        self._vview = self._vals.views[0] if self._vals.buffers else None
        self._native = None
        if self._c is not None:
            self._shared_setup()
        else:
            self._native = self._native_index()

    def _shared_setup(self) -> None:
        """Descriptor and slot-allocator state for the C operations (``abi.maps``)."""
        a, n = self.alloc, self.max_entries
        cap = D.table_entries(n)
        self._ctab = a.alloc(cap * 8, 64)
        self._ctab2 = a.alloc(cap * 8, 64)   # the spare a rebuild fills (abi.maps)
        self._cfree = a.alloc(4 * n, 8)
        self._cused = a.alloc(n, 8)
        lru = [a.alloc(4 * n, 8), a.alloc(4 * n, 8)] if self.lru else [None, None]
        self._clru = lru
        self._dw = self._handle.view.cast("Q")
        D.write_descriptor(self._handle.view, {
            **self._lookup_words(cap - 1, self._ctab.addr),
            D.W["spare_table"]: self._ctab2.addr, D.W["value_size"]: self.value_size,
            D.W["free"]: self._cfree.addr, D.W["used"]: self._cused.addr,
            D.W["lru_prev"]: lru[0].addr if lru[0] is not None else 0,
            D.W["lru_next"]: lru[1].addr if lru[1] is not None else 0,
            D.W["lru_head"]: D.LRU_NIL, D.W["lru_tail"]: D.LRU_NIL})

    def _lookup_words(self, mask: int, table_addr: int) -> dict[int, int]:
        """The descriptor words a lookup reads -- the JIT's @bpf_fast_find / slot_addr and
        runtime/maps.c's ubpf_map_lookup -- whichever side (NativeIndex or the C runtime)
        keeps the index, so each side can read the other's."""
        keys, vals = self._keys, self._vals
        return {
            D.D_KEY_SIZE: self.key_size, D.D_LIMIT: mask, D.D_TABLE: table_addr,
            D.D_VALUES: vals.bases[0], D.D_CPU_STRIDE: self._vstride if self.percpu else 0,
            D.D_KEYS: keys.bases[0], D.D_KEY_STRIDE: keys.stride, D.D_VAL_STRIDE: vals.stride,
            D.D_REF: self._ref.ctypes.data if self._ref is not None else 0,
            D.D_VALUE_SIZE: self.value_size if self.value_size <= D.MAX_NATIVE_KEY else 0,
            D.W["max_entries"]: self.max_entries, D.W["ncpus"]: self.ncpus if self.percpu else 1,
            D.D_KIND: D.KIND_HASH}

    @property
    def evictions(self) -> int:
        """LRU elements evicted to make room."""
        return self._dw[D.W["evictions"]] if self._c is not None else self._evictions

    def _c_slots(self):
        """Live slots in slot order (the C allocator's ``used`` bytes, up to ``fresh``)."""
        fresh = self._dw[D.W["fresh"]]
        used = self._cused.array[:fresh]
        return used.nonzero()[0]

    def _c_slot(self, key: bytes) -> int:
        return self._c.hash_find(self.handle_addr, key) - 1

    def _native_index(self) -> NativeIndex | None:
        """The native key index JIT lookups use (``maps.descriptor``), for the shapes it
        handles: preallocated single-buffer storage, keys up to 255 bytes."""
        keys, vals = self._keys, self._vals
        if not (keys.buffers and vals.buffers and keys.single and vals.single
                and self.key_size <= D.MAX_NATIVE_KEY and self.max_entries <= NativeIndex.MAX_ENTRIES):
            return None
        nidx = NativeIndex(self.max_entries, self._handle.view, self.alloc)
        D.write_descriptor(self._handle.view, self._lookup_words(nidx.mask, nidx.table_addr))
        return nidx

    def _validate(self, spec: MapSpec) -> None:
        check_flags_common(spec, HTAB_CREATE_FLAG_MASK)
        prealloc = not (spec.flags & C.BPF_F_NO_PREALLOC)
        if (spec.flags & C.BPF_F_NO_COMMON_LRU) and not self.lru:
            raise map_create_error(spec, "BPF_F_NO_COMMON_LRU is only for LRU hash maps; remove it")
        if self.lru and not prealloc:
            raise map_create_error(spec, "LRU hash maps cannot use BPF_F_NO_PREALLOC; remove it",
                                   C.ENOTSUPP)
        if (spec.flags & C.BPF_F_NUMA_NODE) and (self.percpu or spec.flags & C.BPF_F_NO_COMMON_LRU):
            raise map_create_error(spec, "BPF_F_NUMA_NODE is not allowed for per-CPU maps")
        if spec.max_entries == 0 or spec.key_size == 0 or spec.value_size == 0:
            raise map_create_error(spec, "key_size, value_size and max_entries must all be > 0")
        if self.percpu and C.round8(spec.value_size) > PCPU_MIN_UNIT_SIZE:
            raise map_create_error(spec, f"per-CPU value_size {spec.value_size} is larger than "
                                   f"{PCPU_MIN_UNIT_SIZE}", C.E2BIG)

    # ---- memory -------------------------------------------------------------------------
    def regions(self) -> list[Region]:
        return self._keys.regions() + self._vals.regions()

    def add_region_listener(self, fn) -> None:
        """``fn(region)`` is called for storage added later (BPF_F_NO_PREALLOC maps)."""
        self._keys.listeners.append(fn)
        self._vals.listeners.append(fn)

    # ---- program-side fast paths ---------------------------------------------------------
    def lookup_addr(self, key: bytes, cpu: int = 0) -> int:
        if self._c is not None:
            return self._c.map_lookup(self.handle_addr, bytes(key), cpu)
        if self._ref is None:
            addr = self._addrs.get(key, 0)
            return addr + cpu * self._vstride if addr and self.percpu else addr
        slot = self._index.get(key)
        if slot is None:
            return 0
        self._ref[slot] = 1
        return self._vals.addr(slot) + (cpu * self._vstride if self.percpu else 0)

    def key_addr(self, key: bytes) -> int:
        """Address of the stored copy of ``key`` (for for_each_map_elem callbacks), 0 if absent."""
        if self._c is not None:
            s = self._c_slot(bytes(key))
            return 0 if s < 0 else self._keys.addr(s)
        slot = self._index.get(key)
        return 0 if slot is None else self._keys.addr(slot)

    # ---- element operations --------------------------------------------------------------
    def lookup(self, key: bytes) -> bytes | None:
        slot = self._index.get(bytes(key)) if self._c is None else self._c_slot(bytes(key))
        if slot is not None and slot < 0:
            slot = None
        if slot is None:
            return None
        if self.percpu:
            return self._vals.read(slot, self._vals.stride)
        return self._vals.read(slot, self.value_size)

    def update(self, key: bytes, value: bytes, flags: int = C.BPF_ANY, cpu: int | None = None) -> int:
        if (flags == 0 or flags == C.BPF_EXIST) and cpu is not None and self._fast_update:
            addr = self._addrs.get(key)
            if addr is not None and len(value) == self.value_size:
                off = addr - self._vbase
                self._vview[off:off + len(value)] = value
                return 0
        rc = check_update_flags(flags, self.spin_lock_off is not None)
        if rc:
            return rc
        key = bytes(key)
        self._check_key(key)
        if cpu is None:
            if self.frozen or self.flags & C.BPF_F_RDONLY:
                return -C.EPERM
            value = self._user_value(value)
        elif len(value) != self.value_size:
            raise ValueError(f"map {self.name}: value is {len(value)} bytes, value_size is {self.value_size}")
        if self._c is not None:
            return self._c.map_update(self.handle_addr, key, bytes(value), flags, -1 if cpu is None else cpu)
        with_lock = bool(flags & C.BPF_F_LOCK)
        mode = flags & 3
        with self.lock:
            slot = self._index.get(key)
            if slot is not None:
                if mode == C.BPF_NOEXIST:
                    return -C.EEXIST
                self._store(slot, value, cpu, with_lock, new=False)
                if self._ref is not None:
                    self._ref[slot] = 1
                return 0
            if mode == C.BPF_EXIST:
                return -C.ENOENT
            slot = self._vals.alloc()
            if slot < 0:
                if not self.lru:
                    return -C.E2BIG
                slot = self._evict()
            ks = self._keys.alloc()
            if ks != slot:  # keys and values are allocated in lock step
                raise AssertionError("hash map slot stores out of step")
            self._keys.write(slot, key)
            self._store(slot, value, cpu, False, new=True)
            self._index[key] = slot
            self._addrs[key] = self._vals.addr(slot)
            if self._native is not None:
                self._native.insert(key, slot)
            if self._ref is not None:
                self._ref[slot] = 0
            return 0

    def _store(self, slot: int, value: bytes, cpu: int | None, with_lock: bool, new: bool) -> None:
        view, off = self._vals.loc(slot)
        if not self.percpu:
            write_value(view, off, value, self.spin_lock_off, with_lock)
            return
        if cpu is None:  # user space: the whole per-CPU buffer
            view[off:off + len(value)] = value
            return
        if new:  # a program inserting: this CPU's copy gets the value, the others zeroes
            view[off:off + self._vals.stride] = bytes(self._vals.stride)
        o = off + cpu * self._vstride
        write_value(view, o, value, self.spin_lock_off, with_lock)

    def _evict(self) -> int:
        """Free one element for an insertion into a full LRU map; returns its slot."""
        index, ref = self._index, self._ref
        assert ref is not None
        for _ in range(2 * len(index) + 1):
            key = next(iter(index))
            slot = index[key]
            if ref[slot]:
                ref[slot] = 0           # second chance: move to the young end
                del index[key]
                index[key] = slot
                continue
            break
        del index[key]
        del self._addrs[key]
        if self._native is not None:
            self._native.remove(key, slot, index)
        self._keys.free(slot)
        self._vals.free(slot)
        self._evictions += 1
        slot2 = self._vals.alloc()
        assert slot2 == slot
        return slot

    def delete(self, key: bytes, cpu: int | None = None) -> int:
        if cpu is None and (self.frozen or self.flags & C.BPF_F_RDONLY):
            return -C.EPERM
        key = bytes(key)
        if self._c is not None:
            self._check_key(key)
            return self._c.map_delete(self.handle_addr, key)
        with self.lock:
            slot = self._index.pop(key, None)
            if slot is None:
                return -C.ENOENT
            del self._addrs[key]
            if self._native is not None:
                self._native.remove(key, slot, self._index)
            self._keys.free(slot)
            self._vals.free(slot)
            return 0

    def get_next_key(self, key: bytes | None) -> bytes | None:
        slot = -1
        if self._c is not None:
            if key is not None:
                slot = self._c_slot(bytes(key))
            live = self._c_slots()
            later = live[live > slot]
            return self._keys.read(int(later[0]), self.key_size) if len(later) else None
        if key is not None:
            slot = self._index.get(bytes(key), -1)
        nxt = self._vals.next_used(slot)
        if nxt < 0:
            return None
        return self._keys.read(nxt, self.key_size)

    def _live(self):
        return self._c_slots() if self._c is not None else self._vals.live_slots()

    def items(self):
        for slot in self._live():
            slot = int(slot)
            k = self._keys.read(slot, self.key_size)
            v = self._vals.read(slot, self._vals.stride if self.percpu else self.value_size)
            yield k, v

    def keys(self) -> list[bytes]:
        return [self._keys.read(int(s), self.key_size) for s in self._live()]

    def snapshot(self) -> list[tuple[bytes, int, int]]:
        """(key, key address, value slot address) of every element, for for_each_map_elem
        (taken up front so callbacks may delete elements while we iterate)."""
        out = []
        for s in self._live():
            s = int(s)
            out.append((self._keys.read(s, self.key_size), self._keys.addr(s), self._vals.addr(s)))
        return out

    def __len__(self) -> int:
        if self._c is not None:
            return self._dw[D.W["count"]]
        return len(self._index)


class PercpuHashMap(HashMap):
    percpu = True


class LruHashMap(HashMap):
    lru = True


class LruPercpuHashMap(HashMap):
    lru = True
    percpu = True
