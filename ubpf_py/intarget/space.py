"""Where the in-target runtime lives in a traced process, and putting it there.

Three fixed ranges, the same in every process of a session (a followed fork child inherits
them at the same addresses; an exec'd image gets them again at the same addresses), so
every address stored in the shared arena (probe blocks, program entries) is valid in each:

* the **arena** (shared memfd, ``arena``): maps, probe blocks, the printk ring;
* the **private area** (anonymous, read-write, copied by fork): one page holding this
  process's ``RUNTIME_HEADER`` (its pid, vDSO addresses...), then the thread table, then the
  **gate page** (``MADV_WIPEONFORK``): its first word is 1 while this process's programs may
  run; a fork child -- also one the tracer never sees, forked by a thread it does not trace --
  reads 0 there, so its trampolines run no program and count nothing in the shared arena
  (shadow stacks stay intact: its pending returns still go back where they should);
* the **image** (anonymous, read+exec): the linked runtime and programs, then the return
  trampoline.

Install order in a process: private area, arena (the memfd is created by the target, reopened
by the tracer through /proc, mapped in both), later the image once programs are compiled.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

from ubpf_py.abi.kernel import (
    MADV_WIPEONFORK,
    PROT_EXEC,
    PROT_READ,
    PROT_WRITE,
    SYS_CLOSE,
    SYS_MADVISE,
    SYS_OPEN,
)
from ubpf_py.abi.kernel import PAGE_SIZE as PAGE
from ubpf_py.abi.runtime import RT_F_FSGSBASE, RUNTIME_HEADER, RUNTIME_MAGIC, THREAD_BLOCK
from ubpf_py.errors import ProbeError
from ubpf_py.intarget import vdso
from ubpf_py.intarget.inject import TargetMapper, free_range, page_round, write_code
from ubpf_py.probe import ptrace as P

#: thread table: slots of THREAD_SLOT_SIZE bytes: the THREAD_BLOCK, then the runtime stack to the
#: slot's end, with room for 8 BPF frames of 512 bytes, the runtime helpers' frames and, below
#: them, a signal frame with full xsave state (up to ~11 KiB with AMX) and the frames of whatever
#: handler the target runs there
THREAD_SLOTS = 4096
THREAD_SLOT_SIZE = 64 * 1024
#: the gate page's offset from the header (the trampolines test ``[header + GATE_OFFSET]``)
GATE_OFFSET = PAGE + THREAD_SLOTS * THREAD_SLOT_SIZE
PRIVATE_SIZE = GATE_OFFSET + PAGE
_M64 = (1 << 64) - 1
#: arena: sparse, pages cost memory when touched
DEFAULT_ARENA_SIZE = 1 << 30
#: image: the return trampoline goes in its last page
RET_TRAMP_RESERVE = PAGE
assert THREAD_BLOCK.size < THREAD_SLOT_SIZE // 4


@dataclass(slots=True)
class SpacePlan:
    """The fixed addresses of one session's runtime."""

    arena_addr: int
    arena_size: int
    private_addr: int
    image_addr: int = 0
    image_size: int = 0

    @property
    def header_addr(self) -> int:
        return self.private_addr

    @property
    def thread_table(self) -> int:
        return self.private_addr + PAGE

    @property
    def ret_tramp_addr(self) -> int:
        return self.image_addr + self.image_size - RET_TRAMP_RESERVE


@dataclass(slots=True)
class ProcRuntime:
    """What is installed in one address space (for undoing it)."""

    pid: int
    private: bool = False
    arena: bool = False
    image: bool = False
    #: trampoline pages: address -> size
    pages: dict[int, int] = field(default_factory=dict)
    #: the gate page is MADV_WIPEONFORK (False: an old kernel; a fork child copies an open gate,
    #: so only forks the tracer sees -- traced threads -- are safe)
    wipe_on_fork: bool = False


def plan_space(pid: int, arena_size: int = DEFAULT_ARENA_SIZE) -> SpacePlan:
    """Addresses free in the target and in the tracer for the arena and the private area."""
    arena = free_range([pid], arena_size)
    private = free_range([pid], PRIVATE_SIZE, seed=arena)
    if not (private + PRIVATE_SIZE <= arena or private >= arena + arena_size):
        private = free_range([pid], PRIVATE_SIZE, seed=arena ^ 0x5A5A)
    return SpacePlan(arena, arena_size, private)


