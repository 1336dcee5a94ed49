"""llvmlite plumbing: target machine, optimisation pipeline, MCJIT engine.

One MCJIT engine per optimisation level receives every module compiled at that
level (``add_module`` + ``finalize_object`` compiles only the new module), so
per-compile cost is the IR parse, the optimisation pipeline and code
generation -- no engine set-up.  Exported entry names carry a per-program
prefix, so modules never clash.  Each level has its own LLVM context and lock:
a background O2 compile (tiered mode) runs while the foreground compiles at
"fast" (llvmlite releases the GIL inside LLVM).

Optimisation levels (``OPT_LEVELS``):

* ``"O2"`` / ``"O3"``: LLVM's standard module pipeline via the new pass manager
  (what ``opt -O2`` runs), code generation at the same level.
* ``"fast"``: SROA (registers to SSA), instcombine, simplifycfg, then codegen at
  O0 (fast instruction selection and register allocation).  For short-lived or
  huge programs and for tests: several times cheaper to compile than O2.

BPF code is straight-line integer code plus loads/stores of external memory:
SROA is the pass that matters most (it turns the register allocas into SSA).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import llvmlite.binding as llvm

OPT_LEVELS = ("fast", "O2", "O3")
#: what ``JitProgram`` accepts: the compile levels plus "tiered" (see cache.py)
PROGRAM_LEVELS = (*OPT_LEVELS, "tiered")
DEFAULT_OPT_LEVEL = "O2"


@dataclass(slots=True)
class CompileStats:
    """Counters the tests and the benchmark read (compilations, time spent)."""

    modules: int = 0
    programs: int = 0
    parse_s: float = 0.0
    optimise_s: float = 0.0
    codegen_s: float = 0.0


class Backend:
    """Owns the llvmlite state; not thread safe by itself (``compile`` takes a lock)."""

    def __init__(self) -> None:
        llvm.initialize_native_target()
        llvm.initialize_native_asmprinter()
        target = llvm.Target.from_default_triple()
        cpu = llvm.get_host_cpu_name()
        features = llvm.get_host_cpu_features().flatten()
        self._tms = {
            level: target.create_target_machine(cpu=cpu, features=features, jit=True,
                                                opt=0 if level == "fast" else int(level[1]))
            for level in OPT_LEVELS
        }
        self._engines: dict[str, llvm.ExecutionEngine] = {}
        self._contexts = {level: llvm.create_context() for level in OPT_LEVELS}
        self._locks = {level: threading.Lock() for level in OPT_LEVELS}
        self._stats_lock = threading.Lock()
        self.stats = CompileStats()

    def _engine(self, level: str) -> llvm.ExecutionEngine:
        engine = self._engines.get(level)
        if engine is None:
            engine = llvm.create_mcjit_compiler(llvm.parse_assembly("", self._contexts[level]),
                                                self._tms[level])
            self._engines[level] = engine
        return engine

    def compile(self, text: str, symbols: list[str], level: str, programs: int = 1) -> dict[str, int]:
        """Parse, optimise and compile a module; native addresses of ``symbols``."""
        if level not in OPT_LEVELS:
            raise ValueError(f"unknown JIT optimisation level {level!r}; use one of {OPT_LEVELS}")
        with self._locks[level]:
            tm = self._tms[level]
            t0 = time.perf_counter()
            mod = llvm.parse_assembly(text, self._contexts[level])
            mod.triple = tm.triple
            mod.data_layout = str(tm.target_data)
            t1 = time.perf_counter()
            self._optimise(mod, level, tm)
            t2 = time.perf_counter()
            engine = self._engine(level)
            engine.add_module(mod)
            engine.finalize_object()
            addrs = {name: engine.get_function_address(name) for name in symbols}
            t3 = time.perf_counter()
        with self._stats_lock:
            st = self.stats
            st.modules += 1
            st.programs += programs
            st.parse_s += t1 - t0
            st.optimise_s += t2 - t1
            st.codegen_s += t3 - t2
        missing = [n for n, a in addrs.items() if not a]
        if missing:
            raise RuntimeError(f"JIT lost symbols {missing} after compilation")
        return addrs

    @staticmethod
    def _optimise(mod: llvm.ModuleRef, level: str, tm: llvm.TargetMachine) -> None:
        if level == "fast":
            pto = llvm.create_pipeline_tuning_options(speed_level=1)
            pb = llvm.create_pass_builder(tm, pto)
            mpm = llvm.create_new_module_pass_manager()
            mpm.add_sroa_pass()
            mpm.add_instruction_combine_pass()
            mpm.add_simplify_cfg_pass()
        else:
            pto = llvm.create_pipeline_tuning_options(speed_level=int(level[1]))
            pb = llvm.create_pass_builder(tm, pto)
            mpm = pb.getModulePassManager()
        mpm.run(mod, pb)

    def ir_after_optimisation(self, text: str, level: str) -> str:
        """The optimised IR of a module, for debugging and tests (does not compile it)."""
        tm = self._tms[level]
        with self._locks[level]:
            mod = llvm.parse_assembly(text, self._contexts[level])
            mod.triple = tm.triple
            mod.data_layout = str(tm.target_data)
            self._optimise(mod, level, tm)
            return str(mod)


_backend: Backend | None = None
_backend_lock = threading.Lock()


def backend() -> Backend:
    """The process-wide backend, created on first use."""
    global _backend
    if _backend is None:
        with _backend_lock:
            if _backend is None:
                _backend = Backend()
    return _backend
