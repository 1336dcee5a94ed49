"""Thin, allocation-light ptrace access through ctypes: the project's only ptrace layer.

python-ptrace supplies the option/event constants; the calls themselves go
straight to libc's ``ptrace``/``process_vm_readv`` through ctypes because
python-ptrace has no PTRACE_SEIZE/INTERRUPT/LISTEN and no process_vm_readv, and
its calls cost more per hit (measured: README.md, "Dependencies and design notes").

Registers are read into a caller-owned buffer (``RegsBuf``): the first 168
bytes of ``struct user_regs_struct`` are exactly the kernel's x86-64
``struct pt_regs``, so the probe engine hands that very buffer to programs.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import os
import time

from ptrace.binding.func import (
    PTRACE_EVENT_CLONE,
    PTRACE_EVENT_EXEC,
    PTRACE_EVENT_EXIT,
    PTRACE_EVENT_FORK,
    PTRACE_EVENT_VFORK,
    PTRACE_O_TRACECLONE,
    PTRACE_O_TRACEEXEC,
    PTRACE_O_TRACEEXIT,
    PTRACE_O_TRACEFORK,
    PTRACE_O_TRACEVFORK,
)

from ubpf_py.errors import TargetError

__all__ = [
    "PTRACE_EVENT_CLONE", "PTRACE_EVENT_EXEC", "PTRACE_EVENT_EXIT", "PTRACE_EVENT_FORK", "PTRACE_EVENT_STOP",
    "PTRACE_EVENT_VFORK", "PTRACE_O_TRACEEXIT",
]

# requests python-ptrace has no constant for (SEIZE and later), and the ones called here
PTRACE_POKEUSER = 6
PTRACE_CONT = 7
PTRACE_SINGLESTEP = 9
PTRACE_GETREGS = 12
PTRACE_SETREGS = 13
PTRACE_DETACH = 17
PTRACE_SETOPTIONS = 0x4200
PTRACE_GETEVENTMSG = 0x4201
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_LISTEN = 0x4208
PTRACE_EVENT_STOP = 128

#: the options every traced thread gets (fork/vfork are always traced so that a
#: child never runs with our int3 bytes; it is cleaned and released unless followed)
TRACE_OPTIONS = (PTRACE_O_TRACECLONE | PTRACE_O_TRACEEXEC | PTRACE_O_TRACEFORK
                 | PTRACE_O_TRACEVFORK)

#: the options of a process whose probes all run in the target (no int3 anywhere): threads it
#: creates are not traced at all (no stop per new thread); fork/exec are still seen from the
#: threads that are traced, and the exit stop of the leader tells of an exec by an untraced
#: thread (the kernel reports that exec to nobody: ``Tracer.on_leader_exit``)
NOCLONE_OPTIONS = (TRACE_OPTIONS & ~PTRACE_O_TRACECLONE) | PTRACE_O_TRACEEXIT

WALL = 0x40000000  # __WALL: wait for threads (clone children) too

#: offsets (in u64 slots) in struct user_regs_struct / pt_regs
R15, R14, R13, R12, RBP, RBX, R11, R10, R9, R8, RAX, RCX, RDX, RSI, RDI, ORIG_RAX, RIP, CS, \
    EFLAGS, RSP, SS, FS_BASE, GS_BASE, DS, ES, FS, GS = range(27)
USER_REGS_SIZE = 27 * 8


_libc = ctypes.CDLL(None, use_errno=True)
_ptrace = _libc.ptrace
_ptrace.restype = ctypes.c_long
_ptrace.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]


class IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_pvr = _libc.process_vm_readv
_pvr.restype = ctypes.c_ssize_t
_pvr.argtypes = [ctypes.c_int, ctypes.POINTER(IoVec), ctypes.c_ulong, ctypes.POINTER(IoVec),
                 ctypes.c_ulong, ctypes.c_ulong]
_pvw = _libc.process_vm_writev
_pvw.restype = ctypes.c_ssize_t
_pvw.argtypes = _pvr.argtypes


class PtraceError(OSError):
    """A ptrace request failed; ``errno`` says why (ESRCH: the thread is gone)."""


def ptrace(req: int, pid: int, addr: int = 0, data: int = 0) -> int:
    """Raw ptrace; raises PtraceError on failure (PEEK results are returned as-is)."""
    ctypes.set_errno(0)
    r = _ptrace(req, pid, addr, data)
    if r == -1:
        e = ctypes.get_errno()
        if e:
            raise PtraceError(e, f"ptrace({req}, {pid}): {os.strerror(e)}")
    return r


class RegsBuf:
    """A 216-byte ``user_regs_struct`` with a stable address (the pt_regs buffer).

    ``vals`` is a ctypes u64 array view for fast field access without struct calls.
    """

    __slots__ = ("addr", "owner", "vals")

    def __init__(self, host=None) -> None:
        """``host``: an object with a stable ``addr`` and >= 216 bytes (a vm.memory.HostBuffer)."""
        if host is None:
            self.vals = (ctypes.c_uint64 * 27)()
        else:
            if len(host) < USER_REGS_SIZE:
                raise ValueError("register buffer must hold 216 bytes")
            self.vals = (ctypes.c_uint64 * 27).from_address(host.addr)
        self.owner = host
        self.addr = ctypes.addressof(self.vals)

    def get(self, tid: int) -> None:
        if _ptrace(PTRACE_GETREGS, tid, 0, self.addr) == -1:
            e = ctypes.get_errno()
            raise PtraceError(e, f"PTRACE_GETREGS {tid}: {os.strerror(e)}")

    def set(self, tid: int) -> None:
        if _ptrace(PTRACE_SETREGS, tid, 0, self.addr) == -1:
            e = ctypes.get_errno()
            raise PtraceError(e, f"PTRACE_SETREGS {tid}: {os.strerror(e)}")

    def copy_from(self, other: RegsBuf) -> None:
        ctypes.memmove(self.addr, other.addr, USER_REGS_SIZE)


def cont(tid: int, sig: int = 0) -> None:
    ptrace(PTRACE_CONT, tid, 0, sig)


def set_rip(tid: int, rip: int) -> bool:
    """Move a stopped thread's rip (one PTRACE_POKEUSER, cheaper than SETREGS); False if it vanished."""
    return _ptrace(PTRACE_POKEUSER, tid, 8 * RIP, rip) != -1


