"""The guardian: puts the target back if the tracer dies without detaching (kill -9).

Design.  When the tracer process dies, the kernel detaches its tracees and
they run on with our int3 bytes, trampoline return addresses and scratch
pages in them.  A guardian -- a child forked from the tracer before tracing
starts -- shares one memory block (``GuardLog``, MAP_SHARED) with it:

* every armed breakpoint: (tgid, address, original byte);
* every hijacked return address: (tgid, stack slot, original address, trampoline).

The guardian blocks reading a pipe whose only writer is the tracer (at
real-time priority when permitted, so it wakes first).  A clean
detach writes ``q`` (the guardian exits); the tracer's death closes the pipe
(EOF) and the guardian, as fast as it can:

1. stops every recorded process with SIGSTOP (group-stop: no thread runs on
   into an int3 while we repair);
2. writes the original bytes and return addresses through /proc/PID/mem (root
   or same user: ptrace_may_access, no attach needed);
3. seizes each thread briefly to move any thread sitting on the trampoline to
   its real return address (slot found by rsp), and detaches;
4. sends SIGCONT.

In-target probes (jumps into trampolines) are recorded as *sites*: (tgid, address,
original bytes, patch bytes).  The guardian puts the original bytes back only once
every thread of the process is stopped (a multi-byte write must never be seen half
done) and only where the patch is still there.  Trampolines, the runtime image and
the arena stay mapped: a thread inside a program finishes it, and return addresses
still pointing at the return trampoline keep working (it stays), so nothing else
needs repair.

Scratch pages stay mapped (a thread may still be inside an out-of-line slot;
the slot jumps back by itself).  A thread that was stopped on an int3 at the
moment of the kill is resumed by the kernel with SIGTRAP pending, and a thread may
reach an int3 before step 1: both would die of the default action.  The trap guard
(``trapguard.py``), a SIGTRAP handler the tracer installs in the target with its first
int3, keeps them waiting until steps 2-3 are done and sends them on.  What it cannot
save: targets with their own SIGTRAP handler (it is not installed there), threads
that block SIGTRAP.  benchmarks/ptrace_floor/kill_survival.py measures how often
targets survive.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import select
import signal
import struct
import sys
import time

import numpy as np

from ubpf_py.probe import ptrace as P

MAGIC = 0x5542504647554152   # "UBPFGUAR"
HDR = struct.Struct("<QQQQQ")  # magic, state (0 active, 1 clean), bp count, ret capacity, live traps
MAX_TGIDS = 60                # followed processes the guardian freezes first (header slots)
TGID_OFF = HDR.size
TRAPS_OFF = 32               # live int3s + trap-bearing return addresses (HDR's last field)
BP = struct.Struct("<QQQ")    # tgid, addr, orig byte (tgid 0 = free)
RET = struct.Struct("<QQQQ")  # tgid, slot, orig_ret, tramp
#: tracer -> guardian: an int3 is now in a target, watch the tracer closely
WAKE_FAST = b"f"
MAX_BPS = 16384
MAX_RETS = 16384
SITE = struct.Struct("<QQQ16s16s")   # tgid, addr, length, original bytes, patch bytes (tgid 0 = free)
MAX_SITES = 4096
BP_OFF = TGID_OFF + MAX_TGIDS * 8
RET_OFF = BP_OFF + MAX_BPS * BP.size
SITE_OFF = RET_OFF + MAX_RETS * RET.size
SIZE = SITE_OFF + MAX_SITES * SITE.size


class GuardLog:
    """The shared record of what the tracer changed in its targets."""

    def __init__(self) -> None:
        self.mm = mmap.mmap(-1, SIZE, flags=mmap.MAP_SHARED)
        HDR.pack_into(self.mm, 0, MAGIC, 0, 0, MAX_RETS, 0)
        self.traps = 0
        self.nbp = 0
        self._free = list(range(MAX_RETS - 1, -1, -1))
        #: the guardian's pipe (tracer side): an int3 where there was none wakes it into fast polling
        self.wake_fd = -1

    def _count_traps(self, delta: int) -> None:
        """Keep the live trap count (int3 bytes and return addresses into trapping trampolines)
        the guardian reads; going from none to some tells it to watch closely (``_watch``)."""
        old, self.traps = self.traps, max(0, self.traps + delta)
        struct.pack_into("<Q", self.mm, TRAPS_OFF, self.traps)
        if old == 0 and self.traps > 0 and self.wake_fd >= 0:
            with contextlib.suppress(OSError):
                os.write(self.wake_fd, WAKE_FAST)

    # -- tracer side -----------------------------------------------------------
    def _note_tgid(self, tgid: int) -> None:
        for i in range(MAX_TGIDS):
            t = struct.unpack_from("<Q", self.mm, TGID_OFF + 8 * i)[0]
            if t == tgid:
                return
            if t == 0:
                struct.pack_into("<Q", self.mm, TGID_OFF + 8 * i, tgid)
                return

    def tgids(self) -> list[int]:
        out = []
        for i in range(MAX_TGIDS):
            t = struct.unpack_from("<Q", self.mm, TGID_OFF + 8 * i)[0]
            if t:
                out.append(t)
        return out

    def add_bp(self, tgid: int, addr: int, orig: int) -> None:
        self._note_tgid(tgid)
        if self.nbp >= MAX_BPS:
            return
        BP.pack_into(self.mm, BP_OFF + self.nbp * BP.size, tgid, addr, orig)
        self.nbp += 1
        struct.pack_into("<Q", self.mm, 16, self.nbp)
        self._count_traps(1)

    def add(self, tgid: int, slot: int, orig_ret: int, tramp: int) -> int:
        if not self._free:
            return -1
        i = self._free.pop()
        RET.pack_into(self.mm, RET_OFF + i * RET.size, tgid, slot, orig_ret, tramp)
        self._count_traps(1)
        return i

    def remove(self, i: int) -> None:
        if i >= 0:
            RET.pack_into(self.mm, RET_OFF + i * RET.size, 0, 0, 0, 0)
            self._free.append(i)
            self._count_traps(-1)

    def remove_bp(self, tgid: int, addr: int) -> None:
        for i in range(self.nbp):
            t, a, _ = BP.unpack_from(self.mm, BP_OFF + i * BP.size)
            if t == tgid and a == addr:
                BP.pack_into(self.mm, BP_OFF + i * BP.size, 0, 0, 0)
                self._count_traps(-1)

    def clear_pid(self, tgid: int) -> None:
        for i in range(MAX_TGIDS):
            if struct.unpack_from("<Q", self.mm, TGID_OFF + 8 * i)[0] == tgid:
                struct.pack_into("<Q", self.mm, TGID_OFF + 8 * i, 0)
        for i in range(self.nbp):
            t = BP.unpack_from(self.mm, BP_OFF + i * BP.size)[0]
            if t == tgid:
                BP.pack_into(self.mm, BP_OFF + i * BP.size, 0, 0, 0)
                self._count_traps(-1)
        rets = np.frombuffer(self.mm, dtype=np.uint64, count=MAX_RETS * 4, offset=RET_OFF).reshape(-1, 4)
        for i in np.nonzero(rets[:, 0] == tgid)[0].tolist():
            self.remove(i)
        del rets
        for i in range(MAX_SITES):
            if SITE.unpack_from(self.mm, SITE_OFF + i * SITE.size)[0] == tgid:
                SITE.pack_into(self.mm, SITE_OFF + i * SITE.size, 0, 0, 0, b"", b"")

    def add_site(self, tgid: int, addr: int, orig: bytes, patch: bytes) -> None:
        """An in-target site: ``patch`` was written over ``orig`` at ``addr``."""
        self._note_tgid(tgid)
        for i in range(MAX_SITES):
            off = SITE_OFF + i * SITE.size
            if SITE.unpack_from(self.mm, off)[0] == 0:
                SITE.pack_into(self.mm, off, tgid, addr, len(orig), orig, patch)
                return

    def sites(self) -> list[tuple[int, int, bytes, bytes]]:
        out = []
        for i in range(MAX_SITES):
            tgid, addr, n, orig, patch = SITE.unpack_from(self.mm, SITE_OFF + i * SITE.size)
            if tgid:
                out.append((tgid, addr, orig[:n], patch[:n]))
        return out

    def mark_clean(self) -> None:
        struct.pack_into("<Q", self.mm, 8, 1)

    # -- guardian side ---------------------------------------------------------
    def any_traps(self) -> bool:
        """Is an int3 (or a return address into a trapping trampoline) in a target now?"""
        return HDR.unpack_from(self.mm, 0)[4] > 0

    def read(self) -> tuple[int, list[tuple[int, int, int]], list[tuple[int, int, int, int]]]:
        _, state, nbp, _, _ = HDR.unpack_from(self.mm, 0)
        bps = [BP.unpack_from(self.mm, BP_OFF + i * BP.size) for i in range(min(nbp, MAX_BPS))]
        arr = np.frombuffer(self.mm, dtype=np.uint64, count=MAX_RETS * 4, offset=RET_OFF).reshape(-1, 4)
        rets = [tuple(int(x) for x in row) for row in arr[arr[:, 0] != 0]]
        del arr
        return state, [b for b in bps if b[0]], rets


def restore_after_tracer_death(log: GuardLog) -> int:
    """Repair every recorded process; returns how many processes were repaired."""
    first = log.tgids()
    if HDR.unpack_from(log.mm, 0)[1] == 1:
        return 0
    for t in first:                               # 1. freeze, before anything slower
        with contextlib.suppress(OSError):
            os.kill(t, signal.SIGSTOP)
    state, bps, rets = log.read()
    if state == 1:
        return 0
    sites = log.sites()
    tgids = sorted({b[0] for b in bps} | {r[0] for r in rets} | {s[0] for s in sites} | set(first))
    for t in tgids:
        if t not in first:
            with contextlib.suppress(OSError):
                os.kill(t, signal.SIGSTOP)
    repaired = 0
    for t in tgids:
        try:
            mem = P.ProcMem(t)
        except OSError:
            continue
        try:
            for _, addr, orig in (b for b in bps if b[0] == t):   # 2. bytes
                if mem.read(addr, 1) == b"\xcc":
                    mem.write(addr, bytes([orig]))
            by_slot = {}
            for _, slot, orig_ret, tramp in (r for r in rets if r[0] == t):
                by_slot[slot] = (orig_ret, tramp)
                if tramp and mem.read(slot, 8) == tramp.to_bytes(8, "little"):
                    mem.write(slot, orig_ret.to_bytes(8, "little"))
            _fix_threads(t, by_slot, {b[1] for b in bps if b[0] == t})   # 3. registers
            mine = [s for s in sites if s[0] == t]
            if mine and _all_stopped(t):        # 4. in-target jumps
                for _, addr, orig, patch in mine:
                    if mem.read(addr, len(patch)) == patch:
                        mem.write(addr, orig)
            repaired += 1
        finally:
            mem.close()
    for t in tgids:                               # 4. release
        with contextlib.suppress(OSError):
            os.kill(t, signal.SIGCONT)
    return repaired


def _all_stopped(tgid: int, timeout: float = 3.0) -> bool:
    """Wait until every thread of ``tgid`` is stopped (group stop after SIGSTOP, or a ptrace stop).
    Threads the dying tracer still held join the group stop only once the kernel has detached
    them, which takes long on a loaded machine: SIGSTOP is sent again every 100 ms meanwhile
    (a thread released from its ptrace stop may have consumed the first one)."""
    deadline = time.monotonic() + timeout
    resend = time.monotonic() + 0.1
    while True:
        if time.monotonic() >= resend:
            with contextlib.suppress(OSError):
                os.kill(tgid, signal.SIGSTOP)
            resend = time.monotonic() + 0.1
        states = []
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{tgid}/task"):
                with contextlib.suppress(OSError), open(f"/proc/{tgid}/task/{tid}/stat", "rb") as f:
                    data = f.read()
                    states.append(data[data.rindex(b")") + 2:data.rindex(b")") + 3])
        if states and all(s in (b"T", b"t", b"Z", b"X") for s in states):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.001)


def _fix_threads(tgid: int, by_slot: dict[int, tuple[int, int]], bp_addrs: set[int],
                 timeout: float = 3.0) -> None:
    """Step 3: seize each thread for a moment and put it where it can run on.

    Why.  A thread the tracer was handling when it died (its stop already collected by the
    tracer's waitpid, which clears the stop's signal in the kernel) is released with no signal
    at all.  With a trap guard the tracer has put its rip back on the int3 at once
    (``abi.runtime.BP_REWIND``), so it traps again into the guard; without one, or caught in the
    microsecond before that, it would run on from just after our int3 (in the middle of the
    instruction), or from the return trampoline.  When the guardian wins the race with the
    dying tracer, such a thread is held by the group stop (step 1), so here, once the dead tracer
    has let go of it (seizing fails until then: retried): after an int3 of ours (its byte is back
    now) it goes back to the breakpoint, on a return trampoline to its real return address.  A
    pending SIGTRAP of ours is finished here too; any other signal is given back on detach.

    One case is ambiguous: an emulated one-byte instruction (``push rbp``) leaves the thread right
    after the breakpoint too, if the tracer died between writing its registers and resuming it
    (a window of a few microseconds against the whole hit); the thread is sent back then, which
    is right for the far more likely case."""
    if not by_slot and not bp_addrs:
        return
    tramps = {tr for _, tr in by_slot.values() if tr}
    regs = P.RegsBuf()
    todo = set(P.list_threads(tgid))
    deadline = time.monotonic() + timeout
    while todo:
        for tid in sorted(todo):
            try:
                P.seize(tid, 0)
            except OSError as e:
                if e.errno != errno.EPERM:          # gone; EPERM: the dead tracer still holds it
                    todo.discard(tid)
                continue
            todo.discard(tid)
            give = 0
            try:
                P.interrupt(tid)
                _, status = os.waitpid(tid, P.WALL)
                sig = P.stop_sig(status) if os.WIFSTOPPED(status) and P.stop_event(status) == 0 else 0
                give = sig
                regs.get(tid)
                rip, rsp = regs.vals[P.RIP], regs.vals[P.RSP]
                new = None
                if rip in tramps or rip - 1 in tramps:
                    ent = by_slot.get(rsp - 8)
                    new = ent[0] if ent is not None else None
                elif rip - 1 in bp_addrs:
                    new = rip - 1                   # the original byte is back: the instruction runs now
                if new is not None:
                    regs.vals[P.RIP] = new
                    regs.set(tid)
                    if sig == signal.SIGTRAP:
                        give = 0
            except OSError:
                pass
            finally:
                P.detach(tid, give)
        if not todo or time.monotonic() >= deadline:
            return
        time.sleep(0.001)


PF_EXITING = 0x4


def _exiting(stat_fd: int) -> bool:
    try:
        data = os.pread(stat_fd, 512, 0)
    except OSError:
        return True
    if not data:
        return True
    fields = data[data.rindex(b")") + 2:].split()
    return fields[0] in (b"Z", b"X") or bool(int(fields[6]) & PF_EXITING)


def _watch(r: int, tracer_pid: int, poll_us: int, log: GuardLog) -> bytes:
    """Block until the tracer says goodbye (b"q") or dies (b"" / b"!").

    The pipe closes only late in the dying tracer's exit (after its memory is torn down,
    milliseconds for a Python process), while the tracees are still stuck with it; polling
    PF_EXITING in /proc/PID/stat catches the SIGKILL at the start of the exit, so the target
    is frozen before its threads are released (each int3 hit after that would kill it).
    That race exists only once an int3 is in a target: while every probe is an in-target
    jump (nothing in the target traps) the guardian just blocks on the pipe, instead of
    waking every ``poll_us`` at real-time priority and taking CPU time from the target's
    threads (measured: 2,000-2,750 wake-ups a second, about 7% of a CPU).  The tracer's
    first trap where there was none sends ``WAKE_FAST`` (``GuardLog._count_traps``); when the
    traps are all gone again it goes back to sleeping.
    """
    stat_fd = os.open(f"/proc/{tracer_pid}/stat", os.O_RDONLY) if poll_us > 0 else -1
    fast = log.any_traps()
    polls = 0
    while True:
        polls += 1
        if fast and polls % 200 == 0:        # every ~0.1 s: the traps may all be gone again
            fast = log.any_traps()
        timeout = poll_us / 1e6 if stat_fd >= 0 and fast else None
        try:
            ready, _, _ = select.select([r], [], [], timeout)
        except InterruptedError:
            continue
        if ready:
            msg = os.read(r, 1)
            if msg == WAKE_FAST:
                fast = True
                continue
            return msg
        if stat_fd >= 0 and _exiting(stat_fd):
            return b"!"


class Guardian:
    """Handle on the guardian child process of a tracer."""

    def __init__(self, pid: int, wfd: int, log: GuardLog) -> None:
        self.pid = pid
        self.wfd = wfd
        self.log = log

    @classmethod
    def start(cls, tracer, poll_us: int = 500) -> Guardian:
        """Fork the guardian.  ``poll_us`` > 0: also watch the tracer's PF_EXITING flag that often
        (a dying tracer sets it long before its pipe closes); 0: wait for the pipe only."""
        log = GuardLog()
        tracer_pid = os.getpid()
        for proc in tracer.procs.values():
            if proc.vfork_parent is None:
                for bp in proc.bps.values():
                    if bp.armed:
                        log.add_bp(proc.tgid, bp.addr, bp.orig[0])
                        proc.scratch.guard_trap(bp.addr, proc.tgid, proc.any_stopped_tid)
        r, w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                os.close(w)
                # keep nothing of the tracer's open (target pipes, /proc/PID/mem), except stderr
                os.closerange(3, r)
                os.closerange(r + 1, 65536)
                signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is for the tracer
                # real-time priority when allowed: on the tracer's death the guardian must run before
                # the target's threads reach their next int3 (it sleeps until then, so this costs nothing)
                with contextlib.suppress(OSError, AttributeError):
                    os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
                with contextlib.suppress(OSError):
                    os.setpgid(0, 0)
                msg = _watch(r, tracer_pid, poll_us, log)
                if msg != b"q":
                    t0 = time.monotonic()
                    n = restore_after_tracer_death(log)
                    if os.environ.get("UBPF_GUARDIAN_DEBUG"):
                        print(f"guardian: woke at {t0:.6f}, repaired {n} in {(time.monotonic() - t0) * 1e3:.2f} ms",
                              file=sys.stderr)
            except BaseException as e:   # never let the guardian's own failure go unnoticed
                print(f"ubpf-py guardian: {e}", file=sys.stderr)
                code = 1
            finally:
                os._exit(code)
        os.close(r)
        log.wake_fd = w

        def on_arm(proc, addr, orig):
            log.add_bp(proc.tgid, addr, orig)
            # the target's own SIGTRAP handler keeps a thread alive that traps after our death
            proc.scratch.guard_trap(addr, proc.tgid, proc.any_stopped_tid)

        tracer.armer.on_arm = on_arm
        tracer.on_patch = log.add_site
        if tracer.intarget is not None:
            tracer.intarget.on_patch = log.add_site
            for tgid, st in tracer.intarget.procs.items():
                for s in st.sites.values():
                    log.add_site(tgid, s.addr, s.orig, s.patch)
        tracer.ret_log = log
        g = cls(pid, w, log)
        return g

    def stop(self) -> None:
        """The tracer detached cleanly: dismiss the guardian."""
        if self.wfd < 0:
            return
        self.log.mark_clean()
        self.log.wake_fd = -1
        with contextlib.suppress(OSError):
            os.write(self.wfd, b"q")
        with contextlib.suppress(OSError):
            os.close(self.wfd)
        self.wfd = -1
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(self.pid, 0)
