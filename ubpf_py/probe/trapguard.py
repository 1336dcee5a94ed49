"""The trap guard: a SIGTRAP handler in the target, so that our int3 bytes cannot kill it when the
tracer dies (kill -9).

Why.  A thread stopped on one of our int3 bytes is in a ptrace signal-delivery stop with SIGTRAP
pending.  When the tracer dies the kernel detaches it with that signal still pending, and the
default action (core dump) kills the whole process before the guardian (``guardian.py``) can do
anything; the same happens to any thread that reaches an int3 before the guardian has put the
original bytes back.  Under heavy probing nearly every kill of the tracer killed the target
(benchmarks/ptrace_floor/kill_survival.py: 0 of 10).  The kernel's uprobes have no such window.

What.  When the first int3 goes into a process whose SIGTRAP disposition is the default (or
ignored), the tracer maps one guard area into it (code, then data), writes the handler below and
installs it with an injected ``rt_sigaction``.  While the tracer lives the handler never runs for
our traps: the tracer consumes every SIGTRAP stop of its own.  After the tracer's death it decides
from the registers the kernel saved:

* rip - 1 is one of our breakpoints (the table the tracer keeps here): wait until the guardian has
  put the original byte back, resume at the breakpoint (the instruction has not run);
* rip - 1 is the return-probe trampoline (or the int3 padding right after it, where a thread
  resumed on the trampoline without its signal traps again): wait until the guardian has put the
  original return address back into the stack slot the ``ret`` just read, resume there;
* rip is one of our breakpoints (rewound by the tracer before it died): wait, resume there;
* rip is in a scratch page's slots (the tracer had sent the thread to an out-of-line slot), or
  rip does not follow an int3 byte (the tracer had moved rip, e.g. after emulating an instruction):
  resume as the tracer left it;  rip in a scratch page's head (its int3 padding) is never a place
  to go on from: the default action;
* anything else is the target's own trap, or a SIGTRAP somebody sent: it gets what it would have
  got without us (the default action: the disposition is reset and the signal raised again).

A thread the tracer was handling when it died comes back with no signal (collecting a stop with
waitpid clears its signal in the kernel): so the tracer, when a guard is installed, puts the rip
of every thread it collects from our int3 back on that int3 at once (``abi.runtime.BP_REWIND``,
one PTRACE_POKEUSER per hit); killed at any later point, the thread traps again, into the guard.
The C loop rewinds before it reaps the stop (``native/hotloop.c`` collect): a tracer killed in
between leaves the SIGTRAP pending with rip already on the int3 (or on the return trampoline),
which the handler takes like a trap just after it.

A wait gives up after ``WAIT_TICKS`` x ``TICK_NS`` (5 s; the guardian repairs in milliseconds)
and then takes the default action too: no guardian, no repair.  The handler uses only system
calls, no libc, and its signal frame is the kernel's, below the red zone.

Limits.  A target with its own SIGTRAP handler (Go's runtime, debuggers-aware programs) is left
alone: no guard.  A thread that has SIGTRAP blocked when it hits an int3 makes the kernel reset
the disposition to the default (a forced signal cannot be blocked), so such targets lose the
guard.  The guard is installed only when a guardian runs (without one nobody repairs the bytes).
At detach the original disposition is put back (unless the target installed its own meanwhile)
and the area unmapped; an unfollowed fork child gets its disposition back the same way.
"""

from __future__ import annotations

import contextlib
import functools
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from ubpf_py.abi.kernel import (
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    PAGE_SIZE,
    PROT_EXEC,
    PROT_READ,
    PROT_WRITE,
    SA_RESTORER,
    SA_SIGINFO,
    SI_KERNEL,
    SIGINFO_CODE_OFF,
    SYS_GETPID,
    SYS_GETTID,
    SYS_MMAP,
    SYS_MPROTECT,
    SYS_MUNMAP,
    SYS_NANOSLEEP,
    SYS_RT_SIGACTION,
    SYS_RT_SIGRETURN,
    SYS_TGKILL,
    UCONTEXT_RIP_OFF,
    UCONTEXT_RSP_OFF,
)
from ubpf_py.abi.layout import Layout, u64, u64s
from ubpf_py.probe import x86asm

if TYPE_CHECKING:
    from ubpf_py.probe import ptrace as P


