"""Inert description of a BPF object (the *spec*): programs, maps, globals, BTF.

Parsing an ELF produces an ``ObjectSpec``; nothing here allocates maps or runs
code.  Loading (``ubpf_py.loader``) turns a spec into live maps and programs.
"""