def reserve_image(plan: SpacePlan, pid: int, code_size: int) -> None:
    """Choose the image address (code plus the return trampoline page)."""
    plan.image_size = page_round(code_size) + RET_TRAMP_RESERVE
    for seed in range(8):
        a = free_range([pid], plan.image_size, seed=plan.arena_addr + seed)
        clash = [(plan.arena_addr, plan.arena_size), (plan.private_addr, PRIVATE_SIZE)]
        if all(a + plan.image_size <= s or a >= s + n for s, n in clash):
            plan.image_addr = a
            return
    raise ProbeError(f"no free address range for the in-target code image in pid {pid}")


def install_private(mapper: TargetMapper, mem: P.ProcMem, tid: int, plan: SpacePlan, rt: ProcRuntime) -> None:
    mapper.map_fixed(tid, plan.private_addr, PRIVATE_SIZE, PROT_READ | PROT_WRITE)
    rt.private = True
    gate = plan.header_addr + GATE_OFFSET
    rt.wipe_on_fork = mapper.inj.syscall(tid, SYS_MADVISE, gate, PAGE, MADV_WIPEONFORK) == 0
    open_gate(mem, plan)


def open_gate(mem: P.ProcMem, plan: SpacePlan) -> None:
    """Let this process's trampolines run programs (a new install, or a fork child we follow)."""
    write_code(mem, plan.header_addr + GATE_OFFSET, struct.pack("<Q", 1))


def create_arena(mapper: TargetMapper, mem: P.ProcMem, tid: int, plan: SpacePlan, rt: ProcRuntime) -> int:
    """Create the arena's memfd in the target, map it there, and return the tracer's descriptor
    of the same file (opened through /proc/PID/fd: allowed to whoever may ptrace the target,
    across users too).  The target's own descriptor is closed; its mapping keeps the file."""
    name_addr = plan.header_addr + PAGE - 16     # a scratch name in the private page
    write_code(mem, name_addr, b"ubpf-arena\0")
    tfd, fd = mapper.memfd_for_tracer(tid, plan.arena_size, name_addr)
    try:
        write_code(mem, name_addr, b"\0" * 11)
        mapper.map_fixed(tid, plan.arena_addr, plan.arena_size, PROT_READ | PROT_WRITE, fd=tfd, shared=True)
        rt.arena = True
    except BaseException:
        os.close(fd)
        raise
    finally:
        mapper.close_fd(tid, tfd)
    return fd


def map_arena(mapper: TargetMapper, mem: P.ProcMem, tid: int, plan: SpacePlan, fd: int, rt: ProcRuntime) -> None:
    """Map the existing arena in a new image of the target (after exec) at the plan's address.

    The target opens the tracer's descriptor by path (``/proc/<tracer>/fd/N``): allowed when
    the target could ptrace-read the tracer (same user, or root); otherwise this fails with a
    message and the caller keeps that process's probes on the ptrace path."""
    path = f"/proc/{os.getpid()}/fd/{fd}".encode() + b"\0"
    path_addr = plan.header_addr + PAGE - 64
    write_code(mem, path_addr, path)
    O_RDWR, O_CLOEXEC = 2, 0o2000000
    tfd = mapper.inj.syscall(tid, SYS_OPEN, path_addr, O_RDWR | O_CLOEXEC, 0)
    write_code(mem, path_addr, b"\0" * len(path))
    if tfd < 0:
        raise ProbeError(f"pid {mem.pid} cannot open the shared arena ({os.strerror(-tfd)}): "
                         f"it may not read this tracer's descriptors (another user?)")
    try:
        mapper.map_fixed(tid, plan.arena_addr, plan.arena_size, PROT_READ | PROT_WRITE, fd=tfd, shared=True)
    finally:
        mapper.inj.syscall(tid, SYS_CLOSE, tfd)
    rt.arena = True


