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
    h.update(b"checked" if checked else b"unchecked")
    h.update(level.encode())
    return h.hexdigest()


class CodeCache:
    """Process-wide map from cache key to ``CompiledCode``."""

    def __init__(self) -> None:
        self._codes: dict[str, CompiledCode] = {}
        self._lock = threading.Lock()
        self._background: ThreadPoolExecutor | None = None
        self._pending: dict[str, Future[CompiledCode]] = {}

    def __len__(self) -> int:
        return len(self._codes)

    def get(self, insns: list[Instruction], checked: bool, level: str) -> CompiledCode:
        """The compiled code for ``insns``, compiling it on first use."""
        key = cache_key(insns, checked, level)
        code = self._codes.get(key)
        if code is None:
            pending = self._pending.get(key)
            if pending is not None:   # a tier-2 compile of this very program is running
                return pending.result()
            code = self._compile([(key, insns)], checked, level)[key]
        return code

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
            future = self._pending.get(key)
            if future is None:
                if self._background is None:
                    self._background = ThreadPoolExecutor(1, thread_name_prefix="ubpf-jit-tier2")
                future = self._background.submit(self._finish_tier, key, list(insns), checked, final)
                self._pending[key] = future
        return quick, future

    def _finish_tier(self, key: str, insns: list[Instruction], checked: bool, final: str) -> CompiledCode:
        try:
            return self._compile([(key, insns)], checked, final)[key]
        finally:
            with self._lock:
                self._pending.pop(key, None)

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
        items = list(todo.items())
        done = 0
        for i in range(0, len(items), batch):
            done += len(self._compile(items[i:i + batch], checked, level, skip_bad=True))
        return done

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