def cont_quiet(tid: int, sig: int = 0) -> bool:
    """PTRACE_CONT that tolerates a thread that vanished (ESRCH): returns False then."""
    return _ptrace(PTRACE_CONT, tid, 0, sig) != -1


def seize(pid: int, options: int = TRACE_OPTIONS) -> None:
    ptrace(PTRACE_SEIZE, pid, 0, options)


def set_options(tid: int, options: int) -> bool:
    """PTRACE_SETOPTIONS on a stopped tracee (options are per thread); False if it vanished."""
    return _ptrace(PTRACE_SETOPTIONS, tid, 0, options) != -1


def interrupt(tid: int) -> bool:
    return _ptrace(PTRACE_INTERRUPT, tid, 0, 0) != -1


def detach(tid: int, sig: int = 0) -> bool:
    return _ptrace(PTRACE_DETACH, tid, 0, sig) != -1


def listen(tid: int) -> bool:
    return _ptrace(PTRACE_LISTEN, tid, 0, 0) != -1


def get_event_msg(tid: int) -> int:
    v = ctypes.c_ulong(0)
    ptrace(PTRACE_GETEVENTMSG, tid, 0, ctypes.addressof(v))
    return v.value



_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
SYS_TGKILL = 234


def tgkill(tgid: int, tid: int, sig: int) -> bool:
    return _syscall(SYS_TGKILL, ctypes.c_long(tgid), ctypes.c_long(tid), ctypes.c_long(sig)) == 0


def singlestep(tid: int, sig: int = 0) -> None:
    ptrace(PTRACE_SINGLESTEP, tid, 0, sig)


# --- memory ---------------------------------------------------------------

