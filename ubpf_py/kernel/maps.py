"""Kernel BPF maps as small Python objects (one fd each).

Operations return the kernel's result codes (0 or ``-errno``) instead of raising,
so that tests can compare them one to one with the userspace maps, which follow
the same convention.  Only creation raises (``KernelBackendError``), because a map
that does not exist has nothing to compare.

Per-CPU maps: the kernel reads and writes a buffer of ``round_up(value_size, 8) *
possible_cpus()`` bytes; ``lookup`` returns that buffer whole and
``lookup_percpu`` splits it into one ``value_size`` slice per CPU.
"""

from __future__ import annotations

import ctypes
import functools
import os
from dataclasses import dataclass

from ubpf_py.errors import KernelBackendError, KernelMapError
from ubpf_py.kernel.syscall import (
    BPF_MAP_CREATE,
    BPF_MAP_DELETE_ELEM,
    BPF_MAP_FREEZE,
    BPF_MAP_GET_NEXT_KEY,
    BPF_MAP_LOOKUP_AND_DELETE_ELEM,
    BPF_MAP_LOOKUP_ELEM,
    BPF_MAP_UPDATE_ELEM,
    MapCreateAttr,
    MapElemAttr,
    bpf,
    bpf_rc,
)
from ubpf_py.sysinfo import possible_cpus

# map types whose values the kernel keeps per CPU
PERCPU_MAP_TYPES = frozenset({5, 6, 10, 21})  # percpu_hash, percpu_array, lru_percpu_hash, percpu_cgroup_storage
# queue / stack / bloom filter: keyless maps
KEYLESS_MAP_TYPES = frozenset({22, 23, 30})

# update flags
BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2
BPF_F_LOCK = 4

_ENOENT = 2


@functools.cache
def _round8(n: int) -> int:
    return (n + 7) & ~7


