"""Layouts mirrored from the Linux x86-64 kernel ABI."""

from __future__ import annotations

from ubpf_py.abi.layout import Layout, u64

#: ``struct pt_regs`` (x86-64): also the first 168 bytes of ``struct user_regs_struct``
PT_REGS = Layout("pt_regs", [u64(n) for n in (
    "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx", "rdx",
    "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss")],
    doc="kernel x86-64 struct pt_regs; the uprobe program context")
PT_REGS_SIZE = PT_REGS.size  # 168
#: user-mode segment selectors the kernel reports in pt_regs
USER_CS = 0x33
USER_SS = 0x2B

#: x86-64 Linux numbers for the memory and system calls the tracer makes or injects
PAGE_SIZE = 4096
PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
MAP_SHARED, MAP_PRIVATE, MAP_ANONYMOUS = 0x01, 0x02, 0x20
MAP_NORESERVE = 0x4000
MAP_FIXED_NOREPLACE = 0x100000
SYS_OPEN, SYS_CLOSE, SYS_MMAP, SYS_MUNMAP, SYS_MEMFD_CREATE = 2, 3, 9, 11, 319
SYS_RT_SIGPROCMASK = 14
SYS_MPROTECT, SYS_RT_SIGACTION, SYS_RT_SIGRETURN = 10, 13, 15
SYS_NANOSLEEP, SYS_GETPID, SYS_GETTID, SYS_TGKILL = 35, 39, 186, 234
SYS_MADVISE = 28
#: madvise: fault a range in writable now (Linux 5.14; older kernels answer EINVAL)
MADV_POPULATE_WRITE = 23
#: madvise: a fork child gets this range zero-filled (Linux 4.14+)
MADV_WIPEONFORK = 18
SIG_BLOCK, SIG_SETMASK = 0, 2
#: struct sigaction (kernel) flags, and siginfo.si_code of a trap the kernel raised (int3)
SA_SIGINFO, SA_RESTORER = 0x4, 0x04000000
SI_KERNEL = 0x80
#: byte offsets in a signal handler's arguments: siginfo.si_code; ucontext -> uc_mcontext.gregs
#: (uc_flags, uc_link, the 24-byte uc_stack, then gregs[] in REG_R8 .. REG_RSP, REG_RIP order)
SIGINFO_CODE_OFF = 8
UCONTEXT_RSP_OFF = 40 + 15 * 8
UCONTEXT_RIP_OFF = 40 + 16 * 8
MFD_CLOEXEC = 1
#: auxiliary vector: AT_HWCAP2 and its bit saying user space may use rdfsbase/wrfsbase
AT_SYSINFO_EHDR = 33
AT_HWCAP2 = 26
HWCAP2_FSGSBASE = 2
#: EFLAGS trap flag (single-step)
X86_EFLAGS_TF = 1 << 8
