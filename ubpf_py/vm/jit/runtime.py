"""``JitProgram``: a BPF program compiled by llvmlite, bound to one ``ExecEnv``.

Per instance (compiled code itself is shared through ``cache.CODE_CACHE``):

* a 4 KiB stack (8 frames x 512 bytes), a ``HostBuffer`` registered in
  ``env.memory`` as region ``"jit stack"`` so helpers can read keys on it;
* the runtime block (``layout``): status, stack bounds, region table, helper table;
* one ctypes ``CFUNCTYPE`` trampoline per helper the program calls (plus the
  engine's own bpf_tail_call and callx dispatchers and the fault notifier).

Memory checks (checked mode, the default; see ``ir_mem`` for the code shape):
r10-relative constant-offset accesses are proven safe at compile time; every
other access is tested inline against two one-entry region caches (last region
read / written), and a miss searches a native copy of ``env.memory``'s regions
(start, end, writable; binary search).  The copy is refreshed -- and the caches
reset to the stack -- whenever ``MemoryMap.version`` changes, which is checked at
the start of ``run()`` and after every helper call, the only points where
regions can change while a program runs.  A failed check skips the access,
records the fault in the runtime block, calls a notifier and unwinds; ``run()``
then raises ``VMFault`` with the instruction index.  ``check_memory=False``
trusts the verifier.

Abnormal exits never need polling on the fast path: anything abnormal (native
fault, helper exception) calls back into Python, which sets a closure flag that
``run()`` tests once after the native call.

Tail calls and callbacks follow docs/ARCHITECTURE.md; the bookkeeping they need
(``env.invoke_callback`` swap, top-level ``tail_call_count`` reset) is only done
by programs that can use them, so plain programs keep the minimal call path.
"""

from __future__ import annotations

import ctypes
import os
import struct
import weakref
from concurrent.futures import Future
from typing import Any

from ubpf_py.errors import HelperError, NotSupportedError, VMFault
from ubpf_py.isa.instruction import Instruction
from ubpf_py.isa.opcodes import MAX_TAIL_CALLS
from ubpf_py.maps import descriptor as _descriptor
from ubpf_py.vm import memory as _memory
from ubpf_py.vm.budget import runaway_fault
from ubpf_py.vm.env import ExecEnv
from ubpf_py.vm.jit import backend as _backend
from ubpf_py.vm.jit import fastpath as _fastpath
from ubpf_py.vm.jit import layout as L
from ubpf_py.vm.jit.cache import CODE_CACHE, FUNC_TYPE, CompiledCode
from ubpf_py.vm.jit.compiler import TAIL_CALL_HELPER
from ubpf_py.vm.jit.native_hit import build_wrapper, ineligible_reason

MASK = (1 << 64) - 1
_U64 = ctypes.c_uint64
HELPER_TYPE = ctypes.CFUNCTYPE(_U64, _U64, _U64, _U64, _U64, _U64)
CALLX_TYPE = ctypes.CFUNCTYPE(_U64, _U64, _U64, _U64, _U64, _U64, _U64)
NOTIFY_TYPE = ctypes.CFUNCTYPE(None)


class _Unwound(Exception):
    """Raised out of ``invoke_callback`` when the callback faulted natively; the
    fault is already recorded in the runtime block, this only stops the helper."""


