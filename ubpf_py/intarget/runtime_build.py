"""Compile ``runtime/*.c`` into one relocatable object (no ubpf_py imports: setup.py loads
this file directly, so the package build and the on-demand build are the same code).

The flags make code that is safe to run inside any traced process, entered from a
trampoline that saves only the general registers: freestanding (no libc),
position independent, no SSE/AVX (``-mgeneral-regs-only``), no red zone, no stack
protector, no unwind tables, and no loop-to-memcpy rewriting (the runtime's own
memcpy would call itself).  The object records the digest of its sources in the
symbol ``ubpf_runtime_digest_<hex>`` so a stale build is never used.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

CFLAGS = ["-O2", "-fPIC", "-ffreestanding", "-fno-builtin", "-nostdlib", "-fno-stack-protector",
          "-mno-red-zone", "-mgeneral-regs-only", "-fno-asynchronous-unwind-tables", "-fno-unwind-tables",
          "-fvisibility=hidden", "-fno-tree-loop-distribute-patterns", "-fno-jump-tables",
          "-fcf-protection=none", "-std=gnu11"]


def sources(runtime_dir: Path) -> list[Path]:
    return sorted(runtime_dir.glob("*.c"))


def digest(runtime_dir: Path) -> str:
    h = hashlib.sha256(" ".join(CFLAGS).encode())
    for p in sorted(runtime_dir.glob("*.[ch]")):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def build(runtime_dir: Path, out: Path) -> None:
    """Compile every runtime source and link them (``-r``) into ``out``; raises
    OSError / subprocess.CalledProcessError (with the compiler's message) on failure."""
    cc = compiler()
    if cc is None:
        raise OSError("no C compiler (cc, gcc or clang) found")
    srcs = sources(runtime_dir)
    if not srcs:
        raise OSError(f"no runtime sources in {runtime_dir}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    tag = f"-DUBPF_RT_DIGEST=ubpf_runtime_digest_{digest(runtime_dir)}"
    subprocess.run([cc, *CFLAGS, tag, "-I", str(runtime_dir), "-r", "-o", str(tmp), *map(str, srcs)],
                   check=True, capture_output=True, text=True, timeout=180)
    os.replace(tmp, out)
