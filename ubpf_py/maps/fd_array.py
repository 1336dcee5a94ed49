"""Maps whose values are references to other objects: PROG_ARRAY, ARRAY_OF_MAPS, HASH_OF_MAPS.

User space refers to programs and maps by id (the kernel returns ids from
lookups of these maps; we have no fds, so updates take ids too).  Programs get
what the kernel gives them: a tail-call target for PROG_ARRAY (through
``program_at``), and for map-in-map lookups the inner map's *handle address*,
which the program then passes to other map helpers.

Map-in-map maps on a shared arena (in-target execution) also keep their slots where the
in-target runtime reads them (``abi.maps`` KIND_ARRAY_OF_MAPS / KIND_HASH_OF_MAPS): a u64
handle per array slot, or a C hash map from key to handle.  Every change writes the shared
copy with whole 8-byte stores, so a program in the target racing it sees the old or the new
inner map; inner maps must then live in the same arena (a handle elsewhere would mean nothing
in the target).
"""

from __future__ import annotations

import struct
from typing import Any

from ubpf_py.maps import consts as C
from ubpf_py.maps import descriptor as D
from ubpf_py.maps.array import array_next_key, check_array_spec
from ubpf_py.maps.base import Map, check_flags_common, map_by_id, map_create_error
from ubpf_py.maps.hash import HashMap
from ubpf_py.maps.native_ops import runtime_for
from ubpf_py.obj.spec import MapSpec
from ubpf_py.vm.memory import Allocator

_U32 = struct.Struct("<I")


class ProgArrayMap(Map):
    """Tail-call table: slot -> program (``Executable``) with a u32 program id."""

    def __init__(self, spec: MapSpec, ncpus: int | None = None, alloc: Allocator | None = None) -> None:
        super().__init__(spec, ncpus, alloc)
        check_array_spec(spec, False, value_size_fixed=4)
        self._progs: list[Any] = [None] * self.max_entries
        self._ids = [0] * self.max_entries
        #: programs user space may store by id (the loader registers every program it loads)
        self.known_programs: dict[int, Any] = {}

    def set_program(self, index: int, executable: Any, prog_id: int = 0) -> None:
        """Put a program in a slot (loader: static ``__array(values, ...)`` initialisation)."""
        if not 0 <= index < self.max_entries:
            raise IndexError(f"prog array {self.name}: index {index} is beyond max_entries {self.max_entries}")
        with self.lock:
            self._progs[index] = executable
            self._ids[index] = prog_id
        if prog_id:
            self.known_programs.setdefault(prog_id, executable)

    def program_at(self, index: int) -> Any:
        """The program a tail call to ``index`` runs, or None (the call falls through)."""
        if 0 <= index < self.max_entries:
            return self._progs[index]
        return None

    get_program = program_at

    def lookup(self, key: bytes) -> bytes | None:
        self._check_key(key)
        i = _U32.unpack(key)[0]
        if i >= self.max_entries or self._progs[i] is None:
            return None
        return _U32.pack(self._ids[i])

    def update(self, key: bytes, value: bytes, flags: int = C.BPF_ANY, cpu: int | None = None) -> int:
        if cpu is not None:
            return -C.EINVAL  # programs cannot update fd arrays
        if flags != C.BPF_ANY:
            return -C.EINVAL
        self._check_key(key)
        i = _U32.unpack(key)[0]
        if i >= self.max_entries:
            return -C.E2BIG
        prog_id = _U32.unpack(value)[0]
        prog = self.known_programs.get(prog_id)
        if prog is None:
            return -C.EBADF
        self.set_program(i, prog, prog_id)
        return 0

    def delete(self, key: bytes, cpu: int | None = None) -> int:
        self._check_key(key)
        i = _U32.unpack(key)[0]
        if i >= self.max_entries:
            return -C.E2BIG
        with self.lock:
            if self._progs[i] is None:
                return -C.ENOENT
            self._progs[i] = None
            self._ids[i] = 0
        return 0

    def get_next_key(self, key: bytes | None) -> bytes | None:
        return array_next_key(key, self.max_entries)