class Injector(Protocol):
    """What the guard needs of ``scratch.Injector`` (which owns this module's guards: no import back)."""

    def syscall(self, tid: int, nr: int, *args: int) -> int: ...

SIGTRAP = 5
#: every scratch page carries this word at SCRATCH_MAGIC_OFF (its head is int3 padding otherwise):
#: the handler recognises a thread the tracer had sent to an out-of-line slot
SCRATCH_MAGIC = 0x5550_4246_4354_5253      # "SRTCFBPU"
SCRATCH_MAGIC_OFF = 40
#: a scratch page's slots start here; below is its head (the syscall stub, the return trampoline and
#: int3 padding), where no thread may be sent on
SCRATCH_FIRST_SLOT = 64
#: int3 padding follows the return trampoline: a thread resumed anywhere in these bytes after it (it
#: was stopped there when the tracer died) traps again before it reaches anything else
TRAMP_SPAN = 16
GUARD_MAGIC = 0x5550_4246_4452_4754        # "TGRDFBPU"
CODE_SIZE = PAGE_SIZE
GUARD_SIZE = 8 * PAGE_SIZE
WAIT_TICKS = 50_000
TICK_NS = 100_000

#: the guard area's data, after the code page; the tracer writes it, the handler reads it
GUARD_DATA = Layout("ubpf_trap_guard", [
    u64("magic", "GUARD_MAGIC"),
    u64("tramp", "the return-probe trampoline (an int3 in the first scratch page); 0: none yet"),
    u64("nbp", "breakpoint addresses in ``table``"),
    u64("overflow", "1: more breakpoints than ``table`` holds: an unknown int3 may be ours too"),
    u64("orig_kind", "the disposition before ours: 0 SIG_DFL, 1 SIG_IGN"),
    u64("scratch_magic", "SCRATCH_MAGIC, for a compare with a memory operand"),
    u64s("dfl_act", 4, "struct sigaction {SIG_DFL}: the foreign trap's default action"),
    u64s("orig_act", 4, "struct sigaction of the disposition before ours (detach puts it back)"),
    u64s("our_act", 4, "struct sigaction of the handler"),
    u64s("query", 4, "the kernel writes the current struct sigaction here when detach asks"),
], doc="the trap guard's data")
TABLE_OFF = GUARD_DATA.size
TABLE_CAPACITY = (GUARD_SIZE - CODE_SIZE - TABLE_OFF) // 8


