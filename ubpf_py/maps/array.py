"""ARRAY and PERCPU_ARRAY maps (ARRAY also holds global data: .data/.rodata/.bss/.kconfig).

One HostBuffer holds every element (``round_up(value_size, 8)`` apart), so
``lookup_addr`` is an address computation.  PERCPU_ARRAY keeps one such run of
elements per CPU, each starting on its own cache line, as the kernel keeps one
per-CPU area per CPU: programs on different CPUs then never write to the same
line (adjacent per-CPU copies would make a per-CPU counter as contended as a
shared one).  User space sees the kernel's format: the CPUs' values
``round_up(value_size, 8)`` apart.  Elements
always exist: updates with BPF_NOEXIST fail with -EEXIST and deletion is
-EINVAL, as in the kernel.  A global data map is an ARRAY with one element whose
initial bytes are ``MapSpec.data``; ``.rodata``/``.kconfig`` are read-only to
programs (their region is registered non-writable) and frozen by the loader.
"""

from __future__ import annotations

import struct

from ubpf_py.abi.runtime import CACHE_LINE
from ubpf_py.maps import consts as C
from ubpf_py.maps import descriptor
from ubpf_py.maps.base import Map, check_flags_common, check_update_flags, map_create_error, write_value
from ubpf_py.obj.spec import MapSpec
from ubpf_py.vm.memory import Allocator, Region

ARRAY_CREATE_FLAG_MASK = (C.BPF_F_NUMA_NODE | C.BPF_F_MMAPABLE | C.ACCESS_MASK | C.BPF_F_PRESERVE_ELEMS
                          | C.BPF_F_INNER_MAP)
PCPU_MIN_UNIT_SIZE = 32 << 10
_U32 = struct.Struct("<I")


def _cache_lines(n: int) -> int:
    """``n`` rounded up to whole cache lines."""
    return (n + CACHE_LINE - 1) // CACHE_LINE * CACHE_LINE


def check_array_spec(spec: MapSpec, percpu: bool, value_size_fixed: int | None = None) -> None:
    """Kernel array_map_alloc_check (shared with the fd arrays and perf event array)."""
    check_flags_common(spec, ARRAY_CREATE_FLAG_MASK)
    if spec.max_entries == 0 or spec.key_size != 4 or spec.value_size == 0:
        raise map_create_error(spec, f"array maps need key_size 4 (got {spec.key_size}), value_size > 0 "
                               f"and max_entries > 0 (got {spec.max_entries})")
    if value_size_fixed is not None and spec.value_size != value_size_fixed:
        raise map_create_error(spec, f"value_size must be {value_size_fixed} (got {spec.value_size})")
    if percpu and spec.flags & C.BPF_F_NUMA_NODE:
        raise map_create_error(spec, "BPF_F_NUMA_NODE is not allowed for per-CPU arrays")
    if spec.type != C.ARRAY and spec.flags & (C.BPF_F_MMAPABLE | C.BPF_F_INNER_MAP):
        raise map_create_error(spec, "BPF_F_MMAPABLE/BPF_F_INNER_MAP are only for plain arrays")
    if spec.type != C.PERF_EVENT_ARRAY and spec.flags & C.BPF_F_PRESERVE_ELEMS:
        raise map_create_error(spec, "BPF_F_PRESERVE_ELEMS is only for perf event arrays")
    if percpu and C.round8(spec.value_size) > PCPU_MIN_UNIT_SIZE:
        raise map_create_error(spec, f"per-CPU value_size {spec.value_size} is larger than "
                               f"{PCPU_MIN_UNIT_SIZE}", C.E2BIG)


def array_next_key(key: bytes | None, max_entries: int) -> bytes | None:
    """Kernel array get_next_key: unknown/out-of-range key -> 0; last index -> end."""
    index = 0xFFFFFFFF if key is None else _U32.unpack(key)[0]
    if index >= max_entries:
        return _U32.pack(0)
    if index == max_entries - 1:
        return None
    return _U32.pack(index + 1)