class JitProgram:
    """A program JIT-compiled to native code; implements ``vm.env.Executable``.

    ``run(r1, r2=0, r3=0, r4=0, r5=0) -> r0`` (u64) has the interpreter's
    semantics.  ``opt_level`` picks the LLVM pipeline (``backend.OPT_LEVELS``), or
    ``"tiered"``: start on "fast" code at once and switch to O2 code when a
    background compile finishes (``wait_for_tier2``).
    """

    def __init__(self, insns: list[Instruction], env: ExecEnv, *, check_memory: bool = True,
                 opt_level: str = _backend.DEFAULT_OPT_LEVEL, budget: int | None = None,
                 name: str = "prog") -> None:
        self.env = env
        self.check_memory = check_memory
        self.insns = list(insns)
        self.name = name
        #: back-edges one run may take (unverified programs; None = unbounded, no cost)
        self.budget = budget
        mode = (L.CHECK_MEMORY if check_memory else 0) | (L.BUDGET if budget else 0)
        if opt_level not in _backend.PROGRAM_LEVELS:
            raise NotSupportedError(f"JIT optimisation level {opt_level!r} (use one of "
                                    f"{', '.join(_backend.PROGRAM_LEVELS)})")
        self._tier2: Future[CompiledCode] | None = None
        if opt_level == "tiered":
            self.code, self._tier2 = CODE_CACHE.get_tiered(insns, mode)
        else:
            self.code = CODE_CACHE.get(insns, mode, opt_level)
        self._callback_addrs = set(self.code.callback_addrs)
        plan = self.code.layout
        missing = [h for h in plan.helper_ids if h != TAIL_CALL_HELPER and h not in env.helpers]
        if missing:
            raise HelperError(f"helper {_helper_label(missing[0])} called by the program is not "
                              "available in this runtime; provide it in ExecEnv.helpers or remove the call")
        self.stack = _memory.HostBuffer(L.STACK_TOTAL)
        self.stack_region = env.memory.add(_memory.Region.of(self.stack, "jit stack"))
        self._finalizer = weakref.finalize(self, env.memory.remove, self.stack_region)
        self._rt = (_U64 * L.NUM_SLOTS)()
        self._rt_addr = ctypes.addressof(self._rt)
        self._rt[L.SLOT_STACK_LO] = self.stack.addr
        self._rt[L.SLOT_BUDGET_INIT] = budget or 0
        self._rt[L.SLOT_ENTRY_FP] = self.stack.addr + L.STACK_TOTAL
        for start, limit in ((L.SLOT_RCACHE_START, L.SLOT_RCACHE_LIMIT), (L.SLOT_WCACHE_START, L.SLOT_WCACHE_LIMIT)):
            self._rt[start] = self.stack.addr   # region caches start as the stack
            self._rt[limit] = L.STACK_TOTAL - 8
        self._keep: list[Any] = []          # ctypes objects native code points at
        self._region_table: Any = None
        self._pending: BaseException | None = None
        self._ctx = 0
        self._callbacks: dict[int, Any] = {}
        self._facts: int = self._setup_fast_paths()
        self._build()
        if self._tier2 is not None:
            ref = weakref.ref(self)
            self._tier2.add_done_callback(lambda fut: _upgrade(ref, fut))

    # ------------------------------------------------------------------ set-up
    def _setup_fast_paths(self) -> int:
        """Enable the native helper fast paths (``fastpath``) this instance may use:
        only where ``env.helpers`` holds the standard implementation, and map lookups
        only for maps of ``env.maps_by_addr`` whose descriptor has a native kind.
        Returns which hit facts ``run()`` must copy into the runtime block (``_FACTS_*``)."""
        env, rt, plan = self.env, self._rt, self.code.layout
        std = _fastpath.is_standard
        flags = 0
        for hid in plan.fast_helpers:
            if std(env.helpers.get(hid), hid):
                flags |= _fastpath.FAST_BITS[hid]
        rt[L.SLOT_FAST_FLAGS] = flags
        group = _fastpath.MAP_GROUP
        table = (_U64 * (group * len(plan.map_consts) or 1))()
        for k, handle in enumerate(plan.map_consts):
            m = env.maps_by_addr.get(handle)
            if m is None or getattr(m, "handle_addr", None) != handle or getattr(m, "holds_maps", True):
                continue
            kind = _U64.from_address(handle).value
            for hid, which in _fastpath.MAP_HELPERS.items():
                wanted = kind == _descriptor.KIND_RINGBUF if hid == 130 else \
                    kind in (_descriptor.KIND_ARRAY, _descriptor.KIND_HASH)
                if wanted and std(env.helpers.get(hid), hid):
                    table[group * k + which] = handle
        self._keep.append(table)
        self._fast_maps = table
        rt[L.SLOT_FAST_MAPS] = ctypes.addressof(table)
        rt[L.SLOT_RNG] = int.from_bytes(os.urandom(8), "little") | 1
        rt[L.SLOT_CLOCK_FN] = _clock_gettime_addr()
        slots = {slot for h, slot in _fastpath.FACT_SLOTS.items() if flags & _fastpath.FAST_BITS[h]}
        percpu_maps = any(table[k] and getattr(env.maps_by_addr.get(table[k]), "percpu", False)
                          for k in range(group * len(plan.map_consts)))
        if percpu_maps:
            slots.add(L.SLOT_CPU)
        # what run() copies from env.hit: nothing, one slot, or all five (one pack_into)
        if not slots:
            return 0
        if slots == {L.SLOT_CPU}:
            return _FACTS_CPU
        if slots == {L.SLOT_PID_TGID}:
            return _FACTS_PID
        return _FACTS_ALL

    @property
    def native_paths(self) -> dict[str, Any]:
        """Which fast paths this instance uses: helper ids and map handles (for tests/tools)."""
        plan, rt = self.code.layout, self._rt
        return {"helpers": tuple(h for h in plan.fast_helpers
                                 if rt[L.SLOT_FAST_FLAGS] & _fastpath.FAST_BITS[h]),
                "maps": self._fast_handles(1), "map_updates": self._fast_handles(2),
                "ringbuf_output": self._fast_handles(130)}

    def _fast_handles(self, hid: int) -> tuple[int, ...]:
        g, w = _fastpath.MAP_GROUP, _fastpath.MAP_HELPERS[hid]
        return tuple(h for k, h in enumerate(self.code.layout.map_consts) if self._fast_maps[g * k + w])

    def _build(self) -> None:
        """Create the trampolines and the ``run`` closure.

        State the hot path touches lives in closure cells (fastest Python access).
        """
        env, rt, plan, code = self.env, self._rt, self.code.layout, self.code
        mem = env.memory
        checked = self.check_memory
        entry, entry1, rt_addr = code.entry, code.entry1, self._rt_addr
        callback_addrs = self._callback_addrs
        abnormal = False
        synced = -1

        def sync() -> None:
            nonlocal synced
            regions = mem.regions
            table = (_U64 * (3 * len(regions) or 1))()
            for i, r in enumerate(regions):
                table[3 * i] = r.start
                table[3 * i + 1] = r.end
                table[3 * i + 2] = 1 if r.writable else 0
            self._region_table = table
            rt[L.SLOT_REGIONS] = ctypes.addressof(table)
            rt[L.SLOT_REGION_COUNT] = len(regions)
            # the inline region caches may name a region that is gone: back to the stack
            lo = rt[L.SLOT_STACK_LO]
            rt[L.SLOT_RCACHE_START] = rt[L.SLOT_WCACHE_START] = lo
            rt[L.SLOT_RCACHE_LIMIT] = rt[L.SLOT_WCACHE_LIMIT] = L.STACK_TOTAL - 8
            synced = mem.version

        def notify() -> None:
            nonlocal abnormal
            abnormal = True

        def fail(exc: BaseException, helper: int | None = None) -> None:
            """Record a Python exception raised under native code; unwind.  A VMFault
            without a pc gets the helper call's pc (as the interpreter reports it)."""
            nonlocal abnormal
            if rt[L.SLOT_STATUS] == L.STATUS_OK:
                if isinstance(exc, VMFault) and exc.pc is None:
                    where = f"helper {helper}" if helper is not None else "a helper"
                    wrapped = VMFault(f"in {where}: {exc.reason}", rt[L.SLOT_CALL_PC])
                    wrapped.__cause__ = exc
                    exc = wrapped
                self._pending = exc
                rt[L.SLOT_STATUS] = L.STATUS_EXCEPTION
            abnormal = True

        def finish() -> None:
            """Turn the recorded abnormal exit into the exception ``run()`` raises."""
            nonlocal abnormal
            abnormal = False
            status = rt[L.SLOT_STATUS]
            rt[L.SLOT_STATUS] = L.STATUS_OK
            rt[L.SLOT_TAIL_HIT] = 0
            pending, self._pending = self._pending, None
            if status == L.STATUS_FAULT:
                raise self._fault_error()
            if pending is not None:
                raise pending
            raise VMFault("JIT code stopped abnormally without a recorded reason")

        helpers = env.helpers
        native_slot, cpu_slot = L.SLOT_NATIVE, L.SLOT_CPU

        def helper_tramp(hid: int) -> Any:
            # looked up per call, like the interpreter: env.helpers may be replaced later
            def tramp(a: int, b: int, c: int, d: int, e: int) -> int:
                if rt[native_slot]:     # called from the C loop: env.hit was not filled
                    env.hit.cpu = rt[cpu_slot]
                fn = helpers.get(hid)
                if fn is None:
                    fail(HelperError(f"helper {hid} is not available in this runtime (instruction "
                                     f"{rt[L.SLOT_CALL_PC]}); remove the call or provide the helper"))
                    return 0
                try:
                    r = fn(a, b, c, d, e) & MASK
                except BaseException as exc:
                    fail(exc, hid)
                    return 0
                if checked and mem.version != synced:
                    sync()
                return r
            return HELPER_TYPE(tramp)

        def call_function(fnptr: int, a: int, b: int, c: int, d: int, e: int) -> int:
            """Run one of the program's BPF functions in a new frame below the caller's."""
            fn = self._callbacks.get(fnptr)
            if fn is None:
                if fnptr not in callback_addrs:
                    raise VMFault(f"callback 0x{fnptr:x} is not a function of this program")
                fn = self._callbacks[fnptr] = FUNC_TYPE(fnptr)
            cur = rt[L.SLOT_CUR_FP]
            nfp = cur - L.FRAME_SIZE
            if nfp < rt[L.SLOT_STACK_LO] + L.FRAME_SIZE:
                raise VMFault("call depth exceeds the maximum of 8 frames (in a callback)")
            if checked and mem.version != synced:
                sync()
            try:
                return fn(a, b, c, d, e, nfp, rt_addr)
            finally:
                rt[L.SLOT_CUR_FP] = cur

        def callx(value: int, a: int, b: int, c: int, d: int, e: int) -> int:
            """callx: a function pointer of this program, or (bpf_conformance) a helper id."""
            try:
                if value in callback_addrs:
                    return call_function(value, a, b, c, d, e)
                fn = env.helpers.get(value) if value < 1 << 31 else None
                if fn is None or value == TAIL_CALL_HELPER:
                    raise VMFault(f"callx target 0x{value:x} is neither a function of this program "
                                  "nor an available helper", rt[L.SLOT_CALL_PC])
                r = fn(a, b, c, d, e) & MASK
            except BaseException as exc:
                fail(exc, value)
                return 0
            if checked and mem.version != synced:
                sync()
            return r

        def tail_call(a: int, b: int, c: int, d: int, e: int) -> int:
            try:
                resolve = env.resolve_tail_call
                target = resolve(b, c & 0xFFFFFFFF) if resolve is not None else None
                if target is None or env.tail_call_count >= MAX_TAIL_CALLS:
                    return 0
                env.tail_call_count += 1
                if target is self:   # reuse the tail-calling frame, as the kernel does
                    saved = rt[L.SLOT_ENTRY_FP]
                    rt[L.SLOT_ENTRY_FP] = rt[L.SLOT_CUR_FP]
                    try:
                        r0 = target.run(self._ctx)
                    finally:
                        rt[L.SLOT_ENTRY_FP] = saved
                else:
                    r0 = target.run(self._ctx)
                rt[L.SLOT_TAIL_HIT] = 1
            except BaseException as exc:
                fail(exc)
                return 0
            if checked and mem.version != synced:
                sync()
            return r0 & MASK

        def invoke_callback(fnptr: int, a: int = 0, b: int = 0, c: int = 0, d: int = 0,
                            e: int = 0) -> int:
            """``env.invoke_callback`` while this program runs (bpf_loop and friends)."""
            r0 = call_function(fnptr, a, b, c, d, e)
            if rt[L.SLOT_STATUS] != L.STATUS_OK:
                raise _Unwound("callback stopped abnormally")
            return r0

        tables = []
        for hid in plan.helper_ids:
            if hid == TAIL_CALL_HELPER:
                tables.append(HELPER_TYPE(tail_call))
            else:
                tables.append(helper_tramp(hid))
        htab = (_U64 * (len(tables) or 1))(*[ctypes.cast(t, ctypes.c_void_p).value for t in tables])
        notifier = NOTIFY_TYPE(notify)
        callx_fn = CALLX_TYPE(callx)
        self._keep += [*tables, htab, notifier, callx_fn]
        rt[L.SLOT_HELPERS] = ctypes.addressof(htab)
        rt[L.SLOT_FAULT_FN] = ctypes.cast(notifier, ctypes.c_void_p).value
        rt[L.SLOT_CALLX_FN] = ctypes.cast(callx_fn, ctypes.c_void_p).value
        self.invoke_callback = invoke_callback

        def switch_code(new: CompiledCode) -> None:
            """Use ``new`` (same program, other optimisation level) from the next run on."""
            nonlocal entry, entry1
            callback_addrs.update(new.callback_addrs)
            entry, entry1 = new.entry, new.entry1
            self.code = new

        self._switch_code = switch_code
        self._finish = finish

        def sync_if_needed() -> None:
            if checked and mem.version != synced:
                sync()

        self.native_sync = sync_if_needed

        if self._facts:
            # native fact helpers / per-CPU map paths read env.hit from the runtime block
            pack, facts_off = _FACTS.pack_into, L.SLOT_CPU * 8
            facts = self._facts
            cpu_slot, pid_slot = L.SLOT_CPU, L.SLOT_PID_TGID

            def run(r1: int, r2: int = 0, r3: int = 0, r4: int = 0, r5: int = 0) -> int:
                if checked and mem.version != synced:
                    sync()
                h = env.hit
                if facts == _FACTS_CPU:
                    rt[cpu_slot] = h.cpu
                elif facts == _FACTS_PID:
                    rt[pid_slot] = h.tgid << 32 | h.tid
                else:
                    pack(rt, facts_off, h.cpu, h.tgid << 32 | h.tid, h.gid << 32 | h.uid,
                         h.func_ip & MASK, h.cookie & MASK)
                r0 = entry(r1, r2, r3, r4, r5, rt_addr) if r2 or r3 or r4 or r5 else entry1(r1, rt_addr)
                if abnormal:
                    finish()
                return r0
        elif checked:
            def run(r1: int, r2: int = 0, r3: int = 0, r4: int = 0, r5: int = 0) -> int:
                if mem.version != synced:
                    sync()
                r0 = entry(r1, r2, r3, r4, r5, rt_addr) if r2 or r3 or r4 or r5 else entry1(r1, rt_addr)
                if abnormal:
                    finish()
                return r0
        else:
            def run(r1: int, r2: int = 0, r3: int = 0, r4: int = 0, r5: int = 0) -> int:
                r0 = entry(r1, r2, r3, r4, r5, rt_addr) if r2 or r3 or r4 or r5 else entry1(r1, rt_addr)
                if abnormal:
                    finish()
                return r0

        if plan.uses_callbacks or plan.uses_tail_call:
            plain = run
            callbacks = plan.uses_callbacks

            def run(r1: int, r2: int = 0, r3: int = 0, r4: int = 0, r5: int = 0) -> int:
                top = env.tail_call_count == 0
                old_cb = env.invoke_callback
                saved_ctx = self._ctx
                self._ctx = r1
                if callbacks:
                    env.invoke_callback = invoke_callback
                try:
                    return plain(r1, r2, r3, r4, r5)
                finally:
                    self._ctx = saved_ctx
                    env.invoke_callback = old_cb
                    if top:
                        env.tail_call_count = 0

        self.run = run

    def wait_for_tier2(self, timeout: float | None = None) -> bool:
        """Block until tiered compilation has switched this program to its O2 code
        (True), or the timeout passed (False).  True at once when not tiered."""
        if self._tier2 is None:
            return True
        self._tier2.result(timeout)   # raises the compile error, if any
        self._switch_code(self._tier2.result())
        return True

    # ------------------------------------------------------------------ native hit path
    def native_ineligible(self) -> str | None:
        """Why this instance cannot run from the probe engine's C loop (``native_hit``), or None."""
        return ineligible_reason(self.code.layout, self.native_paths["helpers"], self.env.helpers)

    def native_entry(self) -> int:
        """Address of ``uint64_t f(uint64_t ctx)`` running this instance with no Python per call
        (``vm/jit/native_hit.py``).  The caller fills the facts block (``native_facts_addr``)
        before each call, tests ``native_status_addr`` after it (non-zero: call
        ``raise_native_fault``) and calls ``native_sync()`` whenever Python may have changed
        ``env.memory`` between calls.  Raises NotSupportedError for ineligible programs."""
        reason = self.native_ineligible()
        if reason is not None:
            raise NotSupportedError(f"native hit path for this program: {reason}")
        addr = getattr(self, "_native_addr", 0)
        if not addr:
            # the wrapper binds today's code: with tiered compilation, bind the O2 code
            self.wait_for_tier2()
            entry1 = ctypes.cast(self.code.entry1, ctypes.c_void_p).value or 0
            addr = self._native_addr = build_wrapper(entry1, self._rt_addr)
        self.native_sync()
        return addr

    @property
    def native_facts_addr(self) -> int:
        """The five fact words (layout.FACTS_FIRST_SLOT..) the native caller fills per hit."""
        return self._rt_addr + 8 * L.FACTS_FIRST_SLOT

    @property
    def native_status_addr(self) -> int:
        """u64 that is non-zero after a native call that faulted or whose helper raised."""
        return self._rt_addr + 8 * L.SLOT_STATUS

    def raise_native_fault(self) -> None:
        """After a failed native call: raise what ``run()`` would have raised (and reset)."""
        self._finish()

    def _fault_error(self) -> VMFault:
        rt = self._rt
        pc, addr, info = rt[L.SLOT_FAULT_PC], rt[L.SLOT_FAULT_ADDR], rt[L.SLOT_FAULT_INFO]
        if info >> 16 == L.FAULT_CALL_DEPTH:
            return VMFault("call depth exceeds the maximum of 8 frames", pc)
        if info >> 16 == L.FAULT_BUDGET:
            return runaway_fault(self.name, self.budget or 0, "backward jumps", pc, self.insns)
        size, write = info & 0xFF, bool(info >> 8 & 1)
        try:
            self.env.memory.check(addr, size, write, pc)
        except VMFault as exc:
            return exc
        return VMFault(f"{'write' if write else 'read'} of {size} bytes at 0x{addr:x} was refused", pc)

    # ------------------------------------------------------------------ API
    def run(self, r1: int, r2: int = 0, r3: int = 0, r4: int = 0, r5: int = 0) -> int:  # pragma: no cover
        """Replaced per instance by the closure built in ``_build``."""
        raise NotImplementedError

    def llvm_ir(self, optimised: bool = True) -> str:
        """The LLVM IR of this program (after the optimisation pipeline of its current
        level, or as generated), for debugging the JIT."""
        from ubpf_py.vm.jit.compiler import module_header, program_ir

        text = module_header() + program_ir(self.insns, "dump", self.check_memory)[0]
        if not optimised:
            return text
        return _backend.backend().ir_after_optimisation(text, self.code.level)

    def close(self) -> None:
        """Unregister the stack region (also done automatically when collected)."""
        self._finalizer()

    @property
    def helper_ids(self) -> tuple[int, ...]:
        return self.code.layout.helper_ids


