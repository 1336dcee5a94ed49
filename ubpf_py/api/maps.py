"""Maps and globals of a :class:`~ubpf_py.api.BPFObject`, as Python mappings.

Before ``load()`` a :class:`MapView` holds the map's *definition*, whose sizes
may be changed by assigning ``max_entries`` / ``value_size`` / ``key_size``
(libbpf's ``bpf_map__set_max_entries`` and friends); after it, the live map of either
backend, read and written like a dict.  Keys and values are decoded through the object's BTF (integers,
dicts for structs, lists for arrays, strings for char arrays); ``raw=True``
gives the bytes.  Struct keys come back as :class:`Struct`, a dict that can be a
dict key itself.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any, TextIO

from ubpf_py.errors import MapError, UbpfError, UsageError
from ubpf_py.obj.spec import MapSpec, ObjectSpec
from ubpf_py.output.dump import NO_ENTRIES, PERCPU, GlobalDump, MapDump
from ubpf_py.output.hist import Histogram, map_histograms, render_hist
from ubpf_py.output.values import ValueDecoder


class Struct(dict):
    """A decoded struct used as a key: a dict that hashes by its (frozen) items."""

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple((k, _freeze(v)) for k, v in self.items()))


def _freeze(v: Any) -> Any:
    if isinstance(v, dict):
        return Struct(v)
    if isinstance(v, list):
        return tuple(_freeze(x) for x in v)
    return v


class MapView:
    """One map of an object (see the module docstring)."""

    def __init__(self, spec: MapSpec, decoder: ValueDecoder, owner: Any) -> None:
        self.spec = spec
        self._decoder = decoder
        self._owner = owner

    def __repr__(self) -> str:
        s = self.spec
        return (f"<MapView {s.name} {s.type_name} key_size={s.key_size} value_size={s.value_size} "
                f"max_entries={s.max_entries}>")

    # ---- definition (libbpf's bpf_map__*) ----------------------------------------------
    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def type(self) -> str:
        return self.spec.type_name

    @property
    def key_size(self) -> int:
        return self.spec.key_size

    @key_size.setter
    def key_size(self, n: int) -> None:
        self._set("key_size", n)

    @property
    def value_size(self) -> int:
        return self.spec.value_size

    @value_size.setter
    def value_size(self, n: int) -> None:
        self._set("value_size", n)

    @property
    def max_entries(self) -> int:
        return self.spec.max_entries

    @max_entries.setter
    def max_entries(self, n: int) -> None:
        self._set("max_entries", n)

    def _set(self, attr: str, n: int) -> None:
        if self._owner.loaded:
            raise UsageError(f"map {self.name}: {attr} can only be changed before load()")
        if not isinstance(n, int) or n <= 0:
            raise UsageError(f"map {self.name}: {attr} must be a positive integer, not {n!r}")
        if self.spec.internal:
            raise UsageError(f"map {self.name}: the size of a global data section follows its variables")
        if attr != "max_entries":
            # a different size no longer matches the BTF type: decode as plain bytes/integers
            setattr(self.spec, "key_type_id" if attr == "key_size" else "value_type_id", 0)
        setattr(self.spec, attr, n)

    # ---- live contents -----------------------------------------------------------------
    @property
    def _live(self) -> Any:
        m = self._owner._raw_map(self.name)
        if m is None:
            raise UsageError(f"map {self.name}: not loaded yet (call load() first)")
        return m

    @property
    def percpu(self) -> bool:
        return self.spec.type_name in PERCPU

    def _keys_raw(self) -> list[bytes]:
        m = self._live
        if self.spec.type_name in NO_ENTRIES:
            raise UsageError(f"map {self.name} ({self.type}) has no key/value entries; "
                             f"consume it with ring_buffer()/perf_buffer()")
        return list(m.all_keys() if hasattr(m, "all_keys") else m.keys())

    def _lookup_raw(self, key: bytes) -> Any:
        m = self._live
        return m.lookup_percpu(key) if self.percpu else m.lookup(key)

    def decode_key(self, key: bytes) -> Any:
        return _freeze(self._decoder.value(self.spec.key_type_id, key))

    def decode_value(self, value: Any) -> Any:
        if isinstance(value, list):
            return [self._decoder.value(self.spec.value_type_id, v[:self.spec.value_size]) for v in value]
        return self._decoder.value(self.spec.value_type_id, value)

    def items(self, raw: bool = False) -> list[tuple[Any, Any]]:
        """(key, value) pairs in the map's iteration order; per-CPU maps give a list per key."""
        out = []
        for k in self._keys_raw():
            v = self._lookup_raw(k)
            if v is None:       # deleted meanwhile
                continue
            out.append((k, v) if raw else (self.decode_key(k), self.decode_value(v)))
        return out

    def keys(self, raw: bool = False) -> list[Any]:
        return [k for k, _ in self.items(raw)]

    def values(self, raw: bool = False) -> list[Any]:
        return [v for _, v in self.items(raw)]

    def as_dict(self, raw: bool = False) -> dict[Any, Any]:
        return dict(self.items(raw))

    def __iter__(self) -> Iterator[Any]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self._keys_raw())

    def encode_key(self, key: Any) -> bytes:
        return _encode(key, self.spec.key_size, f"map {self.name}: key")

    def encode_value(self, value: Any) -> bytes:
        return _encode(value, self.spec.value_size, f"map {self.name}: value")

    def lookup(self, key: Any, raw: bool = False) -> Any:
        """The value at ``key`` (bytes, or an integer for integer keys), None when absent."""
        v = self._lookup_raw(self.encode_key(key))
        if v is None or raw:
            return v
        return self.decode_value(v)

    def __getitem__(self, key: Any) -> Any:
        v = self.lookup(key)
        if v is None:
            raise KeyError(key)
        return v

    def get(self, key: Any, default: Any = None) -> Any:
        v = self.lookup(key)
        return default if v is None else v

    def __setitem__(self, key: Any, value: Any) -> None:
        rc = self._live.update(self.encode_key(key), self.encode_value(value), 0)
        if rc:
            raise MapError(f"map {self.name}: update failed (error {rc})")

    def __delitem__(self, key: Any) -> None:
        rc = self._live.delete(self.encode_key(key))
        if rc:
            raise KeyError(key)

    def clear(self) -> None:
        """Delete every entry; arrays (whose entries cannot be deleted) are zeroed."""
        m = self._live
        zero = bytes(self.spec.value_size)
        for k in self._keys_raw():
            if self.spec.type_name in ("array", "percpu_array"):
                if self.percpu:
                    from ubpf_py.sysinfo import possible_cpus

                    stride = (self.spec.value_size + 7) // 8 * 8
                    m.update(k, bytes(stride * possible_cpus()), 0)
                else:
                    m.update(k, zero, 0)
            else:
                m.delete(k)

    def histograms(self, kind: str | None = None) -> list[Histogram]:
        """The map as histograms (one per key for ``struct hist``-valued maps), found by BTF type
        or forced with ``kind`` ("log2" / "linear"); empty when it is not one."""
        return map_histograms(self.dump(), self._decoder, kind) or []

    def print_hist(self, kind: str | None = None, file: TextIO | None = None) -> None:
        """Draw the map like bpftrace's ``hist()`` (bcc: ``print_log2_hist``)."""
        out = file or sys.stdout
        for h in self.histograms(kind):
            print(f"@{self.name}" + (f"[{h.key}]" if h.key is not None else "") + ":", file=out)
            for line in render_hist(h.slots, h.kind):
                print(line, file=out)

    def dump(self) -> MapDump:
        """A snapshot in the shape the output writers print."""
        s = self.spec
        entries: list[tuple[bytes, Any]] | None
        if s.type_name in NO_ENTRIES:
            entries = None
        elif s.type_name in ("queue", "stack", "bloom_filter"):
            m = self._live
            entries = [(b"", v) for v in m.values()] if hasattr(m, "values") else []
        elif s.max_entries > DUMP_ALL_LIMIT and hasattr(self._live, "nonzero_keys"):
            # a huge array: only its non-zero elements (millions of zeros help nobody and took minutes)
            m = self._live
            get = m.lookup_percpu if s.type_name in PERCPU else m.lookup
            entries = [(k, get(k)) for k in m.nonzero_keys()]
        else:
            entries = self.items(raw=True)
        return MapDump(s.name, s.type_name, s.key_size, s.value_size, s.max_entries, s.internal,
                       s.key_type_id, s.value_type_id, entries, s.section)


