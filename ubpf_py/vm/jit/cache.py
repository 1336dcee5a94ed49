"""Compiled-code cache: the same bytecode is compiled once per process.

Key = BLAKE2b of the encoded bytecode (which already contains every relocated
constant: map handles and value addresses are lddw immediates) + the memory
mode + the optimisation level.  Compiled code holds no per-instance state (see
``layout``), so every ``JitProgram`` built from the same bytecode shares it.

``precompile`` puts many programs into one LLVM module: per-module costs
(parse set-up, pass-manager construction, object emission and relocation) are
then paid once, which is what makes differential testing of 10,000 programs
affordable.

Tiered compilation (``get_tiered``): the program is compiled at "fast" (cheap,
O0 code generation) and returned at once, while a background thread compiles
it at O2; instances switch to the O2 code when it is ready.  Load latency is
that of "fast", steady-state speed that of O2.
"""

from __future__ import annotations

import ctypes
import hashlib
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from ubpf_py.isa.instruction import Instruction, encode
from ubpf_py.isa.validate import validate
from ubpf_py.vm.jit import backend as _backend
from ubpf_py.vm.jit import layout
from ubpf_py.vm.jit.compiler import ProgramLayout, module_header, program_ir

#: ``u64 entry(r1, r2, r3, r4, r5, rt)``.  PYFUNCTYPE keeps the GIL (helpers are Python
#: anyway) and ``c_void_p`` arguments convert several times faster than ``c_uint64``.
ENTRY_TYPE = ctypes.PYFUNCTYPE(ctypes.c_uint64, *([ctypes.c_void_p] * 6))
ENTRY1_TYPE = ctypes.PYFUNCTYPE(ctypes.c_uint64, ctypes.c_void_p, ctypes.c_void_p)
#: a BPF function as a callback target: ``u64 f(r1..r5, fp, rt)``
FUNC_TYPE = ctypes.PYFUNCTYPE(ctypes.c_uint64, *([ctypes.c_void_p] * 7))


@dataclass(slots=True)
class CompiledCode:
    """Native code of one program, shareable by every instance."""

    key: str
    #: optimisation level it was compiled at
    level: str
    layout: ProgramLayout
    entry: ctypes._CFuncPtr
    entry1: ctypes._CFuncPtr
    #: native addresses of the functions a program may pass as callbacks
    callback_addrs: frozenset[int] = field(default_factory=frozenset)


def cache_key(insns: list[Instruction], checked: bool, level: str) -> str:
    h = hashlib.blake2b(encode(insns), digest_size=12)
    h.update(b"checked" if checked & layout.CHECK_MEMORY else b"unchecked")
    if checked & layout.BUDGET:
        h.update(b"budget")
    h.update(level.encode())
    return h.hexdigest()


class _Rejected(Exception):
    """A batch left a program out (the JIT refused it); compiling it alone raises why."""