def header_bytes(plan: SpacePlan, pid: int, printk_ring: int, tid_fs_off: int = 0,
                 cpu_owners: tuple[int, int] = (0, 0)) -> bytes:
    """This process's RUNTIME_HEADER (private: the pid and vDSO addresses are per process);
    ``cpu_owners``: the arena's CPU_OWNER lines (``SharedArena.cpu_owners``), shared by all."""
    from ubpf_py.intarget.header import host_facts

    syms = vdso.vdso_symbols(pid)
    words = [0] * (RUNTIME_HEADER.size // 8)

    def put(name: str, value: int) -> None:
        words[RUNTIME_HEADER.word(name)] = value

    for name, value in host_facts().items():
        put(name, value)
    flags = words[RUNTIME_HEADER.word("flags")] | (RT_F_FSGSBASE if vdso.has_fsgsbase(pid) else 0)
    put("magic", RUNTIME_MAGIC)
    put("arena_base", plan.arena_addr)
    put("arena_size", plan.arena_size)
    put("flags", flags)
    put("vdso_clock_gettime", syms.get("__vdso_clock_gettime", 0))
    put("vdso_getcpu", syms.get("__vdso_getcpu", 0))
    put("thread_table", plan.thread_table)
    put("thread_slots", THREAD_SLOTS)
    put("thread_slot_size", THREAD_SLOT_SIZE)
    put("printk_ring", printk_ring)
    put("tracer_pid", os.getpid())
    put("generation", 1)
    put("pid", pid)
    put("ret_trampoline", plan.ret_tramp_addr)
    put("tid_fs_off", tid_fs_off)
    put("cpu_owners", cpu_owners[0])
    put("cpu_ids", cpu_owners[1])
    return struct.pack(f"<{len(words)}Q", *(w & _M64 for w in words))   # jiffies_base may be "negative"


def write_header(mem: P.ProcMem, plan: SpacePlan, pid: int, printk_ring: int, tids: list[int] = (),
                 cpu_owners: tuple[int, int] = (0, 0)) -> None:
    """``tids``: stopped threads whose thread control blocks show where the libc keeps the tid
    (``header.tid_fs_offset``; the runtime then reads it instead of calling gettid)."""
    from ubpf_py.intarget.header import tid_fs_offset

    tcbs = {}
    regs = P.RegsBuf()
    for tid in tids:
        try:
            regs.get(tid)
        except P.PtraceError:
            continue
        fs = regs.vals[P.FS_BASE]
        data = mem.read(fs, 0x300) if fs else None
        if data is not None:
            tcbs[tid] = data
    write_code(mem, plan.header_addr, header_bytes(plan, pid, printk_ring, tid_fs_offset(tcbs), cpu_owners))


def fix_forked_header(mem: P.ProcMem, plan: SpacePlan, child: int) -> None:
    """A followed fork child has a copy of its parent's private area: give it its own pid and a
    new generation (facts cached per thread block become stale) and an empty thread table."""
    write_code(mem, plan.header_addr + RUNTIME_HEADER.off("pid"), struct.pack("<Q", child))
    gen = mem.read(plan.header_addr + RUNTIME_HEADER.off("generation"), 8)
    g = (struct.unpack("<Q", gen)[0] + 1) if gen else 1
    write_code(mem, plan.header_addr + RUNTIME_HEADER.off("generation"), struct.pack("<Q", g))


def install_image(mapper: TargetMapper, mem: P.ProcMem, tid: int, plan: SpacePlan, code: bytes,
                  ret_tramp: bytes, rt: ProcRuntime) -> None:
    mapper.map_fixed(tid, plan.image_addr, plan.image_size, PROT_READ | PROT_EXEC)
    rt.image = True
    write_code(mem, plan.image_addr, code)
    write_code(mem, plan.ret_tramp_addr, ret_tramp)


def uninstall(mapper: TargetMapper, tid: int, plan: SpacePlan, rt: ProcRuntime) -> None:
    """Unmap everything (every thread stopped, none inside our code)."""
    for addr, size in rt.pages.items():
        mapper.unmap(tid, addr, size)
    rt.pages.clear()
    if rt.image:
        mapper.unmap(tid, plan.image_addr, plan.image_size)
        rt.image = False
    if rt.arena:
        mapper.unmap(tid, plan.arena_addr, plan.arena_size)
        rt.arena = False
    if rt.private:
        mapper.unmap(tid, plan.private_addr, PRIVATE_SIZE)
        rt.private = False
