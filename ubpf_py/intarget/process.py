"""The in-target half of the probe engine: patching sites with jumps and undoing it.

One ``InTargetEngine`` per session (``probe.engine.ProbeSession.enable_in_target``).  The
tracer calls it where it would write an int3:

* ``arm(proc, probe, addr)``: plan the site (``sites``), give it a trampoline within
  +-2 GiB, a SITE block and a PROBE_BLOCK in the arena, and write the 5-byte ``jmp``
  (every thread of ``proc`` stopped, none inside the patched bytes).  A refused site
  returns the reason and the tracer arms an int3 instead: that probe takes the ptrace path;
* ``clean_fork_child``: a fork child that is not followed gets the original bytes and return
  addresses back, and our mappings removed;
* ``on_exec`` / ``restore`` / ``uninstall``: a new image starts empty; detach puts every
  byte and return address back and unmaps everything once no thread runs our code.

The engine knows x86 and processes, never BPF: a probe's program is an address in the
image (``Probe.target_entry``) that the live layer linked there.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import struct
import time
from dataclasses import dataclass, field

from ubpf_py.abi.kernel import PROT_EXEC, PROT_READ, X86_EFLAGS_TF
from ubpf_py.abi.runtime import (
    CACHE_LINE,
    PB_F_AT_ENTRY,
    PB_F_RETURN,
    PCPU_HIT_LINES_MAX,
    PROBE_BLOCK,
    SITE,
    SITE_MAX_PROBES,
    THREAD_BLOCK,
)
from ubpf_py.errors import ProbeError, UbpfError
from ubpf_py.intarget import space as S
from ubpf_py.intarget import trampoline as TR
from ubpf_py.intarget.arena import ArenaBuffer, SharedArena
from ubpf_py.intarget.inject import TargetMapper, write_code
from ubpf_py.intarget.sites import GO_RETURN_REFUSAL, SiteRefused, is_go_binary, plan_site
from ubpf_py.intarget.unpatch import EntryTrampoline, find_thread_block, is_busy, locate, return_fixes
from ubpf_py.probe import ptrace as P
from ubpf_py.sysinfo import cpu_has, possible_cpus

TRAMP_PAGE = 64 * 1024
TRAMP_ALIGN = 64
_Q = struct.Struct("<Q")



@dataclass(slots=True)
class SiteState:
    """One patched address in one process."""

    addr: int
    orig: bytes
    tramp: int
    block: object            # ArenaBuffer of the SITE
    probes: list[int] = field(default_factory=list)   # PROBE_BLOCK addresses
    plan: object = None      # sites.SitePlan
    tramp_size: int = 0
    probe_ids: set[int] = field(default_factory=set)
    patch: bytes = b""


@dataclass(slots=True)
class ProcState:
    rt: S.ProcRuntime
    sites: dict[int, SiteState] = field(default_factory=dict)
    #: trampoline page address -> bytes used (the pages themselves: ``rt.pages``)
    tramp_used: dict[int, int] = field(default_factory=dict)
    ready: bool = False        # image + header installed
    failed: str = ""           # why this address space cannot run in-target probes


class InTargetEngine:
    """Session-wide in-target state: the fixed ranges, the arena, the linked image."""

    def __init__(self, plan: S.SpacePlan, arena: SharedArena, arena_fd: int) -> None:
        self.plan = plan
        self.arena = arena
        self.arena_fd = arena_fd
        self.code = b""
        self.printk_ring = 0
        self.procs: dict[int, ProcState] = {}
        #: PROBE_BLOCK address -> its per-CPU hit counter lines (``pcpu_hit_lines``)
        self.pcpu_hits: dict[int, ArenaBuffer] = {}
        #: probe id -> PROBE_BLOCK buffers (one per armed site instance)
        self.blocks: dict[int, list] = {}
        #: probe id -> why it is not (everywhere) in-target
        self.reasons: dict[int, str] = {}
        #: called with (tgid, address, original bytes, patch bytes) before a site is patched
        #: (the guardian's record, so a killed tracer's sites can be put back)
        self.on_patch = None
        #: the image's ``ubpf_dl_notify`` (0: none) and its request/answer words in the arena
        self.dl_notify = 0
        self.dl_words: ArenaBuffer | None = None

    # ------------------------------------------------------------------ set-up
    @classmethod
    def create(cls, proc, arena_size: int = S.DEFAULT_ARENA_SIZE) -> InTargetEngine:
        """Map the private area and the arena into ``proc`` (stopped) and into this process."""
        tid = proc.any_stopped_tid()
        plan = S.plan_space(proc.tgid, arena_size)
        rt = S.ProcRuntime(proc.tgid)
        mapper = TargetMapper(proc.inj, proc.tgid)
        S.install_private(mapper, proc.mem, tid, plan, rt)
        try:
            fd = S.create_arena(mapper, proc.mem, tid, plan, rt)
            arena = SharedArena(plan.arena_size, addr_hint=plan.arena_addr, fd=fd)
        except BaseException:
            S.uninstall(mapper, tid, plan, rt)
            raise
        self = cls(plan, arena, fd)
        self.procs[proc.tgid] = ProcState(rt)
        return self

    def set_image(self, code: bytes, image_addr: int, image_size: int, printk_ring: int = 0) -> None:
        """The linked runtime + programs (for ``plan.image_addr``, chosen by ``reserve_image``)."""
        assert image_addr == self.plan.image_addr and image_size == self.plan.image_size
        self.code = code
        self.printk_ring = printk_ring

    def _ready(self, proc) -> ProcState:
        """Install what ``proc`` still lacks (image, header, return trampoline; after exec also the
        private area and the arena).  Raises ProbeError with the reason when it cannot."""
        st = self.procs.get(proc.tgid)
        if st is None:
            st = self.procs[proc.tgid] = ProcState(S.ProcRuntime(proc.tgid))
        if st.failed:
            raise ProbeError(st.failed)
        if st.ready:
            return st
        if not self.code:
            raise ProbeError("no in-target image was loaded")
        tid = proc.any_stopped_tid()
        mapper = TargetMapper(proc.inj, proc.tgid)
        try:
            if not st.rt.private:
                S.install_private(mapper, proc.mem, tid, self.plan, st.rt)
            if not st.rt.arena:
                S.map_arena(mapper, proc.mem, tid, self.plan, self.arena_fd, st.rt)
            ret = TR.build_return_trampoline(self.plan.ret_tramp_addr, self.plan.header_addr)
            S.install_image(mapper, proc.mem, tid, self.plan, self.code, ret, st.rt)
            S.write_header(proc.mem, self.plan, proc.tgid, self.printk_ring,
                           [t.tid for t in proc.threads.values() if t.stopped], self.arena.cpu_owners())
            # the maps are all allocated by now: their storage faults in here, not on hits (the
            # kernel's maps are allocated up front too)
            mapper.populate(tid, self.arena.addr, self.arena.used)
        except (UbpfError, OSError, ValueError, struct.error) as e:
            st.failed = f"in-target runtime unavailable in pid {proc.tgid}: {e}"
            with contextlib.suppress(UbpfError, OSError):
                S.uninstall(mapper, tid, self.plan, st.rt)
            raise ProbeError(st.failed) from None
        st.ready = True
        return st

    # ------------------------------------------------------------------ arming
    def arm(self, proc, probe, addr: int) -> str | None:
        """Patch ``addr`` for ``probe`` in ``proc``; returns None when armed in-target, else the
        reason the probe must take the ptrace path there."""
        try:
            return self._arm(proc, probe, addr)
        except SiteRefused as e:
            reason = e.reason
        except (ProbeError, UbpfError) as e:
            reason = str(e)
        self.reasons.setdefault(probe.id, reason)
        return reason

    def _arm(self, proc, probe, addr: int) -> str | None:
        go = is_go_binary(probe.binary_path)
        if probe.is_return and go:
            raise SiteRefused(f"return probe on a Go binary: {GO_RETURN_REFUSAL}")
        shstk = _shadow_stack_enabled(proc.tgid)
        if probe.is_return and shstk:
            raise SiteRefused("return probes in a process with a CPU shadow stack (CET): a replaced return "
                              "address would fault")
        why = namespace_reason(proc.tgid, probe.target_reports_ids)
        if why is not None:
            raise SiteRefused(why)
        start, end, pad_end = _function_bounds(probe, addr)
        if probe.is_return and addr != start:
            raise SiteRefused("a return probe must sit on the function's first instruction")
        st = self._ready(proc)
        site = st.sites.get(addr)
        if site is not None:
            if probe.id in site.probe_ids:      # armed already (re-arm after dlopen and the like)
                return None
            if len(site.probes) >= SITE_MAX_PROBES:
                raise SiteRefused(f"more than {SITE_MAX_PROBES} probes at one address")
            self._add_to_site(site, self._probe_block(probe, addr, addr == start).addr)
            site.probe_ids.add(probe.id)
            return None
        reader = _reader(proc.mem)
        plan = plan_site(reader, start, end, addr, shadow_stack=shstk, pad_end=pad_end)
        self._check_threads(proc, addr, plan.length)
        pb = self._probe_block(probe, addr, addr == start)
        self._patch_site(proc, st, plan, pb, probe.id, red_zone=not go)
        return None

    def _patch_site(self, proc, st: ProcState, plan, pb, probe_id: int, red_zone: bool = True) -> None:
        """Give ``plan``'s site a SITE block holding ``pb`` and a trampoline, then write its jump."""
        addr = plan.site
        block = self.arena.alloc(SITE.size, 64)
        tramp = self._tramp_space(proc, st, addr)
        code = TR.build_entry_trampoline(plan, tramp, runtime_header=self.plan.header_addr,
                                         site_block=block.addr, return_trampoline=self.plan.ret_tramp_addr,
                                         red_zone=red_zone)
        if len(code) > TRAMP_PAGE // 4:
            raise SiteRefused("trampoline too large")
        self._commit_tramp(st, tramp, len(code))
        block.view[:SITE.size] = TR.site_block(plan, tramp, [pb.addr])
        write_code(proc.mem, tramp, code)
        orig = proc.mem.read(addr, plan.length)
        if orig is None:
            raise ProbeError(f"cannot read the site 0x{addr:x} in pid {proc.tgid}")
        patch = TR.patch_bytes(addr, tramp, plan.length)
        if self.on_patch is not None:     # the guardian learns it before it happens
            self.on_patch(proc.tgid, addr, orig, patch)
        write_code(proc.mem, addr, patch)
        st.sites[addr] = SiteState(addr, orig, tramp, block, [pb.addr], plan, len(code), {probe_id}, patch)

    # ------------------------------------------------------------------ the dynamic linker
    def arm_dl_watch(self, proc, addr: int, size: int) -> str | None:
        """Patch the dynamic linker's ``_dl_debug_state`` (at ``addr``, ``size`` bytes) with a jump whose
        "program" is the runtime's ``ubpf_dl_notify`` (runtime/dlnotify.c): dlopen/dlclose then tell
        the tracer without an int3.  Returns None when patched, else why not (keep the int3).
        Its jump may cover the alignment padding up to the next 16-byte boundary (the function
        is a lone ``ret``), never more."""
        if not self.dl_notify:
            return "the in-target image has no dynamic-linker notification"
        try:
            st = self._ready(proc)
            if addr in st.sites:
                return None
            end = addr + size
            plan = plan_site(_reader(proc.mem), addr, end, addr, shadow_stack=_shadow_stack_enabled(proc.tgid),
                             pad_end=(end + 15) & ~15)
            self._check_threads(proc, addr, plan.length)
            if self.dl_words is None:
                self.dl_words = self.arena.alloc(CACHE_LINE, CACHE_LINE)
            pb = self.arena.alloc(PROBE_BLOCK.size, 64)
            w = pb.view.cast("Q")
            w[PROBE_BLOCK.word("func_ip")] = addr
            w[PROBE_BLOCK.word("cookie")] = self.dl_words.addr
            w[PROBE_BLOCK.word("entry")] = self.dl_notify
            w[PROBE_BLOCK.word("flags")] = PB_F_AT_ENTRY
            w[PROBE_BLOCK.word("enabled")] = 1
            self._patch_site(proc, st, plan, pb, -1)
        except (SiteRefused, ProbeError, UbpfError) as e:
            return getattr(e, "reason", None) or str(e)
        return None

    def dl_pending(self) -> int:
        """Notifications not answered yet: the request count to answer with, or 0."""
        if self.dl_words is None:
            return 0
        w = self.dl_words.view.cast("Q")
        req = w[0]
        return req if req != w[1] else 0

    def dl_answer(self, req: int) -> None:
        """Release the threads waiting in ``ubpf_dl_notify`` for notifications up to ``req``."""
        self.dl_words.view.cast("Q")[1] = req
        futex_wake(self.dl_words.addr + 8)

    def _probe_block(self, probe, addr: int, at_entry: bool):
        pb = self.arena.alloc(PROBE_BLOCK.size, 64)
        w = pb.view.cast("Q")
        w[PROBE_BLOCK.word("func_ip")] = addr
        w[PROBE_BLOCK.word("cookie")] = probe.cookie
        w[PROBE_BLOCK.word("entry")] = probe.target_entry
        w[PROBE_BLOCK.word("flags")] = (PB_F_RETURN if probe.is_return else 0) | (PB_F_AT_ENTRY if at_entry else 0)
        w[PROBE_BLOCK.word("probe_id")] = probe.id
        w[PROBE_BLOCK.word("enabled")] = 1
        lines = pcpu_hit_lines()
        if lines:
            counters = self.arena.alloc(lines * CACHE_LINE, CACHE_LINE)
            self.pcpu_hits[pb.addr] = counters
            w[PROBE_BLOCK.word("pcpu_mask")] = lines - 1
            w[PROBE_BLOCK.word("pcpu_hits")] = counters.addr
        self.blocks.setdefault(probe.id, []).append(pb)
        return pb

    @staticmethod
    def _add_to_site(site: SiteState, pb_addr: int) -> None:
        w = site.block.view.cast("Q")
        n = len(site.probes)
        w[SITE.word("probes") + n] = pb_addr      # filled first, then published by the count
        w[SITE.word("nprobes")] = n + 1
        site.probes.append(pb_addr)

    def _check_threads(self, proc, addr: int, length: int) -> None:
        regs = P.RegsBuf()
        for t in proc.threads.values():
            if not t.stopped:
                raise SiteRefused("a thread of the target is running (cannot patch safely now)")
            with contextlib.suppress(P.PtraceError):
                regs.get(t.tid)
                rip = regs.vals[P.RIP]
                if addr < rip < addr + length:
                    raise SiteRefused(f"thread {t.tid} is inside the bytes to patch")

    def _tramp_space(self, proc, st: ProcState, near: int) -> int:
        for a, size in st.rt.pages.items():
            used = st.tramp_used.get(a, 0)
            if used + TRAMP_PAGE // 4 <= size and abs(a - near) < (1 << 31) - 2 * size:
                return a + used
        mapper = TargetMapper(proc.inj, proc.tgid)
        a = mapper.map_near(proc.any_stopped_tid(), near, TRAMP_PAGE, PROT_READ | PROT_EXEC)
        st.rt.pages[a] = TRAMP_PAGE
        return a

    @staticmethod
    def _commit_tramp(st: ProcState, tramp: int, size: int) -> None:
        for a, page_size in st.rt.pages.items():
            if a <= tramp < a + page_size:
                st.tramp_used[a] = tramp - a + (size + TRAMP_ALIGN - 1) // TRAMP_ALIGN * TRAMP_ALIGN

    # ------------------------------------------------------------------ counters
    def hits(self, probe_id: int) -> tuple[int, int]:
        """(programs run, hits missed) of a probe over all its site instances."""
        hits = missed = 0
        for pb in self.blocks.get(probe_id, ()):
            w = pb.view.cast("Q")
            hits += w[PROBE_BLOCK.word("hits")]
            missed += w[PROBE_BLOCK.word("missed")]
            counters = self.pcpu_hits.get(pb.addr)
            if counters is not None:
                hits += sum(counters.view.cast("Q")[::CACHE_LINE // 8])
        # modulo 2**64: a per-CPU program skipped for want of a CPU id takes its count back from
        # ``hits`` (runtime/cpuclaim.c), which the trampoline may not have added yet
        return hits & (2**64 - 1), missed

    def in_target(self, probe_id: int) -> bool:
        return bool(self.blocks.get(probe_id))

    # ------------------------------------------------------------------ fork / exec
    def follow_fork(self, parent, child_tgid: int, child_mem: P.ProcMem) -> None:
        """A followed fork child inherited our ranges and patches: track them, give it its pid."""
        pst = self.procs.get(parent.tgid)
        if pst is None:
            return
        rt = S.ProcRuntime(child_tgid, pst.rt.private, pst.rt.arena, pst.rt.image, dict(pst.rt.pages),
                           pst.rt.wipe_on_fork)
        cst = ProcState(rt, {a: SiteState(s.addr, s.orig, s.tramp, s.block, list(s.probes), s.plan, s.tramp_size,
                                          set(s.probe_ids), s.patch)
                             for a, s in pst.sites.items()},
                        dict(pst.tramp_used), pst.ready, pst.failed)
        self.procs[child_tgid] = cst
        if self.on_patch is not None:
            for s in cst.sites.values():
                self.on_patch(child_tgid, s.addr, s.orig, s.patch)
        if rt.private:
            S.fix_forked_header(child_mem, self.plan, child_tgid)
            S.open_gate(child_mem, self.plan)     # wiped by the fork: this child's programs run

    def clean_fork_child(self, parent, child_mem: P.ProcMem, forking_fs_base: int) -> None:
        """A fork child that is not followed: original bytes at every site, original return
        addresses on the forking thread's stack (the only thread a child has)."""
        pst = self.procs.get(parent.tgid)
        if pst is None:
            return
        for s in pst.sites.values():
            child_mem.write(s.addr, s.orig)
        if pst.ready:
            for slot, value in self._return_fixes(child_mem, forking_fs_base):
                child_mem.write(slot, _Q.pack(value))

    def forget(self, tgid: int) -> None:
        """The address space is gone (exec or exit): nothing of ours is left in it.  Its SITE blocks
        stay as they are: a followed fork child shares them with its parent, which still runs."""
        self.procs.pop(tgid, None)

    def forget_sites(self, tgid: int, gone) -> None:
        """Sites at addresses where ``gone(addr)`` (code unmapped by dlclose): a library mapped
        there later is patched afresh, and detach never writes old bytes into it."""
        st = self.procs.get(tgid)
        if st is None:
            return
        for addr in [a for a in st.sites if gone(a)]:
            self._disable_site(st.sites.pop(addr))

    @staticmethod
    def _disable_site(site: SiteState) -> None:
        site.block.view.cast("Q")[SITE.word("nprobes")] = 0

    # ------------------------------------------------------------------ detach
    def restore(self, proc, threads) -> None:
        """Put ``proc`` back (all ``threads`` stopped): bytes, return addresses, registers of threads
        inside our code, then unmap.  A thread that cannot be brought out keeps our mappings
        (never unmap code a thread is running)."""
        st = self.procs.get(proc.tgid)
        if st is None:
            return
        for s in st.sites.values():
            self._disable_site(s)
            write_code(proc.mem, s.addr, s.orig)
        regs = P.RegsBuf()
        stuck = False
        entries = [EntryTrampoline(s.tramp, s.tramp_size, s.plan) for s in st.sites.values()]
        ret = (self.plan.ret_tramp_addr, S.RET_TRAMP_RESERVE)
        for t in threads:
            try:
                regs.get(t.tid)
            except P.PtraceError:
                continue
            if st.ready:
                for slot, value in self._return_fixes(proc.mem, regs.vals[P.FS_BASE]):
                    proc.mem.write(slot, _Q.pack(value))
            rip = regs.vals[P.RIP]
            pos = locate(rip, entries, ret)
            if pos is not None and pos.resume_at is not None:
                regs.vals[P.RIP] = pos.resume_at     # same state as the original instruction
                regs.set(t.tid)
            elif self._inside(st, rip) and not self._step_out(st, t, regs):
                stuck = True
            elif self._on_runtime_stack(proc.mem, regs):
                # a signal handler interrupted a program: its frames are on our runtime stack (or
                # it returns into a trampoline); that memory must outlive the handler
                stuck = True
        st.sites.clear()
        if not stuck and proc.threads:
            mapper = TargetMapper(proc.inj, proc.tgid)
            with contextlib.suppress(UbpfError, OSError, P.PtraceError):
                S.uninstall(mapper, proc.any_stopped_tid(), self.plan, st.rt)
        self.procs.pop(proc.tgid, None)

    def _on_runtime_stack(self, mem: P.ProcMem, regs: P.RegsBuf) -> bool:
        """Is the thread (registers in ``regs``) running on its runtime stack, or inside a program
        call that a signal interrupted (THREAD_BLOCK.busy)?"""
        rsp = regs.vals[P.RSP]
        if self.plan.private_addr <= rsp < self.plan.private_addr + S.PRIVATE_SIZE:
            return True

        read = _strict_reader(mem)
        try:
            tb = find_thread_block(read, self.plan.header_addr, regs.vals[P.FS_BASE])
            return tb is not None and is_busy(read, tb)
        except ProbeError:
            return False

    def _return_fixes(self, mem: P.ProcMem, fs_base: int) -> list[tuple[int, int]]:
        """Stack slots of a thread still holding the return trampoline, with the original values."""
        read = _strict_reader(mem)
        try:
            tb = find_thread_block(read, self.plan.header_addr, fs_base)
            if tb is None:
                return []
            return [(f.addr, f.value) for f in return_fixes(read, tb, self.plan.ret_tramp_addr)]
        except ProbeError:
            return []

    def _inside(self, st: ProcState, rip: int) -> bool:
        p = self.plan
        if p.image_addr <= rip < p.image_addr + p.image_size:
            return True
        return any(a <= rip < a + size for a, size in st.rt.pages.items())

    def _step_out(self, st: ProcState, thread, regs: P.RegsBuf, budget_s: float = 2.0) -> bool:
        """Single-step a thread until it leaves our code (a program finishing its hit, a
        trampoline restoring registers); the sites are already restored, so it does not re-enter.
        A signal that arrives meanwhile (a terminal's Ctrl-C to the whole group) stops the step
        instead of the trap: it is kept for the detach (``Thread.pending_sig``), never dropped."""
        tid = thread.tid
        deadline = time.monotonic() + budget_s
        mem = P.ProcMem(tid)
        try:
            while time.monotonic() < deadline:
                pushf = mem.read(regs.vals[P.RIP], 1) == b"\x9c"
                try:
                    P.singlestep(tid)
                    _, status = os.waitpid(tid, P.WALL)
                except (P.PtraceError, ChildProcessError):
                    return False
                if not os.WIFSTOPPED(status):
                    return False
                sig = os.WSTOPSIG(status)
                if status >> 16 == 0 and sig != signal.SIGTRAP:
                    if not thread.pending_sig:
                        thread.pending_sig = sig
                    elif sig != thread.pending_sig:
                        thread.proc.inj.deferred_signals.append((tid, sig))
                regs.get(tid)
                if pushf:
                    # a pushfq run under single-step saved the trap flag; the trampoline's popfq
                    # would set it for real and the thread would die of SIGTRAP once released
                    top = mem.read(regs.vals[P.RSP], 8)
                    if top is not None:
                        mem.write(regs.vals[P.RSP], _Q.pack(_Q.unpack(top)[0] & ~X86_EFLAGS_TF))
                if not self._inside(st, regs.vals[P.RIP]):
                    return True
            return False
        finally:
            mem.close()
            # the kernel set TF for the steps: registers read now and written back later (an
            # injected system call restores what it saved) would make it the thread's own TF
            with contextlib.suppress(P.PtraceError):
                regs.get(tid)
                if regs.vals[P.EFLAGS] & X86_EFLAGS_TF:
                    regs.vals[P.EFLAGS] &= ~X86_EFLAGS_TF
                    regs.set(tid)

    def close(self) -> None:
        self.arena.close()


_libc = ctypes.CDLL(None, use_errno=True)
SYS_FUTEX, FUTEX_WAKE = 202, 1


def futex_wake(addr: int) -> None:
    """FUTEX_WAKE every waiter on the shared word at ``addr`` (arena memory: the target's mapping of
    the same file is the same futex)."""
    _libc.syscall(ctypes.c_long(SYS_FUTEX), ctypes.c_void_p(addr), ctypes.c_long(FUTEX_WAKE),
                  ctypes.c_long(0x7FFFFFFF), None, None, ctypes.c_long(0))


def _shadow_stack_enabled(pid: int) -> bool:
    """Does the process run with a CPU shadow stack (x86 CET user shadow stack)?"""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("x86_Thread_features:"):
                    return "shstk" in line.split(":", 1)[1].split()
    except OSError:
        pass
    return False


def _strict_reader(mem: P.ProcMem):
    """``read(addr, n)`` of the target's memory for the detach helpers: all of it, or ProbeError."""
    def read(addr: int, n: int) -> bytes:
        data = mem.read(addr, n)
        if data is None:
            raise ProbeError(f"cannot read 0x{addr:x} in pid {mem.pid}")
        return data
    return read


def _reader(mem: P.ProcMem):
    def read(addr: int, n: int) -> bytes:
        data = mem.read(addr, n)
        if data is None:   # near the end of a mapping: as much as there is
            while n > 1 and data is None:
                n -= 1
                data = mem.read(addr, n)
        return data or b""
    return read


def _function_bounds(probe, addr: int) -> tuple[int, int, int]:
    """The runtime [start, end) of the function holding the probe (end 0: size unknown), and where
    the next function or the end of its segment is (what follows ``end`` up to there is padding)."""
    from ubpf_py.probe.symbols import function_at, load_elf

    try:
        sym = function_at(probe.binary_path, probe.file_offset)
        info = load_elf(probe.binary_path)
    except UbpfError:
        sym = None
    if sym is None or sym.file_offset is None:
        return addr, 0, 0
    start = addr - (probe.file_offset - sym.file_offset)
    if not sym.size:
        return start, 0, 0
    end_off = sym.file_offset + sym.size
    nxt = min((s.file_offset for s in info.functions() if s.file_offset is not None and s.file_offset >= end_off),
              default=None)
    seg_end = next((seg.offset + seg.filesz for seg in info.segments
                    if seg.executable and seg.offset <= sym.file_offset < seg.offset + seg.filesz), end_off)
    pad_off = min(nxt, seg_end) if nxt is not None else seg_end
    return start, start + sym.size, start + (pad_off - sym.file_offset)


assert THREAD_BLOCK.size <= S.THREAD_SLOT_SIZE


def namespace_reason(tgid: int, kinds: frozenset[str]) -> str | None:
    """Why a program that reports ids of ``kinds`` ("pid", "uid") cannot run in ``tgid``: the
    process is in a child pid namespace (``NStgid`` in /proc lists more than one id) or a user
    namespace that maps ids (``uid_map`` is not the identity), where getpid()/getuid() in the
    target give other ids than the kernel's helpers (the initial namespaces', which is also what
    the tracer sees).  None: the target's ids are the tracer's."""
    try:
        if "pid" in kinds:
            with open(f"/proc/{tgid}/status") as f:
                ids = next((ln.split()[1:] for ln in f if ln.startswith("NStgid:")), [])
            if len(ids) > 1:
                return (f"the process is in a child pid namespace (pid {ids[-1]} there, {ids[0]} here): in "
                        f"the target its thread ids would be that namespace's, not the kernel's")
        if "uid" in kinds:
            for name in ("uid_map", "gid_map"):
                with open(f"/proc/{tgid}/{name}") as f:
                    if f.read().split() != ["0", "0", "4294967295"]:
                        return (f"the process is in a user namespace that maps ids ({name} is not the "
                                f"identity): in the target its uid/gid would be that namespace's, not the kernel's")
    except OSError:
        return None
    return None


def pcpu_hit_lines() -> int:
    """Hit-counter lines per probe: one per possible CPU (a power of two, at most
    PCPU_HIT_LINES_MAX; CPUs beyond share lines, still atomically), or 0 -- one shared
    counter -- when ``rdpid`` cannot tell the trampoline its CPU or there is one CPU."""
    if not cpu_has("rdpid"):
        return 0
    n = min(possible_cpus(), PCPU_HIT_LINES_MAX)
    return 0 if n <= 1 else 1 << (n - 1).bit_length()