def _asm() -> str:
    sets = [f".set D_{n}, {o}" for n, o in GUARD_DATA.offsets.items()] + [
        f".set D_table, {TABLE_OFF}", f".set GUARD_DATA, {CODE_SIZE}", f".set SIGTRAP, {SIGTRAP}",
        f".set SI_KERNEL, {SI_KERNEL}", f".set SI_CODE, {SIGINFO_CODE_OFF}",
        f".set UC_RIP, {UCONTEXT_RIP_OFF}", f".set UC_RSP, {UCONTEXT_RSP_OFF}",
        f".set SCRATCH_MAGIC_OFF, {SCRATCH_MAGIC_OFF}", f".set SCRATCH_FIRST_SLOT, {SCRATCH_FIRST_SLOT}",
        f".set TRAMP_SPAN, {TRAMP_SPAN}", f".set WAIT_TICKS, {WAIT_TICKS}",
        f".set TICK_NS, {TICK_NS}", f".set SYS_RT_SIGACTION, {SYS_RT_SIGACTION}",
        f".set SYS_RT_SIGRETURN, {SYS_RT_SIGRETURN}", f".set SYS_NANOSLEEP, {SYS_NANOSLEEP}",
        f".set SYS_GETPID, {SYS_GETPID}", f".set SYS_GETTID, {SYS_GETTID}", f".set SYS_TGKILL, {SYS_TGKILL}"]
    return "\n".join(sets) + """
trap_handler:
    lea rbx, [rip + guard_data]
    mov r12, rdx
    mov r15d, dword ptr [rsi + SI_CODE]
    cmp r15d, SI_KERNEL
    jne tg_foreign
    mov r13, [r12 + UC_RIP]
    lea r14, [r13 - 1]
    mov rax, [rbx + D_tramp]
    test rax, rax
    jz tg_not_ret
    mov rcx, r13
    sub rcx, rax
    cmp rcx, TRAMP_SPAN + 1
    jae tg_not_ret
    mov ebp, WAIT_TICKS
tg_ret_wait:
    mov rcx, [r12 + UC_RSP]
    mov rcx, [rcx - 8]
    cmp rcx, [rbx + D_tramp]
    jne tg_ret_fixed
    call tg_tick
    dec ebp
    jnz tg_ret_wait
    jmp tg_foreign
tg_ret_fixed:
    mov [r12 + UC_RIP], rcx
    ret
tg_not_ret:
    mov rdi, r14
    call tg_in_table
    test eax, eax
    jz tg_not_after
    mov r13, r14
    jmp tg_byte_wait
tg_not_after:
    mov rdi, r13
    call tg_in_table
    test eax, eax
    jnz tg_byte_wait
    mov rax, r13
    and rax, -4096
    mov rcx, [rax + SCRATCH_MAGIC_OFF]
    cmp rcx, [rbx + D_scratch_magic]
    jne tg_not_scratch
    mov rax, r13
    and rax, 4095
    cmp rax, SCRATCH_FIRST_SLOT
    jae tg_resume
    jmp tg_foreign
tg_not_scratch:
    test r13, 4095
    jz tg_resume
    cmp byte ptr [r14], 0xCC
    jne tg_resume
    cmp qword ptr [rbx + D_overflow], 0
    je tg_foreign
    mov r13, r14
tg_byte_wait:
    mov ebp, WAIT_TICKS
tg_byte_loop:
    cmp byte ptr [r13], 0xCC
    jne tg_byte_back
    call tg_tick
    dec ebp
    jnz tg_byte_loop
    jmp tg_foreign
tg_byte_back:
    mov [r12 + UC_RIP], r13
tg_resume:
    ret
tg_foreign:
    cmp qword ptr [rbx + D_orig_kind], 1
    jne tg_default
    cmp r15d, SI_KERNEL
    jne tg_resume
tg_default:
    mov eax, SYS_RT_SIGACTION
    mov edi, SIGTRAP
    lea rsi, [rbx + D_dfl_act]
    xor edx, edx
    mov r10d, 8
    syscall
    mov eax, SYS_GETPID
    syscall
    mov r13, rax
    mov eax, SYS_GETTID
    syscall
    mov rsi, rax
    mov rdi, r13
    mov edx, SIGTRAP
    mov eax, SYS_TGKILL
    syscall
    ret
tg_in_table:
    mov rcx, [rbx + D_nbp]
    lea rdx, [rbx + D_table]
tg_scan:
    test rcx, rcx
    jz tg_absent
    cmp [rdx], rdi
    je tg_present
    add rdx, 8
    dec rcx
    jmp tg_scan
tg_absent:
    xor eax, eax
    ret
tg_present:
    mov eax, 1
    ret
tg_tick:
    sub rsp, 16
    mov qword ptr [rsp], 0
    mov qword ptr [rsp + 8], TICK_NS
    mov rdi, rsp
    xor esi, esi
    mov eax, SYS_NANOSLEEP
    syscall
    add rsp, 16
    ret
trap_restorer:
    mov eax, SYS_RT_SIGRETURN
    syscall
    ud2
.org GUARD_DATA
guard_data:
"""


@functools.cache
def handler_code() -> tuple[bytes, int, int]:
    """The handler's machine code (padded to ``CODE_SIZE``), and the offsets of the handler and of
    its restorer."""
    code, labels = x86asm.assemble(_asm())
    assert labels["guard_data"] == CODE_SIZE and len(code) == CODE_SIZE, "handler code overflows its page"
    return code, labels["trap_handler"], labels["trap_restorer"]


def disposition(pid: int) -> str:
    """'default', 'ignored' or 'caught': the process's SIGTRAP disposition (/proc/PID/status)."""
    bit = 1 << (SIGTRAP - 1)
    masks = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("SigIgn:", "SigCgt:")):
                k, v = line.split(":", 1)
                masks[k] = int(v, 16)
    if masks.get("SigCgt", 0) & bit:
        return "caught"
    return "ignored" if masks.get("SigIgn", 0) & bit else "default"


