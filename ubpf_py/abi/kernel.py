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
