"""Machine code of the in-target trampolines and of the 5-byte patch that enters them.

The code is written once below as x86-64 assembly, assembled by LLVM (llvmlite,
``module asm``) the first time it is needed, and copied per site with a few 64-bit
constants patched in (the ``movabs`` immediates that follow the ``imm_*`` labels).
Structure offsets come from ``ubpf_py.abi`` as ``.set`` symbols, so the assembly
never repeats a layout.

**Entry trampoline** (one per site, at an address within +-2 GiB of it)::

    lea rsp,[rsp-128]            skip the target's red zone; nothing is written above here
    pushfq; cld; push rax,rcx,rdx,rbx,rsi,rdi      56 bytes of the target's stack, all we use
    [header + GATE_OFFSET] == 0   a fork child (the gate page is wiped on fork): no
                                  program, no count, straight to the displaced code
    rdfsbase rdx                  the thread's key (FS base), no syscall
    hash + linear probing in RUNTIME_HEADER.thread_table, claiming a free slot
        with lock cmpxchg           (no slot: every probe's ``missed`` += 1, skip)
    THREAD_BLOCK.busy != 0        a signal handler hit a probe while a program ran on
                                  this thread: ``missed`` += 1, skip (the kernel's
                                  recursion guard does the same)
    busy = 1; rsp = slot end & ~15          the per-thread runtime stack
    push a kernel-layout pt_regs (original values; ip = the site; rsp = the site's rsp;
        cs/ss = user selectors; orig_rax = -1 as the kernel's int3 entry reports)
    HIT_FRAME below it (no CPU id owned yet); for each SITE.probes[i] that is enabled:
        return probe: drop shadow entries of frames that are gone (rsp below ours, or
                      equal to ours unless [rsp] already is the return trampoline: a
                      tail call chaining two return probes, as the kernel tells them
                      apart), push a SHADOW_ENTRY, [rsp] = the return trampoline
                      (shadow stack full: ``missed`` += 1, the return address stays)
        otherwise:    entry(&pt_regs, &hit_frame); hits += 1
    restore r8-r15, rbp from pt_regs, back to the target stack, busy = 0,
    pop the scratch registers, popfq, lea rsp,[rsp+128]
    relocated displaced instructions, jmp site+length

For code without a red zone (Go) ``red_zone=False`` builds a variant that skips no
red zone and uses 56 bytes of the target's stack instead of 184.

Every general register and the flags come back exactly (the programs cannot write
their context: the verifier forbids it).  Programs and the in-target runtime are
compiled for general registers only (no SSE/AVX/x87), so vector and x87 state is
neither saved nor touched.  ``busy`` is set before the stack switch and cleared
after switching back, so a signal arriving at any point either runs its handler on
the target stack below our 184 bytes, or sees ``busy`` and skips its probes: the
runtime stack is never entered twice.  A signal arriving while a program runs puts
its frame on the runtime stack, so the thread slot must leave room for one (the
tracer sizes slots; 64 KiB is plenty).

**Thread slots** are claimed on a thread's first hit and never freed: the trampolines
cannot tell a dead thread from a live one without a syscall.  A new thread that gets a
dead thread's FS base (glibc reuses cached thread stacks, TLS included) inherits its
slot; anything cached there per thread (the tid) must be checked by its user.  Size the
table for the threads a target ever has (untouched slots cost no memory: the table is
anonymous memory); a full table makes hits of new threads ``missed``, never a crash.
Threads must have distinct FS bases (every libc and the Go runtime give each thread its
own; a raw ``clone`` without CLONE_SETTLS does not, and two such threads would share a
slot and its runtime stack: the tracer can spot them by comparing the fs_base of the
tasks it sees).

**Return trampoline** (one per process): entered by the probed function's ``ret``.
It finds the thread block, discards shadow entries whose frame is gone (their rsp
is below the current one: longjmp or an exception unwound past them without
returning), takes the entry whose rsp + 8 equals the current rsp, puts its return address back,
and (gate open: not a fork child) runs that probe's
program with pt_regs.ip = the original return address and rsp = the current rsp
(what the kernel's uretprobe reports), restores everything and continues with
``jmp [rsp-8]``: the slot that held the return address before the ``ret`` now holds
the original return address again (it is dead stack, and the kernel puts signal
frames below rsp-128, so nothing can overwrite it in between).

If no entry matches (which cannot happen unless the shadow stack was corrupted or a
thread switched stacks in a way the rsp order cannot follow, e.g. a sigaltstack
above the main stack), there is no correct place to continue.  The trampoline then
executes ``ud2`` at ``return_bug_offset()`` (SIGILL): stopping loudly at a known
address is safer than returning to a guessed one, and it mirrors the kernel, which
kills the task with SIGSEGV in that situation.  The tracer can recognise the address.

**Limits shared with the kernel's uretprobes**: while a return probe's frame is live,
its return slot holds the return trampoline's address, so an unwinder walking that
stack (C++ exceptions, Go tracebacks, backtrace()) sees an address without unwind
information.  A thread running with the CPU's user shadow stack (CET SHSTK,
``x86_Thread_features: shstk`` in /proc/PID/status) faults on the replaced ``ret``:
the tracer must refuse return probes for such targets (and plan sites with
``shadow_stack=True``, which refuses displaced calls for the same reason).
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass

from ubpf_py.abi.kernel import PT_REGS, SIG_SETMASK, SYS_RT_SIGPROCMASK, USER_CS, USER_SS
from ubpf_py.abi.runtime import (
    CACHE_LINE,
    HIT_FRAME,
    PB_F_RETURN,
    PROBE_BLOCK,
    RUNTIME_HEADER,
    SHADOW_DEPTH,
    SHADOW_ENTRY,
    SITE,
    SITE_MAX_PROBES,
    THREAD_BLOCK,
)
from ubpf_py.errors import NotSupportedError
from ubpf_py.intarget.sites import JMP_LEN, SitePlan, SiteRefused, relocate
from ubpf_py.intarget.space import GATE_OFFSET
from ubpf_py.probe import x86asm

#: multiplier of the thread-table hash (the asm and ``thread_slot_index`` share it)
HASH_MUL = 0x9E3779B97F4A7C15
#: the SysV red zone below rsp that leaf functions may use without moving rsp
RED_ZONE = 128
#: flags + the 6 scratch registers, saved on the target's stack below the red zone
SAVE_AREA = 7 * 8

#: placeholder immediates; each is patched per copy
_IMM = {"header": 0x1111_1111_1111_1111, "site": 0x2222_2222_2222_2222, "rettramp": 0x3333_3333_3333_3333}


def thread_slot_index(key: int, slots: int) -> int:
    """The first slot the trampolines probe for FS base ``key`` (``slots`` a power of two)."""
    return (((key * HASH_MUL) & (2**64 - 1)) >> 32) & (slots - 1)


# --- the assembly ---------------------------------------------------------------------------------

def _sets(red_zone: int) -> str:
    lines = []
    for prefix, lay in (("H", RUNTIME_HEADER), ("P", PROBE_BLOCK), ("T", THREAD_BLOCK),
                        ("E", SHADOW_ENTRY), ("S", SITE), ("F", HIT_FRAME), ("R", PT_REGS)):
        for name, off in lay.offsets.items():
            lines.append(f".set {prefix}_{name}, {off}")
    lines += [f".set E_SIZE, {SHADOW_ENTRY.size}", f".set F_SIZE, {HIT_FRAME.size}",
              f".set SHADOW_DEPTH, {SHADOW_DEPTH}", f".set PB_F_RETURN, {PB_F_RETURN}",
              f".set SAVE_AREA, {SAVE_AREA}", f".set RED_ZONE, {red_zone}",
              f".set TARGET_USE, {red_zone + SAVE_AREA}", f".set LINE_SHIFT, {CACHE_LINE.bit_length() - 1}",
              f".set SIG_SETMASK, {SIG_SETMASK}", f".set SYS_RT_SIGPROCMASK, {SYS_RT_SIGPROCMASK}",
              f".set GATE_OFFSET, {GATE_OFFSET}"]
    return "\n".join(lines)


def _save(p: str) -> str:
    """Leave the red zone, save flags and the six scratch registers on the target stack."""
    return f"""
{p}_start:
    lea rsp, [rsp - RED_ZONE]
    pushfq
    cld
    push rax
    push rcx
    push rdx
    push rbx
    push rsi
    push rdi
    movabs rbx, {_IMM['header']:#x}
{p}_imm_header:
"""


def _lookup(p: str, found: str, missing: str) -> str:
    """rdx = FS base; rbx = header -> rdi = this thread's block (claimed if new), else jump to missing."""
    return f"""
    rdfsbase rdx
    test rdx, rdx
    jz {missing}
    mov rsi, [rbx + H_thread_slots]
    test rsi, rsi
    jz {missing}
    mov rcx, rdx
    movabs rax, {HASH_MUL:#x}
    imul rcx, rax
    shr rcx, 32
{p}_lookup:
    mov rax, [rbx + H_thread_slots]
    dec rax
    and rcx, rax
    mov rdi, rcx
    imul rdi, [rbx + H_thread_slot_size]
    add rdi, [rbx + H_thread_table]
    mov rax, [rdi + T_key]
    cmp rax, rdx
    je {found}
    test rax, rax
    jnz {p}_lookup_next
    lock cmpxchg [rdi + T_key], rdx
    je {found}
{p}_lookup_next:
    inc rcx
    dec rsi
    jnz {p}_lookup
    jmp {missing}
"""


def _enter_runtime() -> str:
    """busy = 1, switch to the runtime stack, push pt_regs (ip from rcx) and a HIT_FRAME.

    In: rdi = thread block, rbx = header, rcx = pt_regs ip, rsi = kept in r12.
    Out: rsp = hit frame, r12 = rsi, r15 = thread block.
    """
    return f"""
    mov qword ptr [rdi + T_busy], 1
    mov rdx, [rbx + H_thread_slot_size]
    add rdx, rdi
    and rdx, -16
    mov rax, rsp
    mov rsp, rdx
    push {USER_SS:#x}
    lea rdx, [rax + TARGET_USE]
    push rdx
    push qword ptr [rax + 48]
    push {USER_CS:#x}
    push rcx
    push -1
    push qword ptr [rax]
    push qword ptr [rax + 8]
    push qword ptr [rax + 24]
    push qword ptr [rax + 32]
    push qword ptr [rax + 40]
    push r8
    push r9
    push r10
    push r11
    push qword ptr [rax + 16]
    push rbp
    push r12
    push r13
    push r14
    push r15
    push rax
    sub rsp, F_SIZE
    lea rax, [rsp + F_SIZE + 8]
    mov [rsp + F_ctx], rax
    mov [rsp + F_thread], rdi
    mov [rsp + F_runtime], rbx
    mov qword ptr [rsp + F_cpu_owner], 0
    mov r12, rsi
    mov r15, rdi
"""


def _call_program() -> str:
    """Run probe rbp's program (rsp = hit frame); counts hits.  No in-flight counter: detach
    finds threads inside programs by their rip and THREAD_BLOCK.busy, so a hit pays one
    locked instruction, on the line of the CPU it runs on where rdpid works (threads calling
    the probed function on several CPUs would otherwise bounce one line between them)."""
    return """
    mov rax, [rbp + P_entry]
    test rax, rax
    jz 1f
    mov [rsp + F_probe], rbp
    lea rdi, [rsp + F_SIZE + 8]
    mov rsi, rsp
    call rax
1:
    mov rax, [rbp + P_pcpu_hits]
    test rax, rax
    jz 2f
    rdpid rcx
    and rcx, [rbp + P_pcpu_mask]
    shl rcx, LINE_SHIFT
    lock inc qword ptr [rax + rcx]
    jmp 3f
2:
    lock inc qword ptr [rbp + P_hits]
3:
"""


def _leave_runtime(p: str) -> str:
    """Restore r8-r15/rbp from pt_regs, switch back to the target stack, busy = 0; then, if a
    program sent a signal (bpf_send_signal*: blocked while it ran, THREAD_BLOCK.sig_deferred),
    restore the thread's signal mask so the signal arrives now, after the hit and on the
    target's stack, as the kernel delivers it on the return to user mode."""
    return f"""
    mov rdi, r15
    add rsp, F_SIZE
    pop rax
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbp
    lea rsp, [rsp + 8]
    pop r11
    pop r10
    pop r9
    pop r8
    mov rsp, rax
    mov qword ptr [rdi + T_busy], 0
    cmp qword ptr [rdi + T_sig_deferred], 0
    jne {p}_deliver_signal
{p}_left:
"""


def _deliver_signal(p: str) -> str:
    """Out of line: rt_sigprocmask(SIG_SETMASK, &saved_mask, NULL, 8) on the target stack
    (24 bytes more of it), keeping r10/r11 (the syscall's arguments and clobbers); rdi, rsi,
    rdx, rax, rcx are restored afterwards from the save area.  ``sig_delivering`` counts the
    handlers running from here (nested hits in a handler deliver their own) for detach."""
    return f"""
{p}_deliver_signal:
    push r10
    push r11
    push rdi
    mov qword ptr [rdi + T_sig_deferred], 0
    lock inc qword ptr [rdi + T_sig_delivering]
    lea rsi, [rdi + T_sig_saved_mask]
    mov edi, SIG_SETMASK
    xor edx, edx
    mov r10d, 8
    mov eax, SYS_RT_SIGPROCMASK
    syscall
    pop rdi
    lock dec qword ptr [rdi + T_sig_delivering]
    pop r11
    pop r10
    jmp {p}_left
"""


def _restore(p: str) -> str:
    return f"""
{p}_restore:
    pop rdi
    pop rsi
    pop rbx
    pop rdx
    pop rcx
    pop rax
    popfq
    lea rsp, [rsp + RED_ZONE]
"""


def _entry_asm() -> str:
    return _save("entry") + """
    cmp qword ptr [rbx + GATE_OFFSET], 0
    je entry_restore
""" + _lookup("entry", "entry_found", "entry_missed") + f"""
entry_found:
    cmp qword ptr [rdi + T_busy], 0
    jne entry_missed
    movabs rsi, {_IMM['site']:#x}
entry_imm_site:
    mov rcx, [rsi + S_addr]
""" + _enter_runtime() + """
    mov r13, [r12 + S_nprobes]
    lea r14, [r12 + S_probes]
entry_loop:
    test r13, r13
    jz entry_done
    mov rbp, [r14]
    cmp qword ptr [rbp + P_enabled], 0
    je entry_next
    test qword ptr [rbp + P_flags], PB_F_RETURN
    jnz entry_return
""" + _call_program() + f"""
entry_next:
    add r14, 8
    dec r13
    jmp entry_loop
entry_return:
    mov rdx, [rsp + F_SIZE + 8 + R_rsp]
    mov rax, [r15 + T_shadow_depth]
entry_prune:
    test rax, rax
    jz entry_push
    lea rcx, [rax + 2 * rax]
    mov rsi, [r15 + T_shadow + 8 * rcx - E_SIZE + E_rsp]
    cmp rsi, rdx
    ja entry_push
    jb entry_drop
    movabs rsi, {_IMM['rettramp']:#x}
entry_imm_rettramp2:
    cmp [rdx], rsi
    je entry_push
entry_drop:
    dec rax
    jmp entry_prune
entry_push:
    cmp rax, SHADOW_DEPTH
    jae entry_shadow_full
    lea rcx, [rax + 2 * rax]
    lea rcx, [r15 + T_shadow + 8 * rcx]
    mov rsi, [rdx]
    mov [rcx + E_ret_addr], rsi
    mov [rcx + E_rsp], rdx
    mov [rcx + E_probe], rbp
    inc rax
    mov [r15 + T_shadow_depth], rax
    movabs rsi, {_IMM['rettramp']:#x}
entry_imm_rettramp:
    mov [rdx], rsi
    jmp entry_next
entry_shadow_full:
    mov [r15 + T_shadow_depth], rax
    lock inc qword ptr [rbp + P_missed]
    jmp entry_next
entry_done:
""" + _leave_runtime("entry") + "    jmp entry_restore\n" + _deliver_signal("entry") + f"""
entry_missed:
    movabs rsi, {_IMM['site']:#x}
entry_imm_site2:
    mov rcx, [rsi + S_nprobes]
    lea rsi, [rsi + S_probes]
entry_miss_loop:
    test rcx, rcx
    jz entry_restore
    mov rax, [rsi]
    cmp qword ptr [rax + P_enabled], 0
    je entry_miss_next
    lock inc qword ptr [rax + P_missed]
entry_miss_next:
    add rsi, 8
    dec rcx
    jmp entry_miss_loop
""" + _restore("entry") + "entry_displaced:\n"


def _return_asm() -> str:
    return _save("ret") + _lookup("ret", "ret_found", "ret_bug") + """
ret_found:
    lea rdx, [rsp + TARGET_USE - 8]
    mov rax, [rdi + T_shadow_depth]
ret_pop:
    test rax, rax
    jz ret_bug
    lea rcx, [rax + 2 * rax]
    lea rcx, [rdi + T_shadow + 8 * rcx - E_SIZE]
    cmp [rcx + E_rsp], rdx
    je ret_match
    ja ret_bug
    dec rax
    jmp ret_pop
ret_match:
    mov rsi, [rcx + E_probe]
    mov rcx, [rcx + E_ret_addr]
    dec rax
    mov [rdi + T_shadow_depth], rax
    mov [rdx], rcx
    cmp qword ptr [rbx + GATE_OFFSET], 0
    je ret_restore
    cmp qword ptr [rdi + T_busy], 0
    jne ret_missed
    cmp qword ptr [rsi + P_enabled], 0
    je ret_restore
""" + _enter_runtime() + """
    mov rbp, r12
""" + _call_program() + _leave_runtime("ret") + """
    jmp ret_restore
""" + _deliver_signal("ret") + """
ret_missed:
    lock inc qword ptr [rsi + P_missed]
""" + _restore("ret") + """
    jmp qword ptr [rsp - 8]
ret_bug:
    ud2
ret_end:
"""


# --- assembling ------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Template:
    """Assembled code with the offsets of its labels."""

    code: bytes
    labels: dict[str, int]

    def patched(self, **imms: int) -> bytearray:
        """A copy with each ``<prefix>_imm_<name>*`` movabs immediate set to ``imms[name]``."""
        out = bytearray(self.code)
        for label, off in self.labels.items():
            if "_imm_" not in label:
                continue
            name = label.split("_imm_", 1)[1].rstrip("0123456789")
            placeholder = struct.unpack_from("<Q", out, off - 8)[0]
            assert placeholder == _IMM[name], label
            struct.pack_into("<Q", out, off - 8, imms[name] & (2**64 - 1))
        return out


def assemble(asm: str, red_zone: int = RED_ZONE) -> Template:
    """Assemble position-independent ``asm`` (Intel syntax) with the layout ``.set`` symbols."""
    code, labels = x86asm.assemble(_sets(red_zone) + "\n" + asm)
    return Template(code, labels)


@functools.cache
def entry_template(red_zone: bool = True) -> Template:
    """The entry trampoline; ``red_zone=False`` for code with no red zone (Go's ABI has none, and
    its goroutine stacks guarantee only ~128 spare bytes below a nosplit chain)."""
    return assemble(_entry_asm(), RED_ZONE if red_zone else 0)


@functools.cache
def return_template() -> Template:
    return assemble(_return_asm())


# --- per-site code ----------------------------------------------------------------------------------

def fsgsbase_available() -> bool:
    """Whether this machine lets user code run ``rdfsbase`` (the kernel sets AT_HWCAP2's bit for
    every process alike, so the tracer's answer holds for its targets)."""
    from ubpf_py.intarget.vdso import has_fsgsbase

    return has_fsgsbase()


def _check_fsgsbase(has_fsgsbase: bool) -> None:
    if not has_fsgsbase:
        raise NotSupportedError("in-target probes without rdfsbase (CPU or kernel lacks FSGSBASE)")


def build_entry_trampoline(plan: SitePlan, addr: int, *, runtime_header: int, site_block: int,
                           return_trampoline: int, has_fsgsbase: bool = True, red_zone: bool = True) -> bytes:
    """The entry trampoline of ``plan`` placed at ``addr`` (the site's SITE block at ``site_block``).

    ``red_zone=False`` leaves no 128-byte gap below the target's rsp (for Go, whose ABI has
    no red zone): the trampoline then uses only 56 bytes of the target's stack.
    """
    _check_fsgsbase(has_fsgsbase)
    t = entry_template(red_zone)
    code = t.patched(header=runtime_header, site=site_block, rettramp=return_trampoline)
    assert t.labels["entry_displaced"] == len(code)
    code += relocate(plan, addr + len(code))
    return bytes(code)


def entry_size(plan: SitePlan, red_zone: bool = True) -> int:
    """Bytes ``build_entry_trampoline`` will produce for ``plan`` (independent of the address)."""
    return len(entry_template(red_zone).code) + len(relocate(plan, plan.site))


def site_block(plan: SitePlan, trampoline: int, probes: list[int]) -> bytes:
    """The SITE block's bytes for ``plan``: write them before patching the site.  Adding a probe
    later: write ``probes[n]`` first, then store ``nprobes`` = n + 1 (one aligned 8-byte store)."""
    if len(probes) > SITE_MAX_PROBES:
        raise NotSupportedError(f"more than {SITE_MAX_PROBES} in-target probes on one address")
    out = bytearray(SITE.size)
    for name, value in (("addr", plan.site), ("length", plan.length), ("trampoline", trampoline),
                        ("nprobes", len(probes))):
        struct.pack_into("<Q", out, SITE.off(name), value)
    for i, pb in enumerate(probes):
        struct.pack_into("<Q", out, SITE.off("probes") + 8 * i, pb)
    return bytes(out)


def displaced_offset(red_zone: bool = True) -> int:
    """Offset in an entry trampoline where the relocated displaced instructions start."""
    return entry_template(red_zone).labels["entry_displaced"]


def build_return_trampoline(addr: int, runtime_header: int, has_fsgsbase: bool = True) -> bytes:
    """The process's return trampoline placed at ``addr`` (position independent: ``addr`` is unused
    except to document the call site)."""
    del addr
    _check_fsgsbase(has_fsgsbase)
    return bytes(return_template().patched(header=runtime_header))


def return_bug_offset() -> int:
    """Offset of the return trampoline's ``ud2`` (no shadow entry for the returning frame)."""
    return return_template().labels["ret_bug"]


def patch_bytes(site: int, trampoline: int, length: int) -> bytes:
    """The bytes written over ``length`` bytes at ``site``: ``jmp rel32`` then NOPs.

    The NOP padding is never executed: the relocated code resumes at site+length, and
    ``plan_site`` refused sites where a branch lands inside the patch.
    """
    if length < JMP_LEN:
        raise ValueError("a patch covers at least 5 bytes")
    rel = trampoline - (site + JMP_LEN)
    if not -(1 << 31) <= rel < (1 << 31):
        raise SiteRefused("the trampoline is out of +-2 GiB reach of the site")
    return b"\xe9" + struct.pack("<i", rel) + _nops(length - JMP_LEN)


#: Intel's recommended multi-byte NOPs (1..9 bytes)
_NOP = [b"", b"\x90", b"\x66\x90", b"\x0f\x1f\x00", b"\x0f\x1f\x40\x00", b"\x0f\x1f\x44\x00\x00",
        b"\x66\x0f\x1f\x44\x00\x00", b"\x0f\x1f\x80\x00\x00\x00\x00",
        b"\x0f\x1f\x84\x00\x00\x00\x00\x00", b"\x66\x0f\x1f\x84\x00\x00\x00\x00\x00"]


def _nops(n: int) -> bytes:
    out = b""
    while n > 0:
        k = min(n, 9)
        out += _NOP[k]
        n -= k
    return out
