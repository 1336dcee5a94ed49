"""C source -> BPF object: ``ubpf-run prog.bpf.c`` compiles before it loads.

The flags are the ones libbpf-tools build with (``-O2 -g -target bpf
-D__TARGET_ARCH_x86``) plus the system include directories clang leaves out for
``-target bpf`` (``/usr/include/$(multiarch)`` for ``asm/types.h``).  A source
that includes ``vmlinux.h`` gets one generated from the running kernel's BTF
(``bpftool btf dump file /sys/kernel/btf/vmlinux format c``), cached per kernel
build.  clang's diagnostics are passed through as they are.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ubpf_py.errors import NotSupportedError, ObjectLoadError, UsageError

SOURCE_SUFFIXES = (".c",)
CFLAGS = ["-O2", "-g", "-target", "bpf", "-D__TARGET_ARCH_x86"]
VMLINUX_BTF = "/sys/kernel/btf/vmlinux"
_VMLINUX_RE = re.compile(r'^\s*#\s*include\s*[<"]vmlinux\.h[>"]', re.M)


def is_source(path: str) -> bool:
    return path.endswith(SOURCE_SUFFIXES)


def find_clang() -> str:
    for name in ("clang", *(f"clang-{v}" for v in range(20, 12, -1))):
        found = shutil.which(name)
        if found:
            return found
    raise NotSupportedError("compiling BPF C: clang is not installed (apt-get install clang llvm libbpf-dev), "
                            "or give a compiled object (.o)")


def include_dirs() -> list[str]:
    """System include directories a BPF build needs (clang -target bpf skips the multiarch one)."""
    dirs = []
    multiarch = _multiarch()
    if multiarch and os.path.isdir(f"/usr/include/{multiarch}"):
        dirs.append(f"/usr/include/{multiarch}")
    return dirs


def _multiarch() -> str:
    for cc in ("gcc", "cc"):
        exe = shutil.which(cc)
        if exe:
            try:
                out = subprocess.run([exe, "-print-multiarch"], capture_output=True, text=True, timeout=10)
            except (OSError, subprocess.SubprocessError):
                continue
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip()
    return {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu"}.get(os.uname().machine, "")


def vmlinux_header(cache_dir: Path) -> Path:
    """``vmlinux.h`` of the running kernel, generated once per kernel BTF (by its hash)."""
    try:
        btf = Path(VMLINUX_BTF).read_bytes()
    except OSError:
        raise NotSupportedError(f"vmlinux.h: the kernel exposes no BTF at {VMLINUX_BTF} "
                                f"(CONFIG_DEBUG_INFO_BTF); provide vmlinux.h next to the source") from None
    out = cache_dir / f"vmlinux-{hashlib.blake2b(btf, digest_size=8).hexdigest()}" / "vmlinux.h"
    if out.exists():
        return out
    bpftool = shutil.which("bpftool")
    if bpftool is None:
        raise NotSupportedError("vmlinux.h: bpftool is not installed (apt-get install bpftool, or "
                                "linux-tools), or provide vmlinux.h next to the source")
    p = subprocess.run([bpftool, "btf", "dump", "file", VMLINUX_BTF, "format", "c"],
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise ObjectLoadError(f"vmlinux.h: bpftool failed: {p.stderr.strip()[:300]}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(p.stdout)
    tmp.replace(out)
    return out


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    d = Path(base) / "ubpf-py"
    try:
        d.mkdir(parents=True, exist_ok=True)
        return d
    except OSError:
        return Path(tempfile.gettempdir()) / f"ubpf-py-{os.getuid()}"


def compile_source(source: str, out: str | None = None, cflags: list[str] | None = None) -> str:
    """Compile ``source`` with clang; returns the object's path (``out``, or a cached file named
    by the source's and flags' hash).  clang's messages go to stderr unchanged; a failed
    compile raises ObjectLoadError (exit code 2)."""
    src = Path(source)
    if not src.is_file():
        raise UsageError(f"{source}: no such source file")
    clang = find_clang()
    text = src.read_text(errors="replace")
    args = [*CFLAGS, *[f"-I{d}" for d in include_dirs()], f"-I{src.resolve().parent}", *(cflags or [])]
    if _VMLINUX_RE.search(text) and not (src.parent / "vmlinux.h").exists():
        args.append(f"-I{vmlinux_header(_cache_dir()).parent}")
    if out is None:
        key = hashlib.blake2b(f"{src.resolve()}\0{text}\0{args}".encode(), digest_size=8).hexdigest()
        out_dir = _cache_dir() / "objects"
        out_dir.mkdir(parents=True, exist_ok=True)
        out = str(out_dir / f"{src.name.removesuffix('.c')}-{key}.o")
    tmp = f"{out}.{os.getpid()}.tmp"     # concurrent runs of one source must not see half a file
    p = subprocess.run([clang, *args, "-c", str(src), "-o", tmp], capture_output=True, text=True)
    if p.stderr:
        sys.stderr.write(p.stderr)
    if p.returncode != 0:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise ObjectLoadError(f"{source}: clang failed (exit {p.returncode}); its messages are above")
    os.replace(tmp, out)
    return out
