"""BPF_MAP_TYPE_RINGBUF: the kernel's multi-producer, single-consumer ring buffer.

Layout and protocol follow kernel/bpf/ringbuf.c so that records, sizes and the
"full" decisions match the kernel:

* data area of ``max_entries`` bytes (a power of two, a multiple of the page
  size); positions are free-running 64-bit counters masked into it;
* each record starts with an 8-byte header ``u32 len, u32 pg_off``; ``len``
  carries BUSY (bit 31) while reserved and DISCARD (bit 30) when discarded;
  records occupy ``round_up(len + 8, 8)`` bytes;
* reserve fails (returns 0, counted in ``dropped``) when the producer would get
  more than ``size - 1`` bytes ahead of the consumer or of the oldest record not
  yet committed.

The positions and the dropped counter are u64 words of the map's native descriptor
(``maps.descriptor``) so JIT code can run bpf_ringbuf_output without Python; the
Python producer paths mark themselves busy there (native code then defers to them).

Storage: the data area is page aligned and the page before it holds the handle
address, so the C runtime finds a record's ring from the record alone (through
the header's ``pg_off``, as the kernel does).  When the storage is shared with a
traced process (``maps.native_ops``) every producer -- the target's threads and
this object's ``reserve``/``commit``/``output`` -- is the C runtime's
(``runtime/ringbuf.c``), serialised by the descriptor's lock word; ``records()``
is the single consumer and takes no lock: a record is skipped-until-ready while
its header has the BUSY bit, and producers write the header before moving the
producer position and the data before clearing BUSY (release order).

The kernel maps the data pages twice so a record that wraps is contiguous.  We
allocate ``2 * size`` bytes instead: a record is reserved contiguously past the
end when it wraps, and at commit the part beyond the end is copied to the start,
where the consumer (which reads modulo ``size``) expects it.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator

from ubpf_py.maps import consts as C
from ubpf_py.maps import descriptor as D
from ubpf_py.maps.base import Map, map_create_error
from ubpf_py.maps.native_ops import runtime_for
from ubpf_py.obj.spec import MapSpec
from ubpf_py.vm.memory import Allocator, Region

_HDR = struct.Struct("<II")
_U32 = struct.Struct("<I")
RINGBUF_MAX_RECORD_SZ = 0xFFFFFFFF // 4


class RingBufMap(Map):
    """A ring buffer; programs reserve/commit records, user space ``consume()``s them."""

    def __init__(self, spec: MapSpec, ncpus: int | None = None, alloc: Allocator | None = None) -> None:
        super().__init__(spec, ncpus, alloc)
        if spec.flags & ~C.BPF_F_NUMA_NODE:
            raise map_create_error(spec, f"map_flags {spec.flags:#x} not allowed for a ring buffer")
        size = spec.max_entries
        if spec.key_size or spec.value_size or size <= 0 or size & (size - 1) or size % C.PAGE_SIZE:
            raise map_create_error(spec, f"ring buffers need key_size 0, value_size 0 and max_entries a "
                                   f"power of two multiple of the page size {C.PAGE_SIZE} "
                                   f"(got key {spec.key_size} value {spec.value_size} max_entries {size})")
        self.size = size
        self.mask = size - 1
        self._raw = self.alloc.alloc(C.PAGE_SIZE + 2 * size, align=C.PAGE_SIZE)
        self._raw.view.cast("Q")[0] = self.handle_addr   # the page before the data: see above
        self._view = self._raw.view[C.PAGE_SIZE:]
        self.data_addr = self._raw.addr + C.PAGE_SIZE
        self._w = self._handle.view.cast("Q")
        self._wakeup: Callable[[], None] | None = None
        self._c = runtime_for(self.alloc)
        D.write_descriptor(self._handle.view, {
            D.D_LIMIT: self.mask, D.D_VALUES: self.data_addr,
            D.D_RB_FLAGS: D.RB_BUSY | D.RB_SHARED if self._c is not None else 0,
            D.D_KIND: D.KIND_RINGBUF})

    # positions and counters: words of the native descriptor (native output moves them too)
    @property
    def producer_pos(self) -> int:
        return self._w[D.D_RB_PROD]

    @producer_pos.setter
    def producer_pos(self, value: int) -> None:
        self._w[D.D_RB_PROD] = value

    @property
    def consumer_pos(self) -> int:
        return self._w[D.D_RB_CONS]

    @consumer_pos.setter
    def consumer_pos(self, value: int) -> None:
        self._w[D.D_RB_CONS] = value

    @property
    def pending_pos(self) -> int:
        return self._w[D.D_RB_PEND]

    @pending_pos.setter
    def pending_pos(self, value: int) -> None:
        self._w[D.D_RB_PEND] = value

    @property
    def dropped(self) -> int:
        """Records whose reservation failed (bpf_ringbuf_reserve returned NULL / output -EAGAIN)."""
        return self._w[D.D_RB_DROPPED]

    @dropped.setter
    def dropped(self, value: int) -> None:
        self._w[D.D_RB_DROPPED] = value

    @property
    def wakeup(self) -> Callable[[], None] | None:
        """Called when the kernel would wake the consumer (epoll); None = nobody waits.
        While set, native output defers to Python whenever a wakeup is due."""
        return self._wakeup

    @wakeup.setter
    def wakeup(self, fn: Callable[[], None] | None) -> None:
        self._wakeup = fn
        flags = self._w[D.D_RB_FLAGS]
        self._w[D.D_RB_FLAGS] = flags | D.RB_WAKEUP if fn is not None else flags & ~D.RB_WAKEUP

    def regions(self) -> list[Region]:
        n = 2 * self.size
        return [Region(self.data_addr, self.data_addr + n, True, f"ringbuf {self.name}", self._view, self)]

    def lookup(self, key: bytes) -> bytes | None:
        return None

    def update(self, key: bytes, value: bytes, flags: int = C.BPF_ANY, cpu: int | None = None) -> int:
        return -C.ENOTSUPP

    def delete(self, key: bytes, cpu: int | None = None) -> int:
        return -C.ENOTSUPP

    def get_next_key(self, key: bytes | None) -> bytes | None:
        return None

    def keys(self) -> list[bytes]:
        return []

    # ---- producer side (helpers) ----------------------------------------------------------
    def reserve(self, size: int) -> int:
        """Address of ``size`` writable bytes (after the 8-byte header), or 0 when full/too big."""
        if self._c is not None:
            return self._c.rb_reserve(self.handle_addr, size)
        if size > RINGBUF_MAX_RECORD_SZ:
            self.dropped += 1
            return 0
        length = (size + C.BPF_RINGBUF_HDR_SZ + 7) & ~7
        if length > self.size:
            self.dropped += 1
            return 0
        view = self._view
        with self.lock:
            self._w[D.D_RB_FLAGS] |= D.RB_BUSY
            try:
                prod = self.producer_pos
                pend = self._advance_pending(prod)
                new_prod = prod + length
                if new_prod - self.consumer_pos > self.mask or new_prod - pend > self.mask:
                    self.dropped += 1
                    return 0
                off = prod & self.mask
                # pg_off: the header's distance in pages from the ring's metadata (kernel ABI field)
                _HDR.pack_into(view, off, size | C.BPF_RINGBUF_BUSY_BIT, (off >> 12) + 2)
                self.producer_pos = new_prod
            finally:
                self._w[D.D_RB_FLAGS] &= ~D.RB_BUSY
        return self.data_addr + off + C.BPF_RINGBUF_HDR_SZ

    def commit(self, sample_addr: int, discard: bool = False, flags: int = 0) -> None:
        """bpf_ringbuf_submit/discard of a record returned by ``reserve``."""
        hoff = sample_addr - C.BPF_RINGBUF_HDR_SZ - self.data_addr
        if not (0 <= hoff < self.size) or hoff & 7:
            raise ValueError(f"ringbuf {self.name}: 0x{sample_addr:x} is not a reserved record")
        view = self._view
        hlen = _U32.unpack_from(view, hoff)[0]
        if not hlen & C.BPF_RINGBUF_BUSY_BIT:
            raise ValueError(f"ringbuf {self.name}: record at 0x{sample_addr:x} was already committed")
        if self._c is not None:
            self._c.rb_commit(sample_addr, 1 if discard else 0)
        else:
            size = hlen & ~(C.BPF_RINGBUF_BUSY_BIT | C.BPF_RINGBUF_DISCARD_BIT)
            end = hoff + C.BPF_RINGBUF_HDR_SZ + size
            if end > self.size:  # wrapped: move the tail to the start of the ring
                view[0:end - self.size] = view[self.size:end]
            new_len = size | (C.BPF_RINGBUF_DISCARD_BIT if discard else 0)
            _U32.pack_into(view, hoff, new_len)
        if self.wakeup is not None and (flags & C.BPF_RB_FORCE_WAKEUP or (
                (self.consumer_pos & self.mask) == hoff and not flags & C.BPF_RB_NO_WAKEUP)):
            self.wakeup()

    def output(self, data: bytes, flags: int = 0) -> int:
        """bpf_ringbuf_output: 0, -EINVAL for bad flags, -EAGAIN when there is no room.
        Reserve, copy and commit in one step (nobody can see the record half-written,
        so it never needs the BUSY bit)."""
        if flags & ~(C.BPF_RB_NO_WAKEUP | C.BPF_RB_FORCE_WAKEUP):
            return -C.EINVAL
        if self._c is not None:
            prod = self.producer_pos
            rc = self._c.rb_output(self.handle_addr, bytes(data), len(data))
            if rc == 0 and self.wakeup is not None and (flags & C.BPF_RB_FORCE_WAKEUP or (
                    (self.consumer_pos & self.mask) == (prod & self.mask) and not flags & C.BPF_RB_NO_WAKEUP)):
                self.wakeup()
            return rc
        size = len(data)
        length = (size + 15) & ~7
        view = self._view
        with self.lock:
            self._w[D.D_RB_FLAGS] |= D.RB_BUSY
            try:
                prod = self.producer_pos
                new_prod = prod + length
                if (new_prod - self.consumer_pos > self.mask or length > self.size
                        or (self.pending_pos < prod and new_prod - self._advance_pending(prod) > self.mask)):
                    self.dropped += 1
                    return -C.EAGAIN
                off = prod & self.mask
                start = off + C.BPF_RINGBUF_HDR_SZ
                end = start + size
                view[start:end] = data
                if end > self.size:
                    view[0:end - self.size] = view[self.size:end]
                _HDR.pack_into(view, off, size, (off >> 12) + 2)
                self.producer_pos = new_prod
                if self.pending_pos == prod:
                    self.pending_pos = new_prod
            finally:
                self._w[D.D_RB_FLAGS] &= ~D.RB_BUSY
        if self.wakeup is not None and (flags & C.BPF_RB_FORCE_WAKEUP or (
                (self.consumer_pos & self.mask) == off and not flags & C.BPF_RB_NO_WAKEUP)):
            self.wakeup()
        return 0

    def _advance_pending(self, prod: int) -> int:
        """Move the oldest-uncommitted position over committed records (lock held)."""
        view = self._view
        pend = self.pending_pos
        while pend < prod:
            hlen = _U32.unpack_from(view, pend & self.mask)[0]
            if hlen & C.BPF_RINGBUF_BUSY_BIT:
                break
            pend += ((hlen & ~(C.BPF_RINGBUF_BUSY_BIT | C.BPF_RINGBUF_DISCARD_BIT))
                     + C.BPF_RINGBUF_HDR_SZ + 7) & ~7
        self.pending_pos = pend
        return pend

    def query(self, flags: int) -> int:
        """bpf_ringbuf_query."""
        if flags == C.BPF_RB_AVAIL_DATA:
            return self.producer_pos - self.consumer_pos
        if flags == C.BPF_RB_RING_SIZE:
            return self.size
        if flags == C.BPF_RB_CONS_POS:
            return self.consumer_pos
        if flags == C.BPF_RB_PROD_POS:
            return self.producer_pos
        return 0

    # ---- consumer side (user space) ---------------------------------------------------------
    def records(self) -> Iterator[bytes]:
        """Committed records in order, advancing the consumer position as libbpf's
        ring_buffer__consume does; stops at the first record still being written.

        The positions are read once per batch and the consumer position is stored once when
        the batch ends (or the caller stops early): producers in the target read it on every
        reserve, so a store per record would pull their cache line away once per record."""
        view = self._view
        w = self._w
        mask, size = self.mask, self.size
        busy, discard, hdr = C.BPF_RINGBUF_BUSY_BIT, C.BPF_RINGBUF_DISCARD_BIT, C.BPF_RINGBUF_HDR_SZ
        cons = w[D.D_RB_CONS]
        try:
            while True:
                prod = w[D.D_RB_PROD]
                if cons >= prod:
                    return
                while cons < prod:
                    off = cons & mask
                    hlen = _U32.unpack_from(view, off)[0]
                    if hlen & busy:
                        return
                    n = hlen & ~(busy | discard)
                    rec = None
                    if not hlen & discard:
                        start = off + hdr
                        end = start + n
                        if end <= size:
                            rec = bytes(view[start:end])
                        else:
                            rec = bytes(view[start:size]) + bytes(view[0:end - size])
                    cons += (n + hdr + 7) & ~7
                    if rec is not None:
                        yield rec
        finally:
            w[D.D_RB_CONS] = cons

    def consume(self) -> list[bytes]:
        """Every committed record not consumed yet."""
        return list(self.records())

    def avail(self) -> int:
        return self.producer_pos - self.consumer_pos