#: arrays with more entries than this are dumped without their all-zero elements
DUMP_ALL_LIMIT = 1 << 16


def _encode(x: Any, size: int, what: str) -> bytes:
    if isinstance(x, bytes | bytearray | memoryview):
        b = bytes(x)
        if len(b) != size:
            raise UsageError(f"{what} must be {size} bytes, got {len(b)}")
        return b
    if isinstance(x, int) and size in (1, 2, 4, 8):
        return (x & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
    raise UsageError(f"{what}: give bytes of size {size}" + (" or an int" if size in (1, 2, 4, 8) else ""))


class Globals:
    """The object's global variables by name: set before load (like a skeleton's
    ``rodata->x = ...``), read at any time (decoded through BTF; ``raw()`` gives bytes)."""

    def __init__(self, spec: ObjectSpec, decoder: ValueDecoder, owner: Any) -> None:
        self._spec = spec
        self._decoder = decoder
        self._owner = owner

    def __iter__(self) -> Iterator[str]:
        return iter(self._spec.globals)

    def __len__(self) -> int:
        return len(self._spec.globals)

    def __contains__(self, name: object) -> bool:
        return name in self._spec.globals

    def __setitem__(self, name: str, value: int | bytes | str | bool) -> None:
        from ubpf_py.obj.globals import set_global

        if self._owner.loaded:
            raise UsageError(f"global {name}: set it before load() (as a libbpf skeleton does)")
        set_global(self._spec, name, value)

    def raw(self, name: str) -> bytes:
        from ubpf_py.obj.globals import find_global, get_global

        var = find_global(self._spec, name)
        m = self._owner._raw_map(var.map_name)
        if m is None:
            return get_global(self._spec, name)
        value = m.lookup(bytes(4))
        if value is None:
            raise UbpfError(f"global {name}: its data map {var.map_name} cannot be read")
        return bytes(value[var.offset:var.offset + var.size])

    def __getitem__(self, name: str) -> Any:
        from ubpf_py.obj.globals import find_global

        var = find_global(self._spec, name)
        return self._decoder.value(var.type_id, self.raw(name))

    def get(self, name: str, default: Any = None) -> Any:
        return self[name] if name in self._spec.globals else default

    def dumps(self) -> list[GlobalDump]:
        """Every global in the shape the output writers print."""
        out = []
        maps = {m.name: m for m in self._spec.maps}
        for name, var in self._spec.globals.items():
            m = maps.get(var.map_name)
            try:
                data = self.raw(name)
            except UbpfError:
                continue
            out.append(GlobalDump(name, var.map_name, data, var.type_id,
                                  var.linkage == "static" and bool(m is not None and m.readonly)))
        return out
