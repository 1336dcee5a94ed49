"""What every helper family shares once bound to one ``ExecEnv``.

* map resolution: a map argument is a handle address; ``env.maps_by_addr``
  first, then the global registry (inner maps of map-in-map, which the loader
  did not create), whose memory is then added to ``env.memory`` so the program
  can use the values it looks up;
* the two kinds of memory the kernel distinguishes: *kernel* memory is what the
  program itself owns here (stack, context, map values: ``env.memory``), *user*
  memory is the traced process (``env.hit.user_memory``);
* a small scratch region (keys handed to for_each_map_elem callbacks).
"""

from __future__ import annotations

from typing import Any

from ubpf_py.errors import VMFault
from ubpf_py.maps.base import Map, map_by_handle
from ubpf_py.maps.consts import EFAULT, ERANGE, TASK_SIZE
from ubpf_py.vm.env import ExecEnv
from ubpf_py.vm.memory import HostBuffer, Region


class HelperContext:
    """Per-env state shared by the helper closures."""

    def __init__(self, env: ExecEnv) -> None:
        self.env = env
        self.scratch = HostBuffer(64)
        env.memory.add(Region.of(self.scratch, "helper scratch", writable=False))
        self._registered: set[int] = set()
        #: the current task's kernel objects (``helpers.kernel_task``), made on first use
        self.kernel_objects: Any = None
        for m in list(env.maps_by_addr.values()):
            self._watch(m)

    def _watch(self, m: Map) -> None:
        """Follow storage a map adds later (BPF_F_NO_PREALLOC hash maps, LPM tries)."""
        if id(m) in self._registered:
            return
        self._registered.add(id(m))
        add = getattr(m, "add_region_listener", None)
        if add is not None:
            add(self._add_region)

    def _add_region(self, region: Region) -> None:
        try:
            self.env.memory.add(region)
        except ValueError:
            pass  # already registered by the loader

    def adopt(self, m: Map) -> None:
        """Make a map found outside env.maps_by_addr (an inner map) usable by programs."""
        if m.handle_addr in self.env.maps_by_addr:
            return
        self.env.maps_by_addr[m.handle_addr] = m
        for region in m.regions():
            self._add_region(region)
        self._watch(m)

    def map(self, addr: int) -> Map:
        m = self.env.maps_by_addr.get(addr)
        if m is not None:
            return m
        m = map_by_handle(addr)
        if m is None:
            raise VMFault(f"helper called with 0x{addr:x}, which is not a map")
        self.adopt(m)
        return m

    # ---- memory -----------------------------------------------------------------------
    def kernel_read(self, addr: int, size: int) -> bytes | None:
        """copy_from_kernel_nofault: only the program's own memory is "kernel" memory here,
        and of the task objects only the fields filled from /proc (others fault)."""
        ko = self.kernel_objects
        if ko is not None and (obj := ko.owner(addr)) is not None and not obj.readable(addr, size):
            return None
        r = self.env.memory.find(addr, size)
        if r is None:
            return None
        off = addr - r.start
        return bytes(r.view[off:off + size])

    def kernel_read_err(self, addr: int) -> int:
        """The kernel's error for an unreadable kernel address: user-space addresses are
        refused with -ERANGE before any access, others fault."""
        if self.kernel_objects is not None and self.kernel_objects.owner(addr) is not None:
            return -EFAULT
        return -ERANGE if addr < TASK_SIZE else -EFAULT

    def kernel_str(self, addr: int, size: int) -> bytes | None:
        """strncpy_from_kernel_nofault: the bytes before the NUL (at most size - 1),
        or None when the string runs out of the program's memory first."""
        ko = self.kernel_objects
        if ko is not None and (obj := ko.owner(addr)) is not None and not obj.readable(addr, 1):
            return None
        r = self.env.memory.find(addr, 1)
        if r is None:
            return None
        off = addr - r.start
        n = min(size - 1, r.end - addr)
        chunk = bytes(r.view[off:off + n])
        nul = chunk.find(b"\0")
        if nul >= 0:
            return chunk[:nul]
        if n < size - 1:
            return None
        return chunk

    def user_read(self, addr: int, size: int) -> bytes | None:
        return self.env.hit.user_memory.read(addr, size)

    def user_str(self, addr: int, size: int) -> bytes | None:
        data = self.env.hit.user_memory.read_str(addr, size)
        return None if data is None else data[:max(size - 1, 0)]

    def any_str(self, addr: int, size: int) -> bytes | None:
        """%s / bpf_probe_read_str: the program's own memory first, else the target's."""
        if self.env.memory.find(addr, 1) is not None:
            return self.kernel_str(addr, size)
        return self.user_str(addr, size)

    def c_string(self, addr: int, limit: int = 1 << 16) -> bytes:
        """A NUL-terminated constant string from program memory (format strings);
        VMFault when it is not terminated inside its region."""
        r = self.env.memory.check(addr, 1, False)
        off = addr - r.start
        chunk = bytes(r.view[off:min(off + limit, r.end - r.start)])
        nul = chunk.find(b"\0")
        if nul < 0:
            raise VMFault(f"string at 0x{addr:x} is not NUL-terminated inside {r.name}")
        return chunk[:nul]

    def fast_reader(self):
        """``read(addr, size) -> bytes``, checked like ``env.memory.read`` but remembering the
        last region (keys and values are usually on the program stack), revalidated whenever
        ``env.memory`` changes.  This is the hot path of every map helper."""
        mem = self.env.memory
        cache: list = [0, 0, None, -1]

        def read(addr: int, size: int) -> bytes:
            start, end, view, version = cache
            if start <= addr and addr + size <= end and version == mem.version:
                off = addr - start
                return view[off:off + size].tobytes()
            r = mem.check(addr, size, False)
            cache[0], cache[1], cache[2], cache[3] = r.start, r.end, r.view, mem.version
            off = addr - r.start
            return r.view[off:off + size].tobytes()

        return read
