"""ubpf-py: run unmodified libbpf-style uprobe objects in userspace.

The package is split by concern (see docs/ARCHITECTURE.md):

- ``isa``       instruction set: decode/encode, assembler, disassembler
- ``obj``       inert object description (ELF, BTF, relocations, CO-RE): the *spec*
- ``vm``        execution engines (interpreter, llvmlite JIT) over checked memory
- ``maps``      kernel-compatible map implementations
- ``helpers``   helper functions by kernel id
- ``verifier``  static safety proof before anything runs
- ``probe``     ptrace probe engine (knows processes, not instructions)
- ``kernel``    the bpf() syscall backend (also the test oracle)
- ``output``    printing of printk lines, events and maps
- ``cli``       the ``ubpf-run`` command
"""

__version__ = "0.1.0"