class ArrayMap(Map):
    """Kernel BPF_MAP_TYPE_ARRAY."""

    def __init__(self, spec: MapSpec, ncpus: int | None = None, alloc: Allocator | None = None) -> None:
        super().__init__(spec, ncpus, alloc)
        check_array_spec(spec, self.percpu)
        self._vstride = C.round8(self.value_size)
        #: bytes between one CPU's copy of the elements and the next CPU's (0: shared values)
        self._cpu_stride = _cache_lines(self._vstride * self.max_entries) if self.percpu else 0
        #: bytes programs may reach (the buffer is padded to whole cache lines beyond it)
        self._used = self._cpu_stride * self.ncpus if self.percpu else self._vstride * self.max_entries
        # values on whole cache lines of their own (none shared with another map's data or a
        # descriptor that other CPUs read on every lookup)
        self._buf = self.alloc.alloc(_cache_lines(self._used), CACHE_LINE)
        self._base = self._buf.addr
        self._view = self._buf.view
        if spec.data is not None:
            if len(spec.data) > self.value_size:
                raise map_create_error(spec, f"initial data is {len(spec.data)} bytes, larger than "
                                       f"value_size {self.value_size}")
            self._view[0:len(spec.data)] = spec.data
        D = descriptor
        descriptor.write_descriptor(self._handle.view, {
            D.D_KIND: D.KIND_ARRAY, D.D_KEY_SIZE: 4, D.D_LIMIT: self.max_entries, D.D_TABLE: self._vstride,
            D.D_VALUES: self._base, D.D_CPU_STRIDE: self._cpu_stride,
            D.D_VAL_STRIDE: self._vstride,
            D.D_VALUE_SIZE: self.value_size if self.value_size <= D.MAX_NATIVE_KEY else 0,
            D.W["value_size"]: self.value_size, D.W["max_entries"]: self.max_entries,
            D.W["ncpus"]: self.ncpus if self.percpu else 1})

    def regions(self) -> list[Region]:
        return [Region.of(self._buf, f"map {self.name}", writable=not self.readonly_for_programs,
                          size=self._used)]

    def _index(self, key: bytes) -> int:
        return _U32.unpack(key)[0]

    def lookup_addr(self, key: bytes, cpu: int = 0) -> int:
        i = _U32.unpack(key)[0]
        if i >= self.max_entries:
            return 0
        return self._base + i * self._vstride

    def _read(self, i: int) -> bytes:
        """Element ``i`` as user space sees it (every CPU's copy for per-CPU arrays)."""
        off = i * self._vstride
        if not self.percpu:
            return bytes(self._view[off:off + self.value_size])
        vs, cs = self._vstride, self._cpu_stride
        return b"".join(self._view[off + c * cs:off + c * cs + vs] for c in range(self.ncpus))

    def lookup(self, key: bytes) -> bytes | None:
        self._check_key(key)
        i = self._index(key)
        if i >= self.max_entries:
            return None
        return self._read(i)

    def update(self, key: bytes, value: bytes, flags: int = C.BPF_ANY, cpu: int | None = None) -> int:
        if (flags == 0 or flags == C.BPF_EXIST) and cpu is not None and not self.percpu \
                and len(value) == self.value_size and len(key) == 4:
            i = _U32.unpack(key)[0]   # a program's plain update: one copy
            if i >= self.max_entries:
                return -C.E2BIG
            off = i * self._vstride
            self._view[off:off + len(value)] = value
            return 0
        rc = check_update_flags(flags, self.spin_lock_off is not None)
        if rc:
            return rc
        self._check_key(key)
        if cpu is None:
            if self.frozen or self.flags & C.BPF_F_RDONLY:
                return -C.EPERM
            value = self._user_value(value)
        elif len(value) != self.value_size:
            raise ValueError(f"map {self.name}: value is {len(value)} bytes, value_size is {self.value_size}")
        i = self._index(key)
        if i >= self.max_entries:
            return -C.E2BIG
        if flags & 3 == C.BPF_NOEXIST:
            return -C.EEXIST
        off = i * self._vstride
        with_lock = bool(flags & C.BPF_F_LOCK)
        with self.lock:
            if self.percpu and cpu is None:
                vs, cs = self._vstride, self._cpu_stride
                for c in range(self.ncpus):
                    self._view[off + c * cs:off + c * cs + vs] = value[c * vs:(c + 1) * vs]
            else:
                if self.percpu:
                    off += cpu * self._cpu_stride  # type: ignore[operator]
                write_value(self._view, off, value, self.spin_lock_off, with_lock)
        return 0

    def delete(self, key: bytes, cpu: int | None = None) -> int:
        return -C.EINVAL

    def get_next_key(self, key: bytes | None) -> bytes | None:
        return array_next_key(key, self.max_entries)

    def items(self):
        for i in range(self.max_entries):
            yield _U32.pack(i), self._read(i)

    def keys(self) -> list[bytes]:
        return [_U32.pack(i) for i in range(self.max_entries)]

    def nonzero_keys(self, chunk: int = 1 << 20) -> list[bytes]:
        """Keys of the elements that are not all zero bytes, found with numpy a chunk at a
        time: how a dump of a huge array (millions of entries) stays fast."""
        import numpy as np

        out: list[bytes] = []
        words = self._vstride // 8           # elements are 8-byte aligned (round8 strides)
        copies = self.ncpus if self.percpu else 1
        per_copy = self._cpu_stride // 8 if self.percpu else words * self.max_entries
        buf = np.frombuffer(self._view, dtype=np.uint64, count=per_copy * copies).reshape(copies, per_copy)
        for start in range(0, self.max_entries, chunk):
            n = min(chunk, self.max_entries - start)
            rows = buf[:, start * words:(start + n) * words].reshape(copies, n, words)
            hit = (rows != 0).any(axis=(0, 2))
            out.extend(_U32.pack(start + int(i)) for i in np.flatnonzero(hit))
        return out

    def __len__(self) -> int:
        return self.max_entries


class PercpuArrayMap(ArrayMap):
    """Kernel BPF_MAP_TYPE_PERCPU_ARRAY: one copy of every element per CPU."""

    percpu = True

    def lookup_addr(self, key: bytes, cpu: int = 0) -> int:
        i = _U32.unpack(key)[0]
        if i >= self.max_entries:
            return 0
        return self._base + i * self._vstride + cpu * self._cpu_stride
