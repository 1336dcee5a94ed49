"""Build of the native parts; all metadata lives in pyproject.toml.

``ubpf_py._hotloop`` is the probe engine's C stop loop (native/hotloop.c),
reached through ctypes (ubpf_py/probe/native.py).  It is optional: when no C
compiler is available the install still succeeds and the pure-Python loop runs
(or the loop is compiled on first use into ~/.cache/ubpf-py).

``ubpf_py/_runtime.o`` is the in-target runtime (runtime/*.c) as one relocatable
object, which the tracer links into traced processes and into itself
(ubpf_py/intarget/runtime_obj.py).  Also optional: without it the object is
built on first use into ~/.cache/ubpf-py, and with no C compiler at all the
in-target path is unavailable (probes run on the ptrace path).
"""

import importlib.util
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class BuildExtAndRuntime(build_ext):
    """build_ext, plus the in-target runtime object next to the package's modules."""

    def run(self):
        super().run()
        spec = importlib.util.spec_from_file_location(
            "runtime_build", ROOT / "ubpf_py" / "intarget" / "runtime_build.py")
        rb = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(rb)
        base = ROOT if self.inplace else Path(self.build_lib)
        out = base / "ubpf_py" / "_runtime.o"
        try:
            rb.build(ROOT / "runtime", out)
        except Exception as e:  # optional, like the stop loop: built on first use instead
            print(f"warning: in-target runtime not built ({e}); it is built on first use instead")


setup(ext_modules=[Extension("ubpf_py._hotloop", ["native/hotloop.c"], optional=True,
                             extra_compile_args=["-O2"])],
      cmdclass={"build_ext": BuildExtAndRuntime})
