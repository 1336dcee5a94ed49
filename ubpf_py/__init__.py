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
- ``api``       the public Python API (``BPFObject``)
- ``cli``       the ``ubpf-run`` command
"""

__version__ = "0.1.0"

#: the public API (``ubpf_py.api``), importable as ``from ubpf_py import BPFObject``; loaded on first
#: use so that ``import ubpf_py.isa`` and friends do not pull in the probe engine and the kernel backend
__all__ = ["BPFObject", "Link", "MapView", "PrintkEvent", "Record", "__version__"]


def __getattr__(name: str):
    if name in __all__ and name != "__version__":
        from ubpf_py import api

        return getattr(api, name)
    raise AttributeError(f"module 'ubpf_py' has no attribute {name!r}")
