"""Decode the in-target runtime's printk records (runtime/printk.c) into trace lines.

A program running in the target does not format: ``bpf_trace_printk`` /
``bpf_trace_vprintk`` append a ``PRINTK_RECORD`` (``abi.runtime``) to the printk
ring -- a RINGBUF map in the arena whose handle is ``RUNTIME_HEADER.printk_ring``
-- with the format bytes, the raw arguments, the task facts and copies of the memory
that string and IP-address arguments pointed at during the call.  The tracer drains
the ring and formats each record with ``helpers.printk_format``, the formatter the
ptrace path uses, so both paths print the same text.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from ubpf_py.abi.runtime import (
    PK_BLOB_FAULT,
    PK_BLOB_MEM,
    PK_BLOB_PROG,
    PK_BLOB_STR,
    PRINTK_BLOB,
    PRINTK_MAX_ARGS,
    PRINTK_RECORD,
)
from ubpf_py.helpers import printk_format as pf
from ubpf_py.vm.env import HitContext

_Q = struct.Struct("<Q")
_BLOB = struct.Struct("<QII")
_ARGS = struct.Struct(f"<{PRINTK_MAX_ARGS}Q")
BPF_FUNC_TRACE_PRINTK = 6


@dataclass(frozen=True, slots=True)
class PrintkEvent:
    """One printed line and who printed it."""

    tgid: int
    tid: int
    uid: int
    gid: int
    cpu: int
    comm: bytes
    ktime_ns: int
    text: str

    def hit(self) -> HitContext:
        """The facts as the ptrace path's ``env.printk(hit, text)`` callback receives them."""
        return HitContext(tgid=self.tgid, tid=self.tid, uid=self.uid, gid=self.gid, comm=self.comm,
                          cpu=self.cpu)


def _word(rec: bytes, name: str) -> int:
    return _Q.unpack_from(rec, PRINTK_RECORD.off(name))[0]


def decode(rec: bytes) -> PrintkEvent | None:
    """The line one record prints, or None when the kernel would print nothing (a format
    it refuses, or a record too short to be one)."""
    if len(rec) < PRINTK_RECORD.size:
        return None
    helper, nargs, fmt_len = _word(rec, "helper"), _word(rec, "nargs"), _word(rec, "fmt_len")
    args = _ARGS.unpack_from(rec, PRINTK_RECORD.off("args"))[:min(nargs, PRINTK_MAX_ARGS)]
    off = PRINTK_RECORD.size
    fmt = rec[off:off + fmt_len]
    off += (fmt_len + 7) & ~7
    blobs: dict[tuple[int, int], bytes | None] = {}
    prog: dict[int, bool] = {}
    for _ in range(_word(rec, "blobs")):
        if off + PRINTK_BLOB.size > len(rec):
            return None
        addr, kind, n = _BLOB.unpack_from(rec, off)
        off += PRINTK_BLOB.size
        data = None if kind & PK_BLOB_FAULT else rec[off:off + n]
        blobs.setdefault((kind & ~(PK_BLOB_FAULT | PK_BLOB_PROG), addr), data)
        prog.setdefault(addr, bool(kind & PK_BLOB_PROG))
        off += (n + 7) & ~7

    def read_str(addr: int, kind: str, bufsz: int) -> bytes | None:
        # %pks reads only the program's memory, %pus only the target's, %s either
        if (kind == "k" and not prog.get(addr)) or (kind == "u" and prog.get(addr)):
            return None
        data = blobs.get((PK_BLOB_STR, addr))
        return None if data is None else data[:max(bufsz - 1, 0)]

    def read_kernel(addr: int, size: int) -> bytes | None:
        # %pI4/%pI6 read kernel memory: the program's own
        data = blobs.get((PK_BLOB_MEM, addr)) if prog.get(addr) else None
        return data if data is not None and len(data) == size else None

    uid_gid = _word(rec, "uid_gid")
    uid = uid_gid & 0xFFFFFFFF
    num = pf.MAX_TRACE_PRINTK_VARARGS if helper == BPF_FUNC_TRACE_PRINTK else len(args)
    res = pf.format_fixed(fmt, args, num, read_str, read_kernel, uid != 0)
    if res.error:
        return None
    _ret, text = pf.printk_message(res.output)
    pt = _word(rec, "pid_tgid")
    comm_off = PRINTK_RECORD.off("comm")
    comm = rec[comm_off:comm_off + 16].split(b"\0", 1)[0]
    return PrintkEvent(pt >> 32, pt & 0xFFFFFFFF, uid, uid_gid >> 32, _word(rec, "cpu"), comm,
                       _word(rec, "ktime"), text)


def events(records: Iterable[bytes]) -> Iterator[PrintkEvent]:
    """Decoded lines of ``records`` (e.g. ``printk_ring_map.records()``), skipping refused ones."""
    for rec in records:
        ev = decode(bytes(rec))
        if ev is not None:
            yield ev
