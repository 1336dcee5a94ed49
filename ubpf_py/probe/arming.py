"""Arming probes in a process: int3 breakpoints (each with its displaced-instruction plan and
out-of-line slot), in-target jumps, USDT semaphores, and the dynamic linker's breakpoint.

``Armer`` is the only writer of a process's breakpoint table (``Proc.bps``); the tracer reads
it on every hit and mirrors it into the C loop.  It is owned by ``tracer.Tracer`` and given
what it needs: the probe table, a callback for "the table changed" (the C loop's mirror must be
rebuilt) and the handler for the dynamic linker's breakpoint (the tracer's: it stops and resumes
threads).  The in-target engine, when there is one, is passed per call: the session creates it
after the tracer.
"""

from __future__ import annotations

from collections.abc import Callable

from ubpf_py.errors import ProbeError
from ubpf_py.probe import ool as O
from ubpf_py.probe.breakpoints import Breakpoint, Probe
from ubpf_py.probe.procmaps import code_addresses, file_offset_to_addr, is_dynamic_linker, read_maps
from ubpf_py.probe.procs import Proc, Thread

_ENDBR64 = b"\xf3\x0f\x1e\xfa"


class Armer:
    """Puts probes into processes; see the module docstring."""

    def __init__(self, probes: dict[int, Probe], on_change: Callable[[], None],
                 on_dl_state: Callable[[Thread], None]) -> None:
        self.probes = probes
        self.on_change = on_change
        self.on_dl_state = on_dl_state
        #: guardian hook, called before an int3 is written: (proc, addr, original byte)
        self.on_arm: Callable[[Proc, int, int], None] | None = None
        self._dl_offsets: dict[str, int | None] = {}

    def arm_probe(self, proc: Proc, probe: Probe, maps=None, intarget=None) -> int:
        """Arm ``probe`` at every current mapping of its file in ``proc``; returns how many.
        ``intarget``: the in-target engine, which patches the site with a jump when it can."""
        if maps is None:
            maps = read_maps(proc.tgid)
        n = 0
        if probe.ref_ctr_offset:
            self._bump_semaphores(proc, probe, maps)
        for addr in code_addresses(maps, probe.binary_path, probe.file_offset):
            if probe.target_entry and intarget is not None:
                reason = intarget.arm(proc, probe, addr)   # a jump to a trampoline, no stop per hit
                if reason is None:
                    n += 1
                    continue
                if probe.handler is None and not probe.native_fn:
                    raise ProbeError(f"probe at 0x{addr:x} cannot run in the target: {reason}")
            bp = self.breakpoint(proc, addr)
            lst = bp.ret_probes if probe.is_return else bp.probes
            if probe not in lst:
                self.on_change()
                if probe.is_return:
                    proc.scratch.ensure(proc.any_stopped_tid(), proc.tgid)
                lst.append(probe)
                n += 1
        return n

    def arm_all(self, proc: Proc, intarget=None, dl_in_target: bool = False) -> None:
        """Arm every probe whose file is mapped in ``proc`` (after attach/exec/dlopen)."""
        maps = read_maps(proc.tgid)
        for probe in self.probes.values():
            self.arm_probe(proc, probe, maps, intarget)
        self.arm_dl_watch(proc, maps, intarget if dl_in_target else None)

    def forget_unmapped(self, proc: Proc, unmapped: Callable[[int], bool], ret_log=None) -> None:
        """Forget breakpoints whose code was unmapped (dlclose): the bytes went with the mapping,
        and a library mapped there again must be patched afresh.  ``ret_log``: the guardian's."""
        for addr, bp in list(proc.bps.items()):
            if unmapped(addr):
                bp.armed = False
                del proc.bps[addr]
                self.on_change()
                if ret_log is not None:
                    ret_log.remove_bp(proc.tgid, addr)

    def _bump_semaphores(self, proc: Proc, probe: Probe, maps) -> None:
        """Increment the probe's USDT semaphore in every writable mapping of its file, once (the
        kernel's ref_ctr_offset behaviour): the target then computes the probe's arguments."""
        for a in file_offset_to_addr(maps, probe.binary_path, probe.ref_ctr_offset, writable=True):
            if (probe.id, a) in proc.sema_done:
                continue
            cur = proc.mem.read(a, 2)
            if cur is None or not proc.mem.write(a, ((int.from_bytes(cur, "little") + 1) & 0xFFFF).to_bytes(2, "little")):
                raise ProbeError(f"cannot increment the USDT semaphore at 0x{a:x} in pid {proc.tgid}")
            proc.sema_done.add((probe.id, a))
            proc.semas[a] = proc.semas.get(a, 0) + 1

    def breakpoint(self, proc: Proc, addr: int) -> Breakpoint:
        """The breakpoint at ``addr`` in ``proc``, armed now if it was not: the displaced
        instruction decoded into its plan (and copied into an out-of-line slot if it needs one),
        then the int3 written."""
        bp = proc.bps.get(addr)
        if bp is not None:
            return bp
        # up to 16 bytes (the longest x86 instruction), but not past the end of the mapping
        code = proc.mem.read(addr, 16) or proc.mem.read(addr, min(16, 4096 - (addr & 4095)))
        if code is None:
            raise ProbeError(f"cannot read target memory at 0x{addr:x} (pid {proc.tgid})")
        if code[0] == 0xCC:
            raise ProbeError(f"0x{addr:x} in pid {proc.tgid} already holds an int3 (another debugger?)")
        plan = O.analyze(code, addr)
        if plan.needs_slot:
            tid = proc.any_stopped_tid()
            slot = proc.scratch.alloc_slot(tid, proc.tgid, addr)
            data = O.slot_code(plan, slot, O.disp_offset(plan))
            if not proc.mem.write(slot, data):
                raise ProbeError(f"cannot write out-of-line slot 0x{slot:x} in pid {proc.tgid}")
            plan.slot = slot
            page = proc.scratch.page_of(slot)
            if page is not None:
                page.users[slot] = plan
        bp = Breakpoint(addr, bytes(code[:plan.length]), plan,
                        at_entry=code[0] == 0x55 or code[:4] == _ENDBR64)
        if self.on_arm is not None:
            self.on_arm(proc, addr, bp.orig[0])
        if not proc.mem.write(addr, b"\xcc"):
            raise ProbeError(f"cannot write int3 at 0x{addr:x} in pid {proc.tgid}")
        bp.armed = True
        proc.bps[addr] = bp
        self.on_change()
        return bp

    def arm_dl_watch(self, proc: Proc, maps=None, intarget=None, ret_log=None) -> None:
        """Watch the dynamic linker's _dl_debug_state (called around every dlopen/dlclose): with
        ``intarget``, by a jump into the runtime's notification (``InTargetEngine.arm_dl_watch``;
        an int3 armed there before is removed), else -- or when that is refused -- by an int3.
        ``ret_log``: the guardian's record (a removed int3 leaves it)."""
        from ubpf_py.probe.symbols import function_at, resolve_function
        if maps is None:
            maps = read_maps(proc.tgid)
        for path in {m.path for m in maps if m.is_file and is_dynamic_linker(m.path)}:
            if path not in self._dl_offsets:
                try:
                    off = resolve_function(path, "_dl_debug_state")
                    sym = function_at(path, off)
                    self._dl_offsets[path] = (off, sym.size if sym is not None and sym.file_offset == off else 0)
                except Exception:
                    self._dl_offsets[path] = None
            found = self._dl_offsets[path]
            if found is None:
                continue
            off, size = found
            for addr in code_addresses(maps, path, off):
                if intarget is not None and size:
                    self._drop_int3(proc, addr, ret_log)      # the site is planned on the original bytes
                    if intarget.arm_dl_watch(proc, addr, size) is None:
                        continue
                bp = self.breakpoint(proc, addr)
                bp.internal = self.on_dl_state

    def _drop_int3(self, proc: Proc, addr: int, ret_log) -> None:
        """Put back the byte under our int3 at ``addr`` (no thread is stopped on it)."""
        bp = proc.bps.pop(addr, None)
        if bp is None:
            return
        if bp.armed and not proc.mem.write(addr, bp.orig[:1]):
            raise ProbeError(f"cannot restore the byte at 0x{addr:x} in pid {proc.tgid}")
        bp.armed = False
        self.on_change()
        if ret_log is not None:
            ret_log.remove_bp(proc.tgid, addr)
