"""BPF_MAP_TYPE_PERF_EVENT_ARRAY: per-CPU perf buffers for bpf_perf_event_output.

Each CPU slot stands for the BPF-output perf event libbpf's ``perf_buffer__new``
opens on that CPU.  A sample is stored the way the kernel writes it into the
perf mmap ring -- ``struct perf_event_header`` (type PERF_RECORD_SAMPLE), a u32
raw size, then the raw bytes padded with zeroes so that ``4 + size`` is a
multiple of 8 -- in a byte ring of ``pages * PAGE_SIZE`` bytes per CPU.  When a
sample does not fit, it is dropped and counted as lost (the kernel's
PERF_RECORD_LOST), and the helper returns -ENOSPC like the kernel.

When the storage is shared with a traced process (``maps.native_ops``) every CPU's
ring exists from the start, its positions and lost counter are the words of a
``PERF_RING`` header (``abi.maps``) and producers are the C runtime's
(``runtime/ringbuf.c``, one lock word per ring); ``consume`` is the single consumer.
"""

from __future__ import annotations

import struct

import numpy as np

from ubpf_py.abi.maps import PERF_RING
from ubpf_py.maps import consts as C
from ubpf_py.maps import descriptor as D
from ubpf_py.maps.array import check_array_spec
from ubpf_py.maps.base import Map
from ubpf_py.maps.native_ops import runtime_for
from ubpf_py.obj.spec import MapSpec
from ubpf_py.vm.memory import Allocator

PERF_RECORD_SAMPLE = 9
_HDR = struct.Struct("<IHHI")  # perf_event_header + u32 raw size
DEFAULT_PAGES = 64


class _CpuRing:
    """One CPU's perf ring: bytes between ``tail`` (consumer) and ``head`` (producer)."""

    __slots__ = ("buf", "head", "lost", "size", "tail")

    def __init__(self, size: int, alloc: Allocator) -> None:
        self.buf = alloc.alloc(size).array
        self.size = size
        self.head = 0
        self.tail = 0
        self.lost = 0

    def put(self, rec: bytes) -> bool:
        n = len(rec)
        if self.size - (self.head - self.tail) < n:
            self.lost += 1
            return False
        off = self.head % self.size
        first = min(n, self.size - off)
        self.buf[off:off + first] = np.frombuffer(rec, dtype=np.uint8, count=first)
        if first < n:
            self.buf[0:n - first] = np.frombuffer(rec, dtype=np.uint8, offset=first)
        self.head += n
        return True

    def take(self, n: int) -> bytes:
        off = self.tail % self.size
        first = min(n, self.size - off)
        out = self.buf[off:off + first].tobytes()
        if first < n:
            out += self.buf[0:n - first].tobytes()
        self.tail += n
        return out


class _SharedCpuRing(_CpuRing):
    """A ring whose head/tail/lost are words of a PERF_RING header in shared memory."""

    __slots__ = ("_w",)

    def __init__(self, size: int, alloc: Allocator, hdr_view: memoryview) -> None:
        self._w = hdr_view.cast("Q")
        super().__init__(size, alloc)
        self._w[PERF_RING.word("data")] = self.buf.ctypes.data
        self._w[PERF_RING.word("size")] = size

    head = property(lambda self: self._w[_HEAD], lambda self, v: self._w.__setitem__(_HEAD, v))
    tail = property(lambda self: self._w[_TAIL], lambda self, v: self._w.__setitem__(_TAIL, v))
    lost = property(lambda self: self._w[_LOST], lambda self, v: self._w.__setitem__(_LOST, v))


_HEAD, _TAIL, _LOST = PERF_RING.word("head"), PERF_RING.word("tail"), PERF_RING.word("lost")


