"""llvmlite JIT for BPF programs.

``JitProgram`` (runtime) is the engine; ``compiler`` turns bytecode into LLVM IR
text, ``backend`` optimises and compiles it with MCJIT, ``cache`` shares compiled
code between instances with the same bytecode.  Memory-check design: ``runtime``
and ``ir_mem`` docstrings and docs/ARCHITECTURE.md.
"""

from ubpf_py.vm.jit.cache import CODE_CACHE, compile_stats
from ubpf_py.vm.jit.runtime import JitProgram

__all__ = ["CODE_CACHE", "JitProgram", "compile_stats"]
