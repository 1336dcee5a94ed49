"""The ``Map`` base class every map family implements, and the map registries.

Conventions (shared by helpers, output, the loader and the tests):

* Operations return kernel result codes (``0`` or ``-errno``) instead of raising;
  only creation raises (``MapError``, with ``.errno`` set to what the kernel's
  BPF_MAP_CREATE would have returned).  This mirrors ``kernel.maps.KernelMap`` so
  the two can be compared operation by operation.
* ``cpu`` argument: ``None`` means *user space* semantics (the syscall: per-CPU
  maps take/return the whole ``round_up(value_size, 8) * ncpus`` buffer, frozen
  maps refuse writes); an integer means *program* semantics on that CPU (per-CPU
  maps touch only that CPU's copy).  Helpers pass ``env.hit.cpu``.  An explicit
  argument (rather than a CPU callback stored in the map) keeps maps free of
  per-hit state and safe when several tracer threads run programs at once.
* Values live in buffers from the map's allocator (numpy-backed ``HostBuffer`` s, or
  a shared arena for in-target execution: ``vm.memory.Allocator``); ``lookup_addr`` gives the host
  address of a value so programs can read and write it in place, and
  ``regions()`` lists the memory the loader must add to ``env.memory``.
* Every map has a ``handle_addr`` (the address of a private buffer
  whose first bytes are the native descriptor of ``maps.descriptor``),
  which is what a program's ``lddw map`` loads; ``map_by_handle`` finds the map
  again (map-in-map inner maps are found this way even when the loader never
  saw them).
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections.abc import Iterator

from ubpf_py.abi.runtime import CACHE_LINE
from ubpf_py.errors import MapError
from ubpf_py.maps import consts as C
from ubpf_py.maps.descriptor import HANDLE_SIZE, W
from ubpf_py.obj.spec import MapSpec
from ubpf_py.vm.memory import HEAP, Allocator, Region

SPIN_OFF_WORD = W["spin_off"]
_ids = itertools.count(1)
_BY_HANDLE: weakref.WeakValueDictionary[int, Map] = weakref.WeakValueDictionary()
_BY_ID: weakref.WeakValueDictionary[int, Map] = weakref.WeakValueDictionary()


def map_by_handle(addr: int) -> Map | None:
    """The live map whose ``handle_addr`` is ``addr``, if any."""
    return _BY_HANDLE.get(addr)


def map_by_id(map_id: int) -> Map | None:
    """The live map with this id (user space refers to inner maps by id)."""
    return _BY_ID.get(map_id)


def map_create_error(spec: MapSpec, why: str, errno: int = C.EINVAL) -> MapError:
    """A MapError naming the map and carrying the kernel's errno for the same attributes."""
    err = MapError(f"map '{spec.name}' ({spec.type_name}): {why}")
    err.errno = errno  # type: ignore[attr-defined]
    return err


