"""Bytes -> readable values, through BTF when the object has it.

Without a BTF type (id 0, or no BTF), integers of 1/2/4/8 bytes print as
unsigned decimals and anything else as hex, which is what bpftool does for
objects without BTF.
"""

from __future__ import annotations

from typing import Any

from ubpf_py.errors import UbpfError

_DECODE_ERRORS = (UbpfError, ValueError, KeyError, IndexError, TypeError)


class ValueDecoder:
    def __init__(self, btf: Any) -> None:
        self.btf = btf

    def _fmt(self):
        if self.btf is None:
            return None
        try:
            from ubpf_py.obj import btf_format
        except ImportError:
            return None
        return btf_format

    def value(self, type_id: int, data: bytes) -> Any:
        """A JSON-able Python value."""
        fmt = self._fmt()
        if fmt is not None and type_id:
            try:
                return fmt.to_python(self.btf, type_id, data)
            except _DECODE_ERRORS:  # a decoding gap must not lose the raw data
                pass
        if len(data) in (1, 2, 4, 8):
            return int.from_bytes(data, "little")
        return data.hex()

    def text(self, type_id: int, data: bytes, size: int) -> str:
        fmt = self._fmt()
        if fmt is not None and type_id:
            try:
                return fmt.format_value(self.btf, type_id, data)
            except _DECODE_ERRORS:
                pass
        if len(data) in (1, 2, 4, 8):
            return str(int.from_bytes(data, "little"))
        return data.hex()

    def unique_struct_of_size(self, size: int) -> int:
        """The BTF id of the only named struct with this byte size, else 0 (for event decoding)."""
        if self.btf is None or size <= 0:
            return 0
        cache = self.__dict__.setdefault("_by_size", {})
        if size not in cache:
            from ubpf_py.obj.btf import KIND_STRUCT

            found = [t for t in range(1, self.btf.last_id + 1)
                     if self.btf.kind_of(t) == KIND_STRUCT and self.btf.name_of(t)
                     and self.btf.type(t).size == size]
            cache[size] = found[0] if len(found) == 1 else 0
        return cache[size]

    def sum_percpu(self, type_id: int, values: list[bytes], size: int) -> str | None:
        """Sum of per-CPU integer values (what bpftool/bpftrace show for counters)."""
        if size not in (1, 2, 4, 8):
            return None
        return str(sum(int.from_bytes(v[:size], "little") for v in values))
