"""Filling the per-hit facts: HitContext, target memory access, user stack unwinding.

One ``HitFiller`` per session owns one ``HitContext`` and updates it in place
for every hit.

Per-hit facts are the traced thread's, read as the kernel would at that moment
(``exact``, the default): the CPU the thread was running on when it hit the
breakpoint (field 39 of /proc/TGID/task/TID/stat: a stopped thread keeps its last
CPU), its name from the same file (renames by ``prctl(PR_SET_NAME)`` or
``pthread_setname_np`` show up at once), and its real uid/gid from
/proc/TGID/task/TID/status (credentials are per thread and change with
``setresuid``).  Each file is kept open per thread and re-read with one ``pread``.
Only the facts some attached program can observe are read (``needs``, from
``helpers.facts``).  Measured here (Python, per hit): stat 5 us, status 11 us.

``exact=False`` is the documented approximation (``ubpf-run --approx-facts``):
the tracer's own CPU (``sched_getcpu``: a stopped tracee wakes its tracer, which
the scheduler usually runs on the same CPU), and name/credentials cached per
thread/process from the first hit.
"""

from __future__ import annotations

import ctypes
import os
import struct

from ubpf_py.probe import ptrace as P
from ubpf_py.vm.env import HitContext

_libc = ctypes.CDLL(None, use_errno=True)
_sched_getcpu = _libc.sched_getcpu
_sched_getcpu.restype = ctypes.c_int
_sched_getcpu.argtypes = []
_Q = struct.Struct("<Q")
_QQ = struct.Struct("<QQ")


class TargetMemory:
    """The UserMemory protocol over process_vm_readv/writev for the current hit's process."""

    __slots__ = ("pid",)

    def __init__(self, pid: int = 0) -> None:
        self.pid = pid

    def read(self, addr: int, size: int) -> bytes | None:
        if size < 0 or addr < 0:
            return None
        return P.vm_read(self.pid, addr, size)

    def read_str(self, addr: int, max_size: int) -> bytes | None:
        if max_size <= 0 or addr <= 0:
            return None
        out = bytearray()
        want = max_size - 1
        a = addr
        while len(out) < want:
            chunk = min(want - len(out), 4096 - (a & 4095))
            data = P.vm_read(self.pid, a, chunk)
            if data is None:
                return None if not out and chunk == want else (bytes(out) if out else None)
            i = data.find(b"\0")
            if i >= 0:
                out += data[:i]
                return bytes(out)
            out += data
            a += chunk
        return bytes(out)

    def write(self, addr: int, data: bytes) -> bool:
        return P.vm_write(self.pid, addr, bytes(data))