class PerfEventArrayMap(Map):
    """Per-CPU sample buffers; ``output(cpu, data)`` produces, ``consume()`` drains."""

    def __init__(self, spec: MapSpec, ncpus: int | None = None, alloc: Allocator | None = None) -> None:
        super().__init__(spec, ncpus, alloc)
        check_array_spec(spec, False, value_size_fixed=4)
        self.pages = DEFAULT_PAGES
        self._rings: dict[int, _CpuRing] = {}
        self._samples = 0
        self._c = runtime_for(self.alloc)
        if self._c is not None:
            self._make_shared_rings()

    def _make_shared_rings(self) -> None:
        hdrs = self.alloc.alloc(PERF_RING.size * self.ncpus, 64)
        self._hdrs = hdrs
        size = self.pages * C.PAGE_SIZE
        for cpu in range(self.ncpus):
            o = cpu * PERF_RING.size
            self._rings[cpu] = _SharedCpuRing(size, self.alloc, hdrs.view[o:o + PERF_RING.size])
        D.write_descriptor(self._handle.view, {
            D.W["max_entries"]: self.max_entries, D.W["ncpus"]: self.ncpus,
            D.W["perf_rings"]: hdrs.addr, D.D_KIND: D.KIND_PERF})

    @property
    def samples(self) -> int:
        """A counter that moves whenever a sample is produced (drains compare it with the
        last value seen): samples output here, or, when producers are the C runtime in a
        target too, the bytes ever written to the rings."""
        if self._c is not None:
            return sum(r.head for r in self._rings.values())
        return self._samples

    def set_buffer_pages(self, pages: int) -> None:
        """Per-CPU buffer size in pages (libbpf's perf_buffer__new page_cnt; a power of two)."""
        if pages <= 0 or pages & (pages - 1):
            raise ValueError(f"perf buffer page count must be a power of two, got {pages}")
        if pages != self.pages and self._c is not None:
            if any(r.head for r in self._rings.values()):
                raise ValueError(f"perf buffer {self.name}: set the page count before any output")
            self.pages = pages
            self._make_shared_rings()   # new rings, published with the descriptor (kind last)
            return
        self.pages = pages

    @property
    def lost(self) -> int:
        """Samples dropped because a CPU's buffer was full (sum over CPUs)."""
        return sum(r.lost for r in self._rings.values())

    # ---- producer -------------------------------------------------------------------------
    def output(self, cpu: int, data: bytes, flags: int = C.BPF_F_CURRENT_CPU) -> int:
        """bpf_perf_event_output on ``cpu``: 0, -EINVAL (flags), -E2BIG (index beyond
        max_entries), -ENOENT (no buffer on that index), -EOPNOTSUPP (another CPU's buffer),
        -ENOSPC (buffer full: the sample is counted as lost)."""
        if flags & ~C.BPF_F_INDEX_MASK:
            return -C.EINVAL
        index = flags & C.BPF_F_INDEX_MASK
        if index == C.BPF_F_CURRENT_CPU:
            index = cpu
        if index >= self.max_entries:
            return -C.E2BIG
        if index >= self.ncpus:
            return -C.ENOENT
        if index != cpu:
            return -C.EOPNOTSUPP
        if self._c is not None:
            return self._c.perf_output(self.handle_addr, cpu, bytes(data), len(data), flags)
        raw = len(data)
        padded = ((raw + 4 + 7) & ~7) - 4
        rec = _HDR.pack(PERF_RECORD_SAMPLE, 0, 8 + 4 + padded, padded) + bytes(data) + bytes(padded - raw)
        with self.lock:
            ring = self._rings.get(cpu)
            if ring is None:
                ring = self._rings[cpu] = _CpuRing(self.pages * C.PAGE_SIZE, self.alloc)
            if not ring.put(rec):
                return -C.ENOSPC
            self._samples += 1
        return 0

    # ---- consumer -------------------------------------------------------------------------
    def consume(self) -> list[tuple[int, bytes]]:
        """Every pending sample as ``(cpu, raw data)``, CPU by CPU (data includes the
        kernel's zero padding, as libbpf's sample callback sees it)."""
        out: list[tuple[int, bytes]] = []
        with self.lock:
            for cpu in sorted(self._rings):
                ring = self._rings[cpu]
                while ring.head > ring.tail:
                    hdr = ring.take(_HDR.size)
                    _t, _m, size, raw = _HDR.unpack(hdr)
                    out.append((cpu, ring.take(raw)))
                    rest = size - _HDR.size - raw
                    if rest:
                        ring.take(rest)
        return out

    # ---- map API (user space sees fds, which we do not have) -------------------------------
    def lookup(self, key: bytes) -> bytes | None:
        return None

    def update(self, key: bytes, value: bytes, flags: int = C.BPF_ANY, cpu: int | None = None) -> int:
        return -C.EOPNOTSUPP

    def delete(self, key: bytes, cpu: int | None = None) -> int:
        return -C.EOPNOTSUPP

    def get_next_key(self, key: bytes | None) -> bytes | None:
        from ubpf_py.maps.array import array_next_key
        return array_next_key(key, self.max_entries)
