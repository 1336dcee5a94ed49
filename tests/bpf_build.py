"""Compile BPF C written by a test into an object, the way the corpus builds its own."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

#: the corpus's flags (shared/corpus/build.sh), minus its warnings
BPF_CFLAGS = ["-O2", "-target", "bpf", "-D__TARGET_ARCH_x86", "-I/usr/include/x86_64-linux-gnu"]


def compile_bpf(source: str, directory: Path, name: str, *, debug: bool = True) -> Path:
    """Write ``source`` to DIRECTORY/NAME.bpf.c and compile it to NAME.bpf.o (skip if no clang)."""
    clang = shutil.which("clang") or shutil.which("clang-14")
    if clang is None:
        pytest.skip("clang is needed to build the test program")
    src = directory / f"{name}.bpf.c"
    src.write_text(source)
    out = directory / f"{name}.bpf.o"
    subprocess.run([clang, *BPF_CFLAGS, *(["-g"] if debug else []), "-c", str(src), "-o", str(out)],
                   check=True, capture_output=True)
    return out


def build_target_and_program(directory: Path, target: tuple[str, str], program: tuple[str, str]) -> Path:
    """A C target (``(name, source)``, gcc -O1) and a BPF program (``(name, source)``) built side by
    side in ``directory``; skips when gcc is missing.  Returns ``directory``."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the target")
    exe, source = target
    (directory / f"{exe}.c").write_text(source)
    subprocess.run(["gcc", "-O1", "-o", str(directory / exe), str(directory / f"{exe}.c")], check=True)
    compile_bpf(program[1], directory, program[0])
    return directory


def build_task_test(directory: Path, target_src: str, gcc_flags: list[str], prog: tuple[str, str]) -> Path:
    """A C target ``t`` (gcc ``gcc_flags``) and a BPF program (``(name, source)``) that includes the
    kernel's vmlinux.h (from ../shared/realworld's build, which bpftool makes from this kernel's
    BTF): the task-struct tests' set-up.  Skips when clang, gcc, bpftool or the BTF is missing."""
    from paths import build_realworld

    clang = shutil.which("clang")
    if clang is None or shutil.which("gcc") is None or shutil.which("bpftool") is None:
        pytest.skip("clang, gcc and bpftool (vmlinux.h) are needed")
    if not Path("/sys/kernel/btf/vmlinux").exists():
        pytest.skip("needs the kernel's BTF (/sys/kernel/btf/vmlinux)")
    inc = build_realworld() / "include"
    (directory / "t.c").write_text(target_src)
    subprocess.run(["gcc", *gcc_flags, "-o", str(directory / "t"), str(directory / "t.c")], check=True)
    name, source = prog
    (directory / f"{name}.bpf.c").write_text(source)
    subprocess.run([clang, *BPF_CFLAGS[:-1], "-g", f"-I{inc}", "-idirafter", "/usr/include/x86_64-linux-gnu",
                    "-c", str(directory / f"{name}.bpf.c"), "-o", str(directory / f"{name}.bpf.o")],
                   check=True, capture_output=True)
    return directory