class HitFiller:
    """Owns the HitContext and the pt_regs buffer of a session; fills both for each hit."""

    def __init__(self, regs: P.RegsBuf, exact_cpu: bool = True) -> None:
        self.regs = regs
        #: exact per-hit facts (see the module docstring); False: the approximations
        self.exact_cpu = exact_cpu
        #: facts an attached program can observe ("cpu", "ids", "comm"); all until told
        self.needs: set[str] = {"cpu", "ids", "comm"}
        self._fds: dict[tuple[int, str], int] = {}
        self.mem = TargetMemory()
        self.hit = HitContext(user_memory=self.mem, ctx_addr=regs.addr)
        self.hit.unwind_user_stack = self.unwind
        self.hit.send_signal = self.send_signal
        self.comm_cache: dict[int, bytes] = {}
        self.ids: dict[int, tuple[int, int]] = {}
        #: the current hit's thread (tracer.Thread: shadow stack, proc) and whether the probe sits on
        #: a function's first instruction (push rbp / endbr64); read lazily by unwind()
        self.cur_thread = None
        self.cur_at_entry = False

    # -- per-thread facts --------------------------------------------------
    def comm(self, tgid: int, tid: int) -> bytes:
        c = self.comm_cache.get(tid)
        if c is None:
            try:
                with open(f"/proc/{tgid}/task/{tid}/comm", "rb") as f:
                    c = f.read().rstrip(b"\n")[:15]
            except OSError:
                c = b""
            self.comm_cache[tid] = c
        return c

    def forget_thread(self, tid: int) -> None:
        self.comm_cache.pop(tid, None)
        for kind in ("stat", "status"):
            fd = self._fds.pop((tid, kind), None)
            if fd is not None:
                os.close(fd)

    def _read(self, tgid: int, tid: int, kind: str, size: int) -> bytes:
        """/proc/TGID/task/TID/KIND, re-read through a descriptor kept per thread."""
        key = (tid, kind)
        fd = self._fds.get(key)
        try:
            if fd is None:
                fd = self._fds[key] = os.open(f"/proc/{tgid}/task/{tid}/{kind}", os.O_RDONLY | os.O_CLOEXEC)
            return os.pread(fd, size, 0)
        except OSError:
            self.forget_thread(tid)
            return b""

    def refresh(self, tgid: int, tid: int, cpu_hint: int = -1) -> None:
        """Read the facts programs need for this hit, as the kernel sees them now."""
        h = self.hit
        needs = self.needs
        if not self.exact_cpu:
            h.cpu = cpu_hint if cpu_hint >= 0 else _sched_getcpu()
            return
        if "ids" in needs:
            st = self._read(tgid, tid, "status", 512)
            i = st.find(b"\nUid:\t")
            j = st.find(b"\nGid:\t")
            if i >= 0 and j >= 0:
                h.uid = int(st[i + 6:st.index(b"\t", i + 6)])
                h.gid = int(st[j + 6:st.index(b"\t", j + 6)])
        if "cpu" in needs or "comm" in needs:
            data = self._read(tgid, tid, "stat", 512)
            close = data.rfind(b")")
            if close > 0:
                h.comm = data[data.index(b"(") + 1:close][:15]
                h.cpu = int(data[close + 2:].split(None, 37)[36])
                return
        h.cpu = cpu_hint if cpu_hint >= 0 else _sched_getcpu()

    def forget_process(self, tgid: int) -> None:
        """After exec: names and credentials may have changed."""
        self.ids.pop(tgid, None)
        self.comm_cache.clear()
        for tid, _kind in list(self._fds):
            self.forget_thread(tid)
        self.hit.tid = 0          # force switch() on the next hit

    def uid_gid(self, tgid: int) -> tuple[int, int]:
        v = self.ids.get(tgid)
        if v is None:
            uid = gid = 0
            try:
                with open(f"/proc/{tgid}/status") as f:
                    for line in f:
                        if line.startswith("Uid:"):
                            uid = int(line.split()[1])
                        elif line.startswith("Gid:"):
                            gid = int(line.split()[1])
                            break
            except OSError:
                pass
            v = self.ids[tgid] = (uid, gid)
        return v

    def switch(self, tgid: int, tid: int) -> None:
        """The hit is in another thread than the previous one: refresh the per-thread facts."""
        h = self.hit
        h.tgid = tgid
        h.tid = tid
        h.uid, h.gid = self.uid_gid(tgid)
        h.comm = self.comm(tgid, tid)
        self.mem.pid = tgid

    def fill(self, tgid: int, tid: int, func_ip: int, cookie: int, is_return: bool,
             cpu_hint: int = -1) -> HitContext:
        """The hit of thread ``tid`` at ``func_ip`` (both stop loops call this once per stop; the
        caller sets ``cookie`` per probe).
        ``cpu_hint``: the CPU the C loop runs on (the approximation when facts are not exact)."""
        h = self.hit
        if h.tid != tid or h.tgid != tgid:
            self.switch(tgid, tid)
        self.refresh(tgid, tid, cpu_hint)
        h.func_ip = func_ip
        h.cookie = cookie
        h.is_return = is_return
        return h

    # -- helpers bound into the HitContext ------------------------------------
    def unwind(self, max_frames: int) -> list[int]:
        """Frame-pointer unwinding of the current thread, innermost first (first entry = ip).

        Like the kernel (6.x): at a probe on a function's first instruction (push rbp/endbr64)
        the return address at [rsp] is reported too; trampoline addresses are replaced by the
        original return addresses from the shadow stack.
        """
        v = self.regs.vals
        pid = self.mem.pid
        frames = [v[P.RIP]]
        th = self.cur_thread
        shadow = list(reversed(th.shadow.entries)) if th is not None else []
        si = 0
        tramp = th.proc.scratch.tramp if th is not None else 0

        def fix(a: int) -> int:
            nonlocal si
            if tramp and a == tramp and si < len(shadow):
                a = shadow[si].orig_ret
                si += 1
            return a

        if self.cur_at_entry and len(frames) < max_frames:
            d = P.vm_read(pid, v[P.RSP], 8)
            if d is not None:
                frames.append(fix(_Q.unpack(d)[0]))
        fp = v[P.RBP]
        while len(frames) < max_frames and fp and not fp & 7:
            d = P.vm_read(pid, fp, 16)
            if d is None:
                break
            nxt, ret = _QQ.unpack(d)
            if not ret:
                break
            frames.append(fix(ret))
            if nxt <= fp:
                break
            fp = nxt
        return frames[:max_frames]

    def send_signal(self, sig: int) -> int:
        """bpf_send_signal: signal the current process (delivered when the thread resumes)."""
        try:
            os.kill(self.hit.tgid, sig)
        except OSError as e:
            return -e.errno
        return 0

