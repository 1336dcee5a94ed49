"""In-target execution: probe programs run inside the traced process, entered from a patched jump.

See docs/ARCHITECTURE.md ("In-target execution") and ``ubpf_py/abi/runtime.py`` for the
memory layout shared by the tracer, the trampolines and the in-target runtime.
"""
