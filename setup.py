"""Build of the native parts; all metadata lives in pyproject.toml.

``ubpf_py._hotloop`` is the probe engine's C stop loop (native/hotloop.c),
reached through ctypes (ubpf_py/probe/native.py).  It is optional: when no C
compiler is available the install still succeeds and the pure-Python loop runs
(or the loop is compiled on first use into ~/.cache/ubpf-py).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("ubpf_py._hotloop", ["native/hotloop.c"], optional=True,
                             extra_compile_args=["-O2"])])