class CodeCache:
    """Process-wide map from cache key to ``CompiledCode``."""

    def __init__(self) -> None:
        self._codes: dict[str, CompiledCode] = {}
        self._lock = threading.Lock()
        self._background: ThreadPoolExecutor | None = None
        #: keys being compiled right now (by whichever thread claimed them)
        self._pending: dict[str, Future[CompiledCode]] = {}
        #: background O2 compiles of tiered programs
        self._tier2: dict[str, Future[CompiledCode]] = {}

    def __len__(self) -> int:
        return len(self._codes)

    def get(self, insns: list[Instruction], checked: bool, level: str) -> CompiledCode:
        """The compiled code for ``insns``, compiling it on first use (once, even when
        several threads ask at the same time)."""
        key = cache_key(insns, checked, level)
        code = self._codes.get(key)
        if code is not None:
            return code
        owned = self._claim([key])
        if not owned:
            try:
                return self._wait(key)
            except _Rejected:   # left out of another thread's batch: compile alone for the error
                return self.get(insns, checked, level)
        self._run_claimed({key: insns}, checked, level, skip_bad=False)
        return self._codes[key]

    def get_tiered(self, insns: list[Instruction], checked: bool,
                   final: str = "O2") -> tuple[CompiledCode, Future[CompiledCode] | None]:
        """Code to run now, and a future of the ``final``-level code (None when the
        final code is already cached and returned directly)."""
        key = cache_key(insns, checked, final)
        code = self._codes.get(key)
        if code is not None:
            return code, None
        quick = self.get(insns, checked, "fast")
        with self._lock:
            future = self._tier2.get(key)
            if future is None:
                if self._background is None:
                    self._background = ThreadPoolExecutor(1, thread_name_prefix="ubpf-jit-tier2")
                future = self._background.submit(self.get, list(insns), checked, final)
                self._tier2[key] = future
                future.add_done_callback(lambda _f: self._tier2.pop(key, None))
        return quick, future

    def precompile(self, programs: list[list[Instruction]], checked: bool, level: str,
                   batch: int = 256) -> int:
        """Compile every not-yet-cached program, ``batch`` programs per LLVM module.

        Programs the JIT rejects are skipped here (constructing a ``JitProgram``
        for them raises the proper error).  Returns how many were compiled.
        """
        todo: dict[str, list[Instruction]] = {}
        for insns in programs:
            key = cache_key(insns, checked, level)
            if key not in self._codes:
                todo[key] = insns
        done = 0
        keys = list(todo)
        for i in range(0, len(keys), batch):
            owned = self._claim(keys[i:i + batch])
            done += self._run_claimed({k: todo[k] for k in owned}, checked, level, skip_bad=True)
        return done

    # --- one compile per key, whatever the threads do -------------------------------
    def _claim(self, keys: list[str]) -> list[str]:
        """Mark the keys nobody has compiled or is compiling as ours; return them."""
        owned = []
        with self._lock:
            for key in keys:
                if key not in self._codes and key not in self._pending:
                    self._pending[key] = Future()
                    owned.append(key)
        return owned

    def _wait(self, key: str) -> CompiledCode:
        future = self._pending.get(key)
        if future is not None:
            return future.result()
        return self._codes[key]   # finished between our two looks

    def _run_claimed(self, items: dict[str, list[Instruction]], checked: bool, level: str,
                     skip_bad: bool) -> int:
        """Compile claimed keys and release them (waiters get the code or the error)."""
        if not items:
            return 0
        try:
            out = self._compile(list(items.items()), checked, level, skip_bad=skip_bad)
        except BaseException as exc:
            with self._lock:
                for key in items:
                    self._pending.pop(key).set_exception(exc)
            raise
        with self._lock:
            for key in items:
                future = self._pending.pop(key)
                if key in out:
                    future.set_result(out[key])
                else:   # rejected in a batch: a waiter compiles it alone and gets the error
                    future.set_exception(_Rejected(key))
        return len(out)

    def _compile(self, items: list[tuple[str, list[Instruction]]], checked: bool, level: str,
                 skip_bad: bool = False) -> dict[str, CompiledCode]:
        from ubpf_py.errors import UbpfError

        parts = [module_header()]
        plans: dict[str, tuple[ProgramLayout, list[str]]] = {}
        symbols: list[str] = []
        for key, insns in items:
            try:
                validate(insns)
                text, plan = program_ir(insns, f"bpf{key}", checked)
            except UbpfError:
                if skip_bad:
                    continue
                raise
            parts.append(text)
            cbs = [f"{plan.prefix}_f{pc}" for pc in plan.callback_starts]
            plans[key] = (plan, cbs)
            symbols += [plan.entry, plan.entry1, *cbs]
        if not plans:
            return {}
        addrs = _backend.backend().compile("\n".join(parts), symbols, level, programs=len(plans))
        out: dict[str, CompiledCode] = {}
        with self._lock:
            for key, (plan, cbs) in plans.items():
                code = CompiledCode(key, level, plan, ENTRY_TYPE(addrs[plan.entry]),
                                    ENTRY1_TYPE(addrs[plan.entry1]),
                                    frozenset(addrs[name] for name in cbs))
                self._codes[key] = code
                out[key] = code
        return out


#: the process-wide cache every JitProgram uses
CODE_CACHE = CodeCache()


def compile_stats() -> _backend.CompileStats:
    """Compilation counters (modules, programs, seconds per phase) of this process."""
    return _backend.backend().stats