def _inner_compatible(template: MapSpec, inner: Map, dynamic_size: bool) -> bool:
    """Kernel bpf_map_meta_equal: same type, key/value size, flags (and max_entries unless
    the template was declared with BPF_F_INNER_MAP)."""
    s = inner.spec
    return (s.type == template.type and inner.key_size == template.key_size
            and inner.value_size == template.value_size and s.flags == template.flags
            and (dynamic_size or inner.max_entries == template.max_entries))


class _MapInMapMixin:
    """Shared by ARRAY_OF_MAPS and HASH_OF_MAPS: values are inner maps."""

    spec: MapSpec
    name: str
    holds_maps = True

    def _setup_inner(self, spec: MapSpec) -> None:
        if spec.inner is None:
            raise map_create_error(spec, "map-in-map needs an inner map template (__array(values, ...))")
        if spec.value_size != 4:
            raise map_create_error(spec, f"map-in-map value_size must be 4 (got {spec.value_size})")
        if spec.inner.type in (C.ARRAY_OF_MAPS, C.HASH_OF_MAPS, C.PROG_ARRAY):
            raise map_create_error(spec, "inner maps cannot themselves be map-in-map or prog arrays")
        self.inner_template = spec.inner
        self._dynamic = bool(spec.inner.flags & C.BPF_F_INNER_MAP)
        self._shared = runtime_for(self.alloc) is not None

    def resolve_inner(self, value: bytes | Map) -> Map | int:
        """A user-space value (inner map id or a Map) -> the map, or -errno."""
        inner = value if isinstance(value, Map) else map_by_id(_U32.unpack(value)[0])
        if inner is None:
            return -C.EBADF
        if not _inner_compatible(self.inner_template, inner, self._dynamic):
            return -C.EINVAL
        if self._shared and not self.alloc.contains(inner.handle_addr, D.HANDLE_SIZE):
            return -C.EINVAL     # not in this arena: its handle means nothing in the target
        return inner


class ArrayOfMapsMap(_MapInMapMixin, Map):
    """BPF_MAP_TYPE_ARRAY_OF_MAPS."""

    def __init__(self, spec: MapSpec, ncpus: int | None = None, alloc: Allocator | None = None) -> None:
        Map.__init__(self, spec, ncpus, alloc)
        self._setup_inner(spec)
        check_array_spec(MapSpec(spec.name, spec.type, spec.key_size, 4, spec.max_entries,
                                 spec.flags & ~C.BPF_F_INNER_MAP), False)
        self._slots: list[Map | None] = [None] * self.max_entries
        self._c = runtime_for(self.alloc)
        if self._c is not None:
            buf = self.alloc.alloc(8 * self.max_entries, 64)
            D.write_descriptor(self._handle.view, {
                D.D_KIND: D.KIND_ARRAY_OF_MAPS, D.D_KEY_SIZE: 4, D.D_LIMIT: self.max_entries,
                D.D_VALUES: buf.addr, D.W["value_size"]: 4, D.W["max_entries"]: self.max_entries})

    def _set(self, i: int, m: Map | None) -> None:
        self._slots[i] = m
        if self._c is not None:   # one atomic store of the whole handle (runtime/maps.c)
            self._c.set_inner(self.handle_addr, i, 0 if m is None else m.handle_addr)

    def lookup_addr(self, key: bytes, cpu: int = 0) -> int:
        i = _U32.unpack(key)[0]
        if i >= self.max_entries:
            return 0
        m = self._slots[i]
        return 0 if m is None else m.handle_addr

    def lookup(self, key: bytes) -> bytes | None:
        self._check_key(key)
        i = _U32.unpack(key)[0]
        m = self._slots[i] if i < self.max_entries else None
        return None if m is None else _U32.pack(m.map_id)

    def update(self, key: bytes, value: bytes | Map, flags: int = C.BPF_ANY, cpu: int | None = None) -> int:
        if cpu is not None or flags != C.BPF_ANY:  # fd arrays take BPF_ANY only
            return -C.EINVAL
        self._check_key(key)
        i = _U32.unpack(key)[0]
        if i >= self.max_entries:
            return -C.E2BIG
        inner = self.resolve_inner(value)
        if isinstance(inner, int):
            return inner
        with self.lock:
            self._set(i, inner)
        return 0

    def delete(self, key: bytes, cpu: int | None = None) -> int:
        self._check_key(key)
        i = _U32.unpack(key)[0]
        if i >= self.max_entries:
            return -C.E2BIG
        with self.lock:
            if self._slots[i] is None:
                return -C.ENOENT
            self._set(i, None)
        return 0

    def get_next_key(self, key: bytes | None) -> bytes | None:
        return array_next_key(key, self.max_entries)