def vm_read(pid: int, addr: int, size: int) -> bytes | None:
    """process_vm_readv: ``size`` bytes at ``addr`` or None if not all readable."""
    if size <= 0:
        return b""
    buf = ctypes.create_string_buffer(size)
    local = IoVec(ctypes.addressof(buf), size)
    remote = IoVec(addr, size)
    n = _pvr(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    if n != size:
        return None
    return buf.raw


_U64 = ctypes.c_uint64(0)
_L64 = IoVec(ctypes.addressof(_U64), 8)
_R64 = IoVec(0, 8)
_PL64 = ctypes.byref(_L64)
_PR64 = ctypes.byref(_R64)


def vm_read_u64(pid: int, addr: int) -> int | None:
    """One u64 of target memory (no allocation beyond the int): the per-hit reads of stack slots."""
    _R64.base = addr
    if _pvr(pid, _PL64, 1, _PR64, 1, 0) != 8:
        return None
    return _U64.value


def vm_write_u64(pid: int, addr: int, value: int) -> bool:
    _U64.value = value
    _R64.base = addr
    return _pvw(pid, _PL64, 1, _PR64, 1, 0) == 8


def vm_write(pid: int, addr: int, data: bytes) -> bool:
    """process_vm_writev (honours page protections: fails on read-only text)."""
    if not data:
        return True
    buf = ctypes.create_string_buffer(data, len(data))
    local = IoVec(ctypes.addressof(buf), len(data))
    remote = IoVec(addr, len(data))
    return _pvw(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0) == len(data)


class ProcMem:
    """/proc/PID/mem: writes go through FOLL_FORCE, so read-only text can be patched.

    One descriptor per address space; ``pid`` may be any thread of it.
    """

    __slots__ = ("fd", "pid")

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.fd = os.open(f"/proc/{pid}/mem", os.O_RDWR | os.O_CLOEXEC)

    def read(self, addr: int, size: int) -> bytes | None:
        try:
            data = os.pread(self.fd, size, addr)
        except OSError:
            return None
        return data if len(data) == size else None

    def write(self, addr: int, data: bytes) -> bool:
        try:
            return os.pwrite(self.fd, data, addr) == len(data)
        except OSError:
            return False

    def close(self) -> None:
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = -1


# --- stop status decoding ------------------------------------------------

def stop_sig(status: int) -> int:
    return (status >> 8) & 0xFF


def stop_event(status: int) -> int:
    return (status >> 16) & 0xFF


# --- waiting for one thread ----------------------------------------------

def thread_dead(tid: int) -> bool:
    """Is ``tid`` a zombie (or gone)?  A zombie thread-group leader whose other threads are
    still around never reports its exit (the kernel holds it back until the group is empty,
    and traced threads leave the group only when their tracer reaps them)."""
    try:
        with open(f"/proc/{tid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return True
    state = stat[stat.rfind(b")") + 2:stat.rfind(b")") + 3]
    return state in (b"Z", b"X", b"x")


def wait_tid(tid: int) -> int | None:
    """``waitpid(tid, __WALL)`` that cannot hang on a thread unable to report: returns the wait
    status, or None when ``tid`` is not our child any more or is a zombie whose report is held
    back (a leader waiting for its other threads: ``waitpid(-1)`` gets it once they are reaped).

    Polls with WNOHANG and short sleeps (50 us doubling to 2 ms) because a blocking waitpid
    on a specific tid is exactly how a tracer deadlocks against an exiting thread group."""
    delay = 5e-5
    while True:
        try:
            p, st = os.waitpid(tid, WALL | os.WNOHANG)
        except ChildProcessError:
            return None
        if p:
            return st
        if thread_dead(tid):
            try:
                p, st = os.waitpid(tid, WALL | os.WNOHANG)
            except ChildProcessError:
                return None
            return st if p else None
        time.sleep(delay)
        delay = min(delay * 2, 0.002)


def reap_group(pid: int, timeout: float = 5.0) -> int | None:
    """After SIGKILL of traced process ``pid``: reap its threads, then its leader; the leader's
    wait status (None if it was not ours or did not end within ``timeout``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for tid in list_threads(pid):
            if tid != pid:
                wait_tid(tid)
        try:
            p, st = os.waitpid(pid, WALL | os.WNOHANG)
        except ChildProcessError:
            return None
        if p and (st & 0x7F) != 0x7F:
            return st
        time.sleep(0.001)
    return None


def attach_error(pid: int, err: int) -> TargetError:
    """A TargetError that tells the user what to do about a failed attach."""
    if err == _errno.ESRCH:
        return TargetError(f"no such process: pid {pid} (check the pid; it may have exited)")
    if err == _errno.EPERM:
        tracer = tracer_pid(pid)
        if tracer:
            return TargetError(f"pid {pid} is already traced by pid {tracer} (a debugger?); "
                               f"detach it first")
        yama = ""
        try:
            with open("/proc/sys/kernel/yama/ptrace_scope") as f:
                scope = f.read().strip()
            if scope != "0":
                yama = f"; /proc/sys/kernel/yama/ptrace_scope is {scope}: set it to 0 or run as root"
        except OSError:
            pass
        return TargetError(f"ptrace of pid {pid} denied: run as the same user as the target or "
                           f"with CAP_SYS_PTRACE{yama}")
    return TargetError(f"cannot trace pid {pid}: {os.strerror(err)}")


def tracer_pid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("TracerPid:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def list_threads(pid: int) -> list[int]:
    try:
        return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return []