class Map:
    """Base of every map.  Subclasses implement the operations their type supports;
    the defaults return the kernel's answer for a type that does not support them."""

    #: map types whose values are kept per CPU
    percpu: bool = False
    #: map-in-map types: program lookups return an inner map's handle address
    holds_maps: bool = False

    def __init__(self, spec: MapSpec, ncpus: int | None = None, alloc: Allocator | None = None) -> None:
        self.spec = spec
        self.name = spec.name
        self.key_size = spec.key_size
        self.value_size = spec.value_size
        self.max_entries = spec.max_entries
        self.flags = spec.flags
        self.ncpus = ncpus or C.possible_cpus()
        self.map_id = next(_ids)
        #: where every byte of this map's storage comes from (``vm.memory.HEAP`` or a shared arena)
        self.alloc: Allocator = alloc or HEAP
        #: the handle doubles as the native descriptor JIT code reads (``maps.descriptor``)
        # whole cache lines of its own: programs on every CPU read the descriptor on each lookup,
        # so no map value written per hit may share its line
        self._handle = self.alloc.alloc(HANDLE_SIZE, CACHE_LINE)
        self.handle_addr: int = self._handle.addr
        self.lock = threading.Lock()
        self.frozen = False
        #: offset of a ``struct bpf_spin_lock`` in the value (set by the loader from BTF);
        #: BPF_F_LOCK updates need one, as in the kernel
        self.spin_lock_off: int | None = None
        _BY_HANDLE[self.handle_addr] = self
        _BY_ID[self.map_id] = self

    @property
    def spin_lock_off(self) -> int | None:
        return self._spin_lock_off

    @spin_lock_off.setter
    def spin_lock_off(self, off: int | None) -> None:
        self._spin_lock_off = off
        # native updates (the C runtime) keep the lock word on BPF_F_LOCK too
        self._handle.view.cast("Q")[SPIN_OFF_WORD] = 0 if off is None else off + 1

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} {self.name!r} key={self.key_size} value={self.value_size} "
                f"max_entries={self.max_entries}>")

    # ---- memory -------------------------------------------------------------------------
    def regions(self) -> list[Region]:
        """Host memory programs may touch through pointers this map hands out."""
        return []

    @property
    def readonly_for_programs(self) -> bool:
        return bool(self.flags & C.BPF_F_RDONLY_PROG) or self.spec.readonly

    # ---- element operations (overridden per family) -------------------------------------
    def lookup(self, key: bytes) -> bytes | None:
        """The value for ``key`` (the whole per-CPU buffer for per-CPU maps), or None."""
        return None

    def lookup_addr(self, key: bytes, cpu: int = 0) -> int:
        """Host address of the value for ``key`` (this CPU's copy for per-CPU maps), 0 if absent."""
        return 0

    def update(self, key: bytes, value: bytes, flags: int = C.BPF_ANY, cpu: int | None = None) -> int:
        return -C.EINVAL

    def delete(self, key: bytes, cpu: int | None = None) -> int:
        return -C.EINVAL

    def get_next_key(self, key: bytes | None) -> bytes | None:
        return None

    def lookup_and_delete(self, key: bytes | None = None) -> bytes | int:
        """BPF_MAP_LOOKUP_AND_DELETE_ELEM: the value or ``-errno``."""
        if key is None:
            return self.pop()
        value = self.lookup(key)
        if value is None:
            return -C.ENOENT
        rc = self.delete(key)
        return value if rc == 0 else rc

    # queue / stack / bloom filter
    def push(self, value: bytes, flags: int = C.BPF_ANY) -> int:
        return -C.ENOTSUPP

    def pop(self) -> bytes | int:
        return -C.ENOTSUPP

    def peek(self) -> bytes | int:
        return -C.ENOTSUPP

    def freeze(self) -> int:
        """BPF_MAP_FREEZE: user space can no longer write (programs still can, unless
        the map was created with BPF_F_RDONLY_PROG)."""
        if self.frozen:  # a frozen map has lost its write permission: -EPERM before -EBUSY
            return -C.EPERM
        self.frozen = True
        return 0

    # ---- iteration -----------------------------------------------------------------------
    def keys(self) -> list[bytes]:
        """Every key in iteration order (bounded by max_entries like a careful dumper)."""
        out: list[bytes] = []
        key = self.get_next_key(None)
        while key is not None and len(out) <= self.max_entries:
            out.append(key)
            key = self.get_next_key(key)
        return out

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """(key, value) pairs; per-CPU maps yield the whole per-CPU buffer as value."""
        for k in self.keys():
            v = self.lookup(k)
            if v is not None:
                yield k, v

    def lookup_percpu(self, key: bytes) -> list[bytes] | None:
        """One ``value_size`` slice per CPU (a one-element list for shared maps)."""
        raw = self.lookup(key)
        if raw is None:
            return None
        if not self.percpu:
            return [raw]
        stride = C.round8(self.value_size)
        return [raw[i * stride:i * stride + self.value_size] for i in range(self.ncpus)]

    def __len__(self) -> int:
        return len(self.keys())

    def __bool__(self) -> bool:  # a map is an object, never "false" because it is empty
        return True

    # ---- shared checks -------------------------------------------------------------------
    def _check_key(self, key: bytes) -> None:
        if len(key) != self.key_size:
            raise ValueError(f"map {self.name}: key is {len(key)} bytes, key_size is {self.key_size}")

    def _user_value(self, value: bytes) -> bytes:
        """Normalise a user-space value: per-CPU maps take the full buffer or one value
        (replicated to every CPU, as kernel.maps.KernelMap does)."""
        if not self.percpu:
            if len(value) != self.value_size:
                raise ValueError(f"map {self.name}: value is {len(value)} bytes, "
                                 f"value_size is {self.value_size}")
            return bytes(value)
        stride = C.round8(self.value_size)
        if len(value) == self.value_size and len(value) != stride * self.ncpus:
            value = (bytes(value) + bytes(stride - self.value_size)) * self.ncpus
        if len(value) != stride * self.ncpus:
            raise ValueError(f"map {self.name}: per-CPU value is {len(value)} bytes, "
                             f"expected {stride * self.ncpus} ({self.ncpus} CPUs x {stride})")
        return bytes(value)


def check_flags_common(spec: MapSpec, allowed: int) -> None:
    """Reject map_flags outside ``allowed`` (kernel: -EINVAL)."""
    bad = spec.flags & ~allowed
    if bad:
        raise map_create_error(spec, f"map_flags {bad:#x} not allowed for this map type; remove them")
    if (spec.flags & C.BPF_F_RDONLY) and (spec.flags & C.BPF_F_WRONLY):
        raise map_create_error(spec, "BPF_F_RDONLY and BPF_F_WRONLY are mutually exclusive")
    if (spec.flags & C.BPF_F_RDONLY_PROG) and (spec.flags & C.BPF_F_WRONLY_PROG):
        raise map_create_error(spec, "BPF_F_RDONLY_PROG and BPF_F_WRONLY_PROG are mutually exclusive")


def check_update_flags(flags: int, has_lock: bool) -> int:
    """Kernel rule for element updates: flags beyond BPF_EXIST (ignoring BPF_F_LOCK) or
    BPF_F_LOCK on a value without a spin lock are -EINVAL; returns 0 when fine."""
    if (flags & ~C.BPF_F_LOCK) > C.BPF_EXIST:
        return -C.EINVAL
    if (flags & C.BPF_F_LOCK) and not has_lock:
        return -C.EINVAL
    return 0


def write_value(view: memoryview, off: int, value: bytes, lock_off: int | None, with_lock: bool) -> None:
    """Copy a value into storage; with BPF_F_LOCK the 4-byte spin lock word is kept."""
    n = len(value)
    if with_lock and lock_off is not None:
        view[off:off + lock_off] = value[:lock_off]
        view[off + lock_off + 4:off + n] = value[lock_off + 4:]
    else:
        view[off:off + n] = value