class HashOfMapsMap(_MapInMapMixin, Map):
    """BPF_MAP_TYPE_HASH_OF_MAPS (a hash whose values are inner maps)."""

    def __init__(self, spec: MapSpec, ncpus: int | None = None, alloc: Allocator | None = None) -> None:
        Map.__init__(self, spec, ncpus, alloc)
        self._setup_inner(spec)
        check_flags_common(spec, C.BPF_F_NO_PREALLOC | C.BPF_F_NUMA_NODE | C.ACCESS_MASK | C.BPF_F_ZERO_SEED)
        if spec.max_entries == 0 or spec.key_size == 0:
            raise map_create_error(spec, "key_size and max_entries must be > 0")
        self._entries: dict[bytes, Map] = {}
        #: shared: the C hash map (key -> u64 inner handle) the in-target runtime reads
        self._store = None
        if self._shared:
            self._store = HashMap(MapSpec(f"{spec.name}.slots", C.HASH, spec.key_size, 8, spec.max_entries),
                                  alloc=self.alloc)
            D.write_descriptor(self._handle.view, {
                D.D_KIND: D.KIND_HASH_OF_MAPS, D.D_KEY_SIZE: spec.key_size, D.D_VALUES: self._store.handle_addr,
                D.W["value_size"]: 4, D.W["max_entries"]: self.max_entries})

    def lookup_addr(self, key: bytes, cpu: int = 0) -> int:
        m = self._entries.get(key)
        return 0 if m is None else m.handle_addr

    def lookup(self, key: bytes) -> bytes | None:
        m = self._entries.get(bytes(key))
        return None if m is None else _U32.pack(m.map_id)

    def update(self, key: bytes, value: bytes | Map, flags: int = C.BPF_ANY, cpu: int | None = None) -> int:
        if cpu is not None:
            return -C.EINVAL
        if flags > C.BPF_EXIST:
            return -C.EINVAL
        key = bytes(key)
        self._check_key(key)
        inner = self.resolve_inner(value)
        if isinstance(inner, int):
            return inner
        with self.lock:
            exists = key in self._entries
            if exists and flags == C.BPF_NOEXIST:
                return -C.EEXIST
            if not exists and flags == C.BPF_EXIST:
                return -C.ENOENT
            if not exists and len(self._entries) >= self.max_entries:
                return -C.E2BIG
            if self._store is not None:
                rc = self._store.update(key, inner.handle_addr.to_bytes(8, "little"), C.BPF_ANY)
                if rc:
                    return rc
            self._entries[key] = inner
        return 0

    def delete(self, key: bytes, cpu: int | None = None) -> int:
        key = bytes(key)
        with self.lock:
            if self._entries.pop(key, None) is None:
                return -C.ENOENT
            if self._store is not None:
                self._store.delete(key)
            return 0

    def get_next_key(self, key: bytes | None) -> bytes | None:
        keys = list(self._entries)
        if not keys:
            return None
        if key is None or bytes(key) not in self._entries:
            return keys[0]
        i = keys.index(bytes(key))
        return keys[i + 1] if i + 1 < len(keys) else None