def _sigaction(handler: int, flags: int = 0, restorer: int = 0) -> bytes:
    return struct.pack("<QQQQ", handler, flags, restorer, 0)


@dataclass(slots=True, eq=False)
class TrapGuard:
    """The guard area of one address space (see the module docstring)."""

    addr: int
    mem: P.ProcMem
    handler: int
    noted: set[int] = field(default_factory=set)

    @property
    def data(self) -> int:
        return self.addr + CODE_SIZE

    @classmethod
    def install(cls, inj: Injector, mem: P.ProcMem, tid: int, pid: int, tramp: int) -> TrapGuard | None:
        """Map the guard into the stopped thread ``tid``'s process and install the handler; None
        when the target handles SIGTRAP itself or the area cannot be set up (no guard, as before)."""
        try:
            kind = disposition(pid)
        except OSError:
            return None
        if kind == "caught":
            return None
        code, h_off, r_off = handler_code()
        r = inj.syscall(tid, SYS_MMAP, 0, GUARD_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                        (1 << 64) - 1, 0)
        if r < 0:
            return None
        g = cls(r, mem, r + h_off)
        orig = 1 if kind == "ignored" else 0
        hdr = bytearray(GUARD_DATA.size)
        for name, val in (("magic", GUARD_MAGIC), ("tramp", tramp), ("orig_kind", orig),
                          ("scratch_magic", SCRATCH_MAGIC)):
            struct.pack_into("<Q", hdr, GUARD_DATA.off(name), val)
        hdr[GUARD_DATA.off("orig_act"):GUARD_DATA.off("orig_act") + 32] = _sigaction(orig)
        hdr[GUARD_DATA.off("our_act"):GUARD_DATA.off("our_act") + 32] = _sigaction(
            g.handler, SA_SIGINFO | SA_RESTORER, r + r_off)
        ok = mem.write(r, code) and mem.write(g.data, bytes(hdr))
        if not ok or inj.syscall(tid, SYS_MPROTECT, r, CODE_SIZE, PROT_READ | PROT_EXEC) < 0 \
                or inj.syscall(tid, SYS_RT_SIGACTION, SIGTRAP, g.data + GUARD_DATA.off("our_act"), 0, 8) < 0:
            inj.syscall(tid, SYS_MUNMAP, r, GUARD_SIZE)
            return None
        return g

    def note(self, addr: int) -> None:
        """``addr`` gets one of our int3 bytes (called before the byte is written)."""
        if addr in self.noted:
            return
        n = len(self.noted)
        if n >= TABLE_CAPACITY:
            self.mem.write(self.data + GUARD_DATA.off("overflow"), struct.pack("<Q", 1))
            return
        # the entry before the count: the handler never sees a count covering an unwritten entry
        self.mem.write(self.data + TABLE_OFF + 8 * n, struct.pack("<Q", addr))
        self.mem.write(self.data + GUARD_DATA.off("nbp"), struct.pack("<Q", n + 1))
        self.noted.add(addr)

    def set_tramp(self, tramp: int) -> None:
        self.mem.write(self.data + GUARD_DATA.off("tramp"), struct.pack("<Q", tramp))

    def copy_for(self, mem: P.ProcMem) -> TrapGuard:
        """The same guard in a followed fork child (its memory is a copy of the parent's)."""
        return TrapGuard(self.addr, mem, self.handler, set(self.noted))

    def restore_disposition(self, inj: Injector, tid: int) -> None:
        """Put the original SIGTRAP disposition back, unless the target has installed its own
        handler meanwhile (then that one stays)."""
        query = self.data + GUARD_DATA.off("query")
        if inj.syscall(tid, SYS_RT_SIGACTION, SIGTRAP, 0, query, 8) < 0:
            return
        cur = self.mem.read(query, 8)
        if cur is not None and struct.unpack("<Q", cur)[0] == self.handler:
            inj.syscall(tid, SYS_RT_SIGACTION, SIGTRAP, self.data + GUARD_DATA.off("orig_act"), 0, 8)

    def remove(self, inj: Injector, tid: int) -> None:
        """Detach: the disposition back, the area unmapped (every thread stopped, none inside)."""
        with contextlib.suppress(OSError):
            self.restore_disposition(inj, tid)
        inj.syscall(tid, SYS_MUNMAP, self.addr, GUARD_SIZE)