@dataclass
class KernelMap:
    """A live kernel map.  Create with ``KernelMap.create(...)``; close with ``close()``
    or use as a context manager."""

    fd: int
    map_type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int = 0
    name: str = ""

    @classmethod
    def create(cls, map_type: int, key_size: int, value_size: int, max_entries: int, flags: int = 0,
               *, name: str = "", inner_map_fd: int = 0, map_extra: int = 0, numa_node: int = 0,
               btf_fd: int = 0, btf_key_type_id: int = 0, btf_value_type_id: int = 0,
               btf_vmlinux_value_type_id: int = 0) -> KernelMap:
        """BPF_MAP_CREATE; raises KernelBackendError (with errno) when the kernel refuses.
        ``name`` is truncated to the kernel's 15 characters of [A-Za-z0-9_.]."""
        attr = MapCreateAttr(
            map_type=map_type, key_size=key_size, value_size=value_size, max_entries=max_entries,
            map_flags=flags, inner_map_fd=inner_map_fd, numa_node=numa_node,
            map_name=kernel_object_name(name), btf_fd=btf_fd, btf_key_type_id=btf_key_type_id,
            btf_value_type_id=btf_value_type_id, btf_vmlinux_value_type_id=btf_vmlinux_value_type_id,
            map_extra=map_extra,
        )
        try:
            fd = bpf(BPF_MAP_CREATE, attr)
        except KernelBackendError as exc:
            raise KernelMapError(f"{exc.args[0]} (map {name or '?'} type {map_type} key {key_size} "
                                 f"value {value_size} max_entries {max_entries} flags {flags:#x})",
                                 errno=exc.errno, log=exc.log) from None
        return cls(fd, map_type, key_size, value_size, max_entries, flags, name)

    # ---- sizes -------------------------------------------------------------------------
    @property
    def is_percpu(self) -> bool:
        return self.map_type in PERCPU_MAP_TYPES

    @property
    def kernel_value_size(self) -> int:
        """Size of the buffer the kernel reads/writes for one value."""
        if self.is_percpu:
            return _round8(self.value_size) * possible_cpus()
        return self.value_size

    def _key_buf(self, key: bytes | None) -> ctypes.Array | None:
        if key is None:
            return None
        if len(key) != self.key_size:
            raise ValueError(f"map {self.name}: key is {len(key)} bytes, map key_size is {self.key_size}")
        return ctypes.create_string_buffer(bytes(key), len(key) or 1)

    def _value_in(self, value: bytes) -> ctypes.Array:
        """A value buffer for update/push.  Per-CPU maps take either the full per-CPU
        buffer or one value, which is then replicated to every CPU."""
        size = self.kernel_value_size
        if self.is_percpu and len(value) == self.value_size:
            slot = bytes(value) + bytes(_round8(self.value_size) - self.value_size)
            value = slot * possible_cpus()
        if len(value) != size:
            raise ValueError(f"map {self.name}: value is {len(value)} bytes, expected {size}")
        return ctypes.create_string_buffer(bytes(value), size or 1)

    @staticmethod
    def _addr(buf: ctypes.Array | None) -> int:
        return ctypes.addressof(buf) if buf is not None else 0

    # ---- element operations (return 0 / -errno) ------------------------------------------
    def lookup(self, key: bytes) -> bytes | None:
        """The value (whole per-CPU buffer for per-CPU maps), or None when absent."""
        kbuf = self._key_buf(key)
        vbuf = ctypes.create_string_buffer(self.kernel_value_size or 1)
        rc = bpf_rc(BPF_MAP_LOOKUP_ELEM, MapElemAttr(map_fd=self.fd, key=self._addr(kbuf),
                                                     value=ctypes.addressof(vbuf)))
        if rc < 0:
            return None
        return vbuf.raw[: self.kernel_value_size]

    def lookup_percpu(self, key: bytes) -> list[bytes] | None:
        """One ``value_size`` slice per possible CPU, or None when absent."""
        raw = self.lookup(key)
        if raw is None:
            return None
        if not self.is_percpu:
            return [raw]
        stride = _round8(self.value_size)
        return [raw[i * stride: i * stride + self.value_size] for i in range(possible_cpus())]

    def update(self, key: bytes, value: bytes, flags: int = 0) -> int:
        kbuf = self._key_buf(key)
        vbuf = self._value_in(value)
        return min(0, bpf_rc(BPF_MAP_UPDATE_ELEM, MapElemAttr(
            map_fd=self.fd, key=self._addr(kbuf), value=ctypes.addressof(vbuf), flags=flags)))

    def delete(self, key: bytes) -> int:
        kbuf = self._key_buf(key)
        return min(0, bpf_rc(BPF_MAP_DELETE_ELEM, MapElemAttr(map_fd=self.fd, key=self._addr(kbuf))))

    def get_next_key(self, key: bytes | None) -> bytes | None:
        """The key after ``key`` (the first key when None); None at the end."""
        kbuf = self._key_buf(key)
        nbuf = ctypes.create_string_buffer(self.key_size or 1)
        rc = bpf_rc(BPF_MAP_GET_NEXT_KEY, MapElemAttr(map_fd=self.fd, key=self._addr(kbuf),
                                                      value=ctypes.addressof(nbuf)))
        if rc < 0:
            return None
        return nbuf.raw[: self.key_size]

    def all_keys(self) -> list[bytes]:
        """Every key, in the kernel's iteration order."""
        out: list[bytes] = []
        key = self.get_next_key(None)
        while key is not None and len(out) <= self.max_entries:
            out.append(key)
            key = self.get_next_key(key)
        return out

    def keys(self) -> list[bytes]:
        """Same as ``all_keys`` (kept: the first published API had this name)."""
        return self.all_keys()

    def items(self) -> list[tuple[bytes, bytes]]:
        """(key, value) pairs; keys deleted concurrently are skipped."""
        out = []
        for k in self.all_keys():
            v = self.lookup(k)
            if v is not None:
                out.append((k, v))
        return out

    # ---- queue / stack -------------------------------------------------------------------
    def push(self, value: bytes, flags: int = 0) -> int:
        """Queue/stack push (BPF_MAP_UPDATE_ELEM with no key); BPF_EXIST overwrites the oldest."""
        vbuf = self._value_in(value)
        return min(0, bpf_rc(BPF_MAP_UPDATE_ELEM, MapElemAttr(
            map_fd=self.fd, key=0, value=ctypes.addressof(vbuf), flags=flags)))

    def lookup_and_delete(self, key: bytes | None = None) -> bytes | int:
        """Pop (queue/stack: ``key`` None) or lookup-and-delete a hash element.
        Returns the value or ``-errno``."""
        kbuf = self._key_buf(key) if key is not None else None
        vbuf = ctypes.create_string_buffer(self.kernel_value_size or 1)
        rc = bpf_rc(BPF_MAP_LOOKUP_AND_DELETE_ELEM, MapElemAttr(
            map_fd=self.fd, key=self._addr(kbuf), value=ctypes.addressof(vbuf)))
        if rc < 0:
            return rc
        return vbuf.raw[: self.kernel_value_size]

    def pop(self) -> bytes | int:
        return self.lookup_and_delete(None)

    def peek(self) -> bytes | int:
        """Queue/stack peek (lookup with no key): the value or ``-errno``."""
        vbuf = ctypes.create_string_buffer(self.kernel_value_size or 1)
        rc = bpf_rc(BPF_MAP_LOOKUP_ELEM, MapElemAttr(map_fd=self.fd, key=0, value=ctypes.addressof(vbuf)))
        if rc < 0:
            return rc
        return vbuf.raw[: self.kernel_value_size]

    def freeze(self) -> int:
        """BPF_MAP_FREEZE: no more writes from user space (programs still see .rodata as
        read-only only when created with BPF_F_RDONLY_PROG)."""
        return min(0, bpf_rc(BPF_MAP_FREEZE, MapElemAttr(map_fd=self.fd)))

    # ---- lifetime ------------------------------------------------------------------------
    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> KernelMap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def kernel_object_name(name: str) -> bytes:
    """The kernel accepts map/program names of up to 15 chars of [A-Za-z0-9_.]; keep a
    valid prefix (libbpf does the same) so names show up in bpftool."""
    out = []
    for ch in name:
        if ch.isascii() and (ch.isalnum() or ch in "_."):
            out.append(ch)
        else:
            break
    return "".join(out)[:15].encode()
