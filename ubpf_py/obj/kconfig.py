"""Values of ``.kconfig`` externs (``extern ... __kconfig``), describing this runtime.

libbpf fills these from the running kernel: ``LINUX_KERNEL_VERSION`` from
uname, ``LINUX_HAS_BPF_COOKIE``/``LINUX_HAS_SYSCALL_WRAPPER`` from feature
probes, ``CONFIG_*`` from ``/proc/config.gz`` or ``/boot/config-$(uname -r)``.
ubpf-py answers the feature questions for itself (it supports attach cookies;
x86-64 kernels >= 4.17 use syscall wrappers) and reads the kernel config the same
way.  An extern nobody can answer is an error naming it, unless it is weak
(``__weak``), which reads as zero like in libbpf.
"""

from __future__ import annotations

import gzip
import os
import re
from functools import lru_cache
from pathlib import Path

from ubpf_py.errors import ObjectLoadError


def kernel_version_code(release: str | None = None) -> int:
    """KERNEL_VERSION(major, minor, patch) of a uname release, patch capped at 255."""
    rel = release if release is not None else os.uname().release
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", rel)
    if not m:
        return 0
    major, minor, patch = int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)
    return (major << 16) | (minor << 8) | min(patch, 255)


@lru_cache(maxsize=1)
def kernel_config() -> dict[str, str]:
    """CONFIG_* = value from the running kernel's config, {} when not available."""
    text = ""
    try:
        text = gzip.decompress(Path("/proc/config.gz").read_bytes()).decode("utf-8", "replace")
    except OSError:
        try:
            text = Path(f"/boot/config-{os.uname().release}").read_text("utf-8", "replace")
        except OSError:
            return {}
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        m = re.match(r"(CONFIG_\w+)=(.*)", line)
        if m:
            out[m.group(1)] = m.group(2)
        else:
            m = re.match(r"# (CONFIG_\w+) is not set", line)
            if m:
                out[m.group(1)] = "n"
    return out


def runtime_kconfig_value(name: str) -> str | None:
    """The kconfig-syntax value of an extern ('y', 'n', '123', '"str"'), None when unknown."""
    if name == "LINUX_KERNEL_VERSION":
        return str(kernel_version_code())
    if name == "LINUX_HAS_BPF_COOKIE":
        return "y"
    if name == "LINUX_HAS_SYSCALL_WRAPPER":
        return "y"
    if name.startswith("CONFIG_"):
        return kernel_config().get(name)
    return None


# kinds of kconfig extern, by their BTF type
KCFG_BOOL = "bool"
KCFG_CHAR = "char"
KCFG_TRISTATE = "tristate"
KCFG_INT = "int"
KCFG_CHAR_ARR = "char_arr"


def encode_kconfig(name: str, kind: str, size: int, signed: bool, value: str) -> bytes:
    """Encode a kconfig value as libbpf's set_kcfg_value_* do; errors name the extern."""
    v = value.strip()
    if kind in (KCFG_BOOL, KCFG_TRISTATE, KCFG_CHAR) and v in ("y", "n", "m"):
        if kind == KCFG_CHAR:
            return v.encode()
        if kind == KCFG_BOOL:
            if v == "m":
                raise ObjectLoadError(f"kconfig extern {name} is bool but the kernel has it as a module (m)")
            return bytes([1 if v == "y" else 0])
        return bytes([{"n": 0, "y": 1, "m": 2}[v]])
    if kind == KCFG_CHAR_ARR:
        if not (len(v) >= 2 and v[0] == v[-1] == '"'):
            raise ObjectLoadError(f"kconfig extern {name} is a string but the value {v!r} is not quoted")
        s = v[1:-1].encode()
        if len(s) >= size:
            s = s[:size - 1]
        return s + b"\0" * (size - len(s))
    if kind in (KCFG_INT, KCFG_BOOL, KCFG_TRISTATE, KCFG_CHAR):
        try:
            num = int(v, 0)
        except ValueError:
            raise ObjectLoadError(f"kconfig extern {name}: value {v!r} is not a number") from None
        if kind == KCFG_BOOL and num not in (0, 1):
            raise ObjectLoadError(f"kconfig extern {name} is bool but the value is {num}")
        lo, hi = (-(1 << (8 * size - 1)), (1 << (8 * size - 1)) - 1) if signed else (0, (1 << (8 * size)) - 1)
        if not lo <= num <= hi:
            raise ObjectLoadError(f"kconfig extern {name}: value {num} does not fit in {size} bytes")
        return num.to_bytes(size, "little", signed=signed)
    raise ObjectLoadError(f"kconfig extern {name} has an unsupported type")
