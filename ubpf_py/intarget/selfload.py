"""Place a linked image in *this* process (the tracer) with W^X protections.

The tracer links the runtime into itself so that Python map code calls the same
C insert/delete/ring functions the target runs (one implementation), and tests
call helpers through ctypes.  Memory comes from an anonymous mapping chosen by
the kernel; the image is linked for that address, copied in, then each range gets
its protection (text read+exec, rodata/GOT read-only, data/bss read+write).
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterable, Mapping

from ubpf_py.abi.kernel import (
    MAP_ANONYMOUS,
    MAP_FIXED_NOREPLACE,
    MAP_PRIVATE,
    PROT_EXEC,
    PROT_READ,
    PROT_WRITE,
)
from ubpf_py.intarget.arena import _MAP_FAILED, _libc
from ubpf_py.intarget.linker import Image, LinkError, link

_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


class LoadedImage:
    """An image mapped here; ``fn(name, CFUNCTYPE)`` gives a callable for a symbol."""

    def __init__(self, image: Image) -> None:
        self.image = image
        self.base = image.base

    def addr(self, name: str) -> int:
        return self.image.addr(name)

    def fn(self, name: str, proto: type) -> ctypes._CFuncPtr:  # type: ignore[name-defined]
        return proto(self.addr(name))


def _map(size: int, at: int | None) -> int:
    flags = MAP_PRIVATE | MAP_ANONYMOUS | (MAP_FIXED_NOREPLACE if at else 0)
    addr = _libc.mmap(at or None, size, PROT_READ | PROT_WRITE, flags, -1, 0)
    if addr in (None, _MAP_FAILED) or (at and addr != at):
        raise LinkError(f"cannot map {size} bytes for an image"
                        + (f" at 0x{at:x}" if at else "") + f": {os.strerror(ctypes.get_errno())}")
    return addr


def load_here(objects: Iterable[tuple[str, bytes]], externs: Mapping[str, int] | None = None,
              at: int | None = None) -> LoadedImage:
    """Link ``objects`` for a fresh mapping of this process (at ``at`` if given) and map it.
    The mapping lives until the process ends (code may be called from any thread)."""
    objects = list(objects)
    probe = link(objects, 0x10000, externs if externs is None else {k: 0 for k in externs})
    addr = _map(probe.size, at)
    image = link(objects, addr, externs)
    ctypes.memmove(addr, bytes(image.data), image.size)
    for (lo, hi), prot in ((image.exec_range, PROT_READ | PROT_EXEC), (image.readonly_range, PROT_READ)):
        if hi > lo and _libc.mprotect(lo, hi - lo, prot) != 0:
            raise LinkError(f"mprotect of the image failed: {os.strerror(ctypes.get_errno())}")
    return LoadedImage(image)
