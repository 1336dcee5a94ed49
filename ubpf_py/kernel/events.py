"""Reading what kernel programs emit: bpf_printk lines from trace_pipe, ring buffer
records (mmap of a RINGBUF map) and perf buffer samples (per-CPU BPF_OUTPUT events).

The event classes are the backend's output interface; the CLI prints them the same
way it prints the userspace backend's events:

* ``PrintkEvent(message, tgid, tid, cpu, comm, timestamp_ns, line)`` -- ``message`` is
  the text after ``bpf_trace_printk: ``, ``line`` the whole trace_pipe line.
* ``RecordEvent(kind, map, cpu, data)`` -- ``kind`` is ``"ringbuf"`` or ``"perfbuf"``;
  ``cpu`` is None for ring buffers.
* ``LostEvent(map, cpu, count)`` -- PERF_RECORD_LOST.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from ubpf_py.errors import KernelBackendError
from ubpf_py.kernel.maps import KernelMap, possible_cpus
from ubpf_py.kernel.perf import PERF_EVENT_IOC_ENABLE, open_bpf_output

TRACEFS_CANDIDATES = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))
#: the kernel oracle serialises trace_pipe readers with this lock; we do the same
TRACE_LOCK = "/tmp/.kernel_oracle.lock"


@dataclass(frozen=True, slots=True)
class PrintkEvent:
    message: str
    tgid: int
    tid: int
    cpu: int
    comm: str
    timestamp_ns: int
    line: str


@dataclass(frozen=True, slots=True)
class RecordEvent:
    kind: str
    map: str
    cpu: int | None
    data: bytes


@dataclass(frozen=True, slots=True)
class LostEvent:
    map: str
    cpu: int
    count: int


Event = PrintkEvent | RecordEvent | LostEvent


# ---------------------------------------------------------------------------------------
# trace_pipe
# ---------------------------------------------------------------------------------------
# "<comm>-<pid> (<tgid>) [<cpu>] <flags> <secs>.<usecs>: bpf_trace_printk: <msg>"
_TRACE_RE = re.compile(
    r"^\s*(?P<comm>.*?)-(?P<pid>\d+)\s+(?:\(\s*(?P<tgid>[\d-]+)\)\s+)?\[(?P<cpu>\d+)\]\s+\S+\s+"
    r"(?P<secs>\d+)\.(?P<usecs>\d+):\s+(?P<event>[^:]+):\s?(?P<msg>.*)$")


def tracefs_dir() -> Path:
    for d in TRACEFS_CANDIDATES:
        if (d / "trace_pipe").exists():
            return d
    raise KernelBackendError("tracefs is not mounted: run `mount -t tracefs nodev /sys/kernel/tracing`")


def parse_trace_line(line: str) -> PrintkEvent | None:
    """A bpf_trace_printk line of trace_pipe, or None for anything else."""
    m = _TRACE_RE.match(line)
    if not m or m.group("event") != "bpf_trace_printk":
        return None
    pid = int(m.group("pid"))
    tgid_text = m.group("tgid")
    tgid = int(tgid_text) if tgid_text and tgid_text != "-" * len(tgid_text) else pid
    ts = int(m.group("secs")) * 1_000_000_000 + int(m.group("usecs")) * 1000
    return PrintkEvent(m.group("msg"), tgid, pid, int(m.group("cpu")), m.group("comm").strip(), ts, line)


class TracePipeReader:
    """Non-blocking reader of trace_pipe keeping only lines whose tgid is in ``tgids``
    (None: every line).  Turns on ``options/record-tgid`` so that lines from a target's
    threads are recognised, and restores it on close.  Holds the oracle's lock file
    while open, because trace_pipe hands each line to only one reader."""

    def __init__(self, tgids: set[int] | None) -> None:
        self.tgids = tgids
        self.dir = tracefs_dir()
        self._lock_fd = os.open(TRACE_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        opt = self.dir / "options" / "record-tgid"
        self._old_tgid = opt.read_text().strip() if opt.exists() else None
        if self._old_tgid is not None:
            opt.write_text("1")
        self.fd = os.open(self.dir / "trace_pipe", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        self._partial = b""
        self.drain()  # drop stale lines of earlier runs

    def drain(self) -> None:
        tgids, self.tgids = self.tgids, set()
        list(self.read())
        self.tgids = tgids
        self._partial = b""

    def read(self) -> list[PrintkEvent]:
        out: list[PrintkEvent] = []
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            data = self._partial + chunk
            lines = data.split(b"\n")
            self._partial = lines.pop()
            for raw in lines:
                ev = parse_trace_line(raw.decode(errors="replace"))
                if ev is not None and (self.tgids is None or ev.tgid in self.tgids):
                    out.append(ev)
        return out

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            if self._old_tgid is not None:
                try:
                    (self.dir / "options" / "record-tgid").write_text(self._old_tgid)
                except OSError:
                    pass
            os.close(self._lock_fd)


# ---------------------------------------------------------------------------------------
# ring buffer
# ---------------------------------------------------------------------------------------
_BUSY = 1 << 31
_DISCARD = 1 << 30
_HDR = 8


class RingbufReader:
    """Consumer of a BPF_MAP_TYPE_RINGBUF map through its two mmaps: the consumer page
    (read-write, our position) and the producer page followed by the data area, which
    the kernel maps twice in a row so records that wrap read contiguously."""

    def __init__(self, kmap: KernelMap) -> None:
        self.map = kmap
        self.page = mmap.PAGESIZE
        self.size = kmap.max_entries
        self.mask = self.size - 1
        self.cons = mmap.mmap(kmap.fd, self.page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self.prod = mmap.mmap(kmap.fd, self.page + 2 * self.size, mmap.MAP_SHARED, mmap.PROT_READ,
                              offset=self.page)

    def read(self) -> list[RecordEvent]:
        out: list[RecordEvent] = []
        cons_pos = struct.unpack_from("<Q", self.cons, 0)[0]
        while True:
            prod_pos = struct.unpack_from("<Q", self.prod, 0)[0]
            if cons_pos >= prod_pos:
                break
            at = self.page + (cons_pos & self.mask)
            hdr = struct.unpack_from("<I", self.prod, at)[0]
            if hdr & _BUSY:
                break
            length = hdr & ~(_BUSY | _DISCARD)
            if not hdr & _DISCARD:
                out.append(RecordEvent("ringbuf", self.map.name, None,
                                       bytes(self.prod[at + _HDR: at + _HDR + length])))
            cons_pos += (length + _HDR + 7) & ~7
            struct.pack_into("<Q", self.cons, 0, cons_pos)
        return out

    def close(self) -> None:
        self.cons.close()
        self.prod.close()


# ---------------------------------------------------------------------------------------
# perf buffer
# ---------------------------------------------------------------------------------------
PERF_RECORD_LOST = 2
PERF_RECORD_SAMPLE = 9
_DATA_HEAD = 1024  # offsets in struct perf_event_mmap_page
_DATA_TAIL = 1032


class PerfBufReader:
    """One BPF_OUTPUT perf event per possible CPU, stored in a PERF_EVENT_ARRAY map at
    key = cpu (what libbpf's perf_buffer__new does), each with an mmap'ed ring of
    ``pages`` data pages."""

    def __init__(self, kmap: KernelMap, pages: int = 64) -> None:
        self.map = kmap
        self.page = mmap.PAGESIZE
        self.data_size = pages * self.page
        self.rings: list[tuple[int, int, mmap.mmap]] = []
        ncpu = min(possible_cpus(), kmap.max_entries)
        online = _online_cpus()
        try:
            for cpu in range(ncpu):
                if cpu not in online:
                    continue
                fd = open_bpf_output(cpu)
                ring = mmap.mmap(fd, self.page + self.data_size, mmap.MAP_SHARED,
                                 mmap.PROT_READ | mmap.PROT_WRITE)
                self.rings.append((cpu, fd, ring))
                rc = kmap.update(struct.pack("<I", cpu), struct.pack("<I", fd))
                if rc < 0:
                    raise KernelBackendError(f"cannot store the perf event of CPU {cpu} in map {kmap.name}: "
                                             f"{os.strerror(-rc)}", errno=-rc)
                fcntl.ioctl(fd, PERF_EVENT_IOC_ENABLE, 0)
        except BaseException:
            self.close()
            raise

    def read(self) -> list[RecordEvent | LostEvent]:
        out: list[RecordEvent | LostEvent] = []
        for cpu, _fd, ring in self.rings:
            head = struct.unpack_from("<Q", ring, _DATA_HEAD)[0]
            tail = struct.unpack_from("<Q", ring, _DATA_TAIL)[0]
            while tail < head:
                hdr = self._read(ring, tail, 8)
                rtype, _misc, size = struct.unpack("<IHH", hdr)
                if size < 8:
                    break
                body = self._read(ring, tail + 8, size - 8)
                if rtype == PERF_RECORD_SAMPLE:
                    raw_size = struct.unpack_from("<I", body, 0)[0]
                    out.append(RecordEvent("perfbuf", self.map.name, cpu, body[4: 4 + raw_size]))
                elif rtype == PERF_RECORD_LOST:
                    _id, lost = struct.unpack_from("<QQ", body, 0)
                    out.append(LostEvent(self.map.name, cpu, lost))
                tail += size
            struct.pack_into("<Q", ring, _DATA_TAIL, tail)
        return out

    def _read(self, ring: mmap.mmap, pos: int, n: int) -> bytes:
        start = pos % self.data_size
        end = start + n
        base = self.page
        if end <= self.data_size:
            return bytes(ring[base + start: base + end])
        first = bytes(ring[base + start: base + self.data_size])
        return first + bytes(ring[base: base + end - self.data_size])

    def close(self) -> None:
        for _cpu, fd, ring in self.rings:
            ring.close()
            os.close(fd)
        self.rings = []


def _online_cpus() -> set[int]:
    try:
        text = Path("/sys/devices/system/cpu/online").read_text().strip()
    except OSError:
        return set(range(possible_cpus()))
    cpus: set[int] = set()
    for part in text.split(","):
        if "-" in part:
            lo, hi = part.split("-")
            cpus.update(range(int(lo), int(hi) + 1))
        elif part:
            cpus.add(int(part))
    return cpus