_FACTS = struct.Struct("<5Q")
#: which hit facts run() copies (see ``_setup_fast_paths``)
_FACTS_CPU, _FACTS_PID, _FACTS_ALL = 1, 2, 3
_CLOCK_ADDR: list[int] = []


def _clock_gettime_addr() -> int:
    """Address of libc ``clock_gettime`` (what the native ktime helpers call)."""
    if not _CLOCK_ADDR:
        fn = ctypes.CDLL(None).clock_gettime
        _CLOCK_ADDR.append(ctypes.cast(fn, ctypes.c_void_p).value or 0)
    return _CLOCK_ADDR[0]


def _upgrade(ref: weakref.ReferenceType[JitProgram], future: Future[CompiledCode]) -> None:
    """Tier-2 completion callback (background thread): switch a live program to the O2 code.
    A failed background compile leaves the program on its working tier-1 code."""
    prog = ref()
    if prog is None or future.cancelled() or future.exception() is not None:
        return
    prog._switch_code(future.result())


def _helper_label(helper_id: int) -> str:
    """``12 (bpf_tail_call)``-style label for messages (just the id if names are unknown)."""
    try:
        from ubpf_py.helpers.names import HELPER_NAMES
    except ImportError:  # pragma: no cover - helpers package is optional for the VM
        return str(helper_id)
    name = HELPER_NAMES.get(helper_id)
    return f"{helper_id} ({name})" if name else str(helper_id)
