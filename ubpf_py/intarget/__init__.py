"""In-target execution: verified programs run inside the traced process (no stop per hit).

Tracer-side machinery, by concern: ``inject`` (mappings made in the target with injected
system calls), ``vdso`` (the target's vDSO clock), ``arena`` (memory shared by tracer and
target at one address), ``linker`` (ELF objects -> an image for a target address),
``runtime_obj`` (the in-target runtime built from ``runtime/*.c``), ``sites`` and
``trampoline`` (probe sites and the code that enters programs), ``process`` (one traced
address space: what is mapped and patched there, and how it is undone).
See docs/ARCHITECTURE.md, "In-target execution".
"""
