"""BPF_MAP_TYPE_STACK_TRACE: stacks stored by ``jhash2`` bucket, as kernel/bpf/stackmap.c.

A stack id is ``jhash2(ips) & (n_buckets - 1)`` with ``n_buckets`` the next
power of two of max_entries, so ids are the kernel's for the same stack.  A
different stack landing in an occupied bucket is -EEXIST unless the program
passes BPF_F_REUSE_STACKID (then it replaces the old one); BPF_F_FAST_STACK_CMP
trusts a matching hash without comparing frames.  At most max_entries stacks are
stored (the kernel's preallocated free list): one more is -ENOMEM.

BPF_F_STACK_BUILD_ID maps store ``struct bpf_stack_build_id`` entries with
status BPF_STACK_BUILD_ID_IP (the kernel's fallback when it cannot read a build
id), holding the raw address.
"""

from __future__ import annotations

import struct

import numpy as np

from ubpf_py.maps import consts as C
from ubpf_py.maps import descriptor as D
from ubpf_py.maps.base import Map, check_flags_common, map_create_error
from ubpf_py.maps.jhash import jhash2
from ubpf_py.maps.native_ops import runtime_for
from ubpf_py.obj.spec import MapSpec
from ubpf_py.vm.memory import Allocator

STACK_CREATE_FLAG_MASK = C.BPF_F_NUMA_NODE | C.ACCESS_MASK | C.BPF_F_STACK_BUILD_ID
BUILD_ID_ENTRY = 32           # sizeof(struct bpf_stack_build_id)
BPF_STACK_BUILD_ID_IP = 2
_U32 = struct.Struct("<I")


def build_id_entries(ips: list[int]) -> bytes:
    """``struct bpf_stack_build_id`` records with status IP for each address."""
    return b"".join(struct.pack("<i20sQ", BPF_STACK_BUILD_ID_IP, bytes(20), ip) for ip in ips)


class StackTraceMap(Map):
    """Stacks keyed by a u32 stack id; values are ``value_size / 8`` u64 frames."""

    def __init__(self, spec: MapSpec, ncpus: int | None = None, alloc: Allocator | None = None) -> None:
        super().__init__(spec, ncpus, alloc)
        check_flags_common(spec, STACK_CREATE_FLAG_MASK)
        vs = spec.value_size
        if spec.max_entries == 0 or spec.key_size != 4 or vs < 8 or vs % 8:
            raise map_create_error(spec, f"stack trace maps need key_size 4 and value_size a multiple of 8 "
                                   f"(got key {spec.key_size}, value {vs}, max_entries {spec.max_entries})")
        self.build_id = bool(spec.flags & C.BPF_F_STACK_BUILD_ID)
        self.elem_size = BUILD_ID_ENTRY if self.build_id else 8
        if vs % self.elem_size or vs // self.elem_size > C.perf_event_max_stack():
            raise map_create_error(spec, f"value_size {vs} holds more than kernel.perf_event_max_stack "
                                   f"({C.perf_event_max_stack()}) frames or is not a multiple of "
                                   f"{self.elem_size}")
        if spec.max_entries > 1 << 31:
            raise map_create_error(spec, "max_entries is larger than 2^31", C.E2BIG)
        self.max_depth = vs // self.elem_size
        self.n_buckets = 1 << max(spec.max_entries - 1, 0).bit_length()
        n = self.n_buckets
        self._data = self.alloc.alloc(n * vs).array.reshape(n, vs)
        self._hash = self.alloc.alloc(n * 4).array.view(np.uint32)
        self._nr = self.alloc.alloc(n * 4).array.view(np.uint32)
        self._present = self.alloc.alloc(n).array.view(np.bool_)
        self._count_py = 0
        # shared with a target: stack ids are stored by the C runtime (runtime/stackmap.c)
        self._c = runtime_for(self.alloc) if not self.build_id else None
        if self._c is not None:
            self._dw = self._handle.view.cast("Q")
            D.write_descriptor(self._handle.view, {
                D.D_VALUES: self._data.ctypes.data, D.D_VAL_STRIDE: vs, D.D_LIMIT: n - 1,
                D.D_TABLE: self._hash.ctypes.data, D.D_KEYS: self._nr.ctypes.data,
                D.W["used"]: self._present.ctypes.data, D.W["max_entries"]: self.max_entries,
                D.W["value_size"]: vs, D.D_KIND: D.KIND_STACK})

    @property
    def _count(self) -> int:
        return self._dw[D.W["count"]] if self._c is not None else self._count_py

    @_count.setter
    def _count(self, v: int) -> None:
        self._count_py = v

    # ---- program side -----------------------------------------------------------------------
    def get_stackid(self, trace: list[int], flags: int) -> int:
        """Store ``trace`` (frames innermost first, already cut to max_depth + skip) and return
        its id, or -EFAULT/-EEXIST/-ENOMEM as the kernel's __bpf_get_stackid."""
        skip = flags & C.BPF_F_SKIP_FIELD_MASK
        if self._c is not None:
            raw = struct.pack(f"<{len(trace)}Q", *(ip & 0xFFFFFFFFFFFFFFFF for ip in trace))
            return self._c.stack_store(self.handle_addr, raw, len(trace), flags)
        if len(trace) <= skip:
            return -C.EFAULT
        ips = [ip & 0xFFFFFFFFFFFFFFFF for ip in trace[skip:]]
        nr = len(ips)
        words: list[int] = []
        for ip in ips:
            words.append(ip & 0xFFFFFFFF)
            words.append(ip >> 32)
        h = jhash2(words, 0)
        sid = h & (self.n_buckets - 1)
        with self.lock:
            present = bool(self._present[sid])
            hash_matches = present and int(self._hash[sid]) == h
            if hash_matches and flags & C.BPF_F_FAST_STACK_CMP:
                return sid
            payload = build_id_entries(ips) if self.build_id else struct.pack(f"<{nr}Q", *ips)
            if hash_matches and int(self._nr[sid]) == nr and \
                    self._data[sid, :len(payload)].tobytes() == payload:
                return sid
            if present and not flags & C.BPF_F_REUSE_STACKID:
                return -C.EEXIST
            if not present and self._count >= self.max_entries:
                return -C.ENOMEM
            if present and self._count >= self.max_entries:
                # the kernel pops a new bucket before freeing the old one
                return -C.ENOMEM
            row = self._data[sid]
            row[:] = 0
            row[:len(payload)] = np.frombuffer(payload, dtype=np.uint8)
            self._hash[sid] = h
            self._nr[sid] = nr
            if not present:
                self._present[sid] = True
                self._count += 1
        return sid

    # ---- user space -------------------------------------------------------------------------
    def lookup(self, key: bytes) -> bytes | None:
        self._check_key(key)
        sid = _U32.unpack(key)[0]
        if sid >= self.n_buckets or not self._present[sid]:
            return None
        return self._data[sid].tobytes()

    def frames(self, stack_id: int) -> list[int] | None:
        """The stored addresses of a stack (no trailing zeroes), or None."""
        if not (0 <= stack_id < self.n_buckets) or not self._present[stack_id]:
            return None
        nr = int(self._nr[stack_id])
        if self.build_id:
            raw = self._data[stack_id, :nr * BUILD_ID_ENTRY].tobytes()
            return [struct.unpack_from("<Q", raw, i * BUILD_ID_ENTRY + 24)[0] for i in range(nr)]
        return [int(x) for x in self._data[stack_id, :nr * 8].view(np.uint64)]

    def update(self, key: bytes, value: bytes, flags: int = C.BPF_ANY, cpu: int | None = None) -> int:
        return -C.EINVAL

    def delete(self, key: bytes, cpu: int | None = None) -> int:
        self._check_key(key)
        sid = _U32.unpack(key)[0]
        if sid >= self.n_buckets:
            return -C.E2BIG
        if self._c is not None:
            return self._c.stack_delete(self.handle_addr, sid)
        with self.lock:
            if not self._present[sid]:
                return -C.ENOENT
            self._present[sid] = False
            self._count -= 1
        return 0

    def get_next_key(self, key: bytes | None) -> bytes | None:
        if key is None:
            sid = 0
        else:
            sid = _U32.unpack(key)[0]
            sid = 0 if sid >= self.n_buckets or not self._present[sid] else sid + 1
        if sid >= self.n_buckets:
            return None
        seg = self._present[sid:]
        i = int(seg.argmax())
        if not seg[i]:
            return None
        return _U32.pack(sid + i)

    def __len__(self) -> int:
        return self._count
