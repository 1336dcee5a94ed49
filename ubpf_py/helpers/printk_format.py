"""The kernel's bpf_trace_printk / bpf_trace_vprintk / bpf_snprintf formatting.

Two kernel stages are reproduced in one pass:

1. ``bpf_bprintf_prepare`` (kernel/bpf/helpers.c) validates the format and
   copies the arguments into a 512-byte binary buffer: only ``%d %i %u %x %X``
   (with ``l``/``ll``), ``%c``, ``%s``, ``%%``, ``%p``, ``%pK %px %ps %pS %pB``,
   ``%pks %pus`` and ``%pI4 %pi4 %pI6 %pi6`` pass, with flags ``0 + - space`` and
   a width (no precision, no ``#``); anything else, a non-printable ASCII
   character (bytes >= 0x80 are accepted, as UTF-8 text since Linux 6.13),
   a ``%s`` followed by a letter or digit, or more conversions than arguments is
   -EINVAL.  Strings are copied now (truncated to what is left of the 512
   bytes; a fault gives an empty string); ``%pI4``-style and ``%pB`` arguments
   are formatted now.
2. ``bstr_printf`` (lib/vsprintf.c) formats with the usual printf rules.  ``%p``
   prints a keyed hash of the pointer as ``00000000xxxxxxxx`` (32 bits of hash,
   16 digits, like the kernel's ``ptr_to_id``), or the raw value for NULL and
   error pointers; ``%px`` is the raw value; ``%pS``/``%ps``/``%pB`` of an address
   without a kernel symbol print ``0x<hex>`` as kallsyms does.

Memory is reached through callbacks so the module knows nothing of the VM:
``read_str(addr, kind, bufsz)`` (kind ``"s"`` = user-or-kernel, ``"k"``, ``"u"``;
returns the bytes before the NUL, at most ``bufsz - 1``, or None on fault) and
``read_kernel(addr, size)`` (bytes or None).
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

EINVAL = 22
ENOSPC = 28
MAX_TRACE_PRINTK_VARARGS = 3
MAX_BPRINTF_VARARGS = 12
MAX_BPRINTF_BUF = 1024
MAX_BPRINTF_BIN_ARGS = 512
FIELD_WIDTH_MAX = (1 << 23) - 1

ReadStr = Callable[[int, str, int], "bytes | None"]
ReadKernel = Callable[[int, int], "bytes | None"]

_PTR_KEY = os.urandom(16)
_M64 = 0xFFFFFFFFFFFFFFFF
_PUNCT = frozenset(b"!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")
_SPACE = frozenset(b" \t\n\v\f\r")


def _isprint(c: int) -> bool:
    return 0x20 <= c < 0x7F


def _term_ok(c: int) -> bool:
    """What may follow %s / plain %p: end of string, white space or punctuation."""
    return c == 0 or c in _SPACE or c in _PUNCT


@cache
def kptr_restrict() -> int:
    try:
        return int(Path("/proc/sys/kernel/kptr_restrict").read_text())
    except (OSError, ValueError):
        return 0


def hash_pointer(value: int) -> int:
    """A stable keyed 32-bit hash of a pointer (the kernel uses siphash with a boot key)."""
    digest = hashlib.blake2b(value.to_bytes(8, "little"), key=_PTR_KEY, digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0xFFFFFFFF


@dataclass(slots=True)
class _Spec:
    flags: str        # subset of "-+ 0"
    width: int        # -1 when absent


def _pad(text: bytes, spec: _Spec) -> bytes:
    """vsprintf's widen_string: space padding (left or right), never zeroes."""
    if spec.width <= len(text):
        return text
    fill = b" " * (spec.width - len(text))
    return text + fill if "-" in spec.flags else fill + text


def _number(value: int, conv: str, size: int, spec: _Spec) -> bytes:
    """vsprintf's number() for d/i/u/x/X of an int (4) or long (8) argument."""
    bits = size * 8
    value &= (1 << bits) - 1
    flags = spec.flags
    if conv in "di":
        if value >> (bits - 1):
            value -= 1 << bits
        pyconv = "d"
    else:
        flags = flags.replace("+", "").replace(" ", "")  # sign flags need a signed conversion
        pyconv = "d" if conv == "u" else conv
    width = "" if spec.width < 0 else str(min(spec.width, FIELD_WIDTH_MAX))
    return (f"%{flags}{width}{pyconv}" % value).encode()


def _pointer_string(value: int, spec: _Spec) -> bytes:
    """pointer_string(): 16 zero-padded hex digits unless a width was given."""
    if spec.width == -1:
        spec = _Spec(spec.flags + "0", 16)
    return _number(value, "x", 8, spec)


def _symbol(value: int) -> bytes:
    """kallsyms has no symbol for user-space addresses: sprint_symbol prints 0x<hex>."""
    return b"0x%x" % (value & _M64)


def _plain_pointer(value: int, kind: str, spec: _Spec, restricted_user: bool) -> bytes:
    value &= _M64
    if kind == "x":
        return _pointer_string(value, spec)
    if kind in ("s", "S"):
        return _pad(_symbol(value), spec)
    if kind == "K":
        level = kptr_restrict()
        if level == 0:
            return _hashed(value, spec)
        if level >= 2 or restricted_user:
            value = 0
        return _pointer_string(value, spec)
    return _hashed(value, spec)


def _hashed(value: int, spec: _Spec) -> bytes:
    if value == 0 or value >= _M64 - 4094:   # IS_ERR_OR_NULL: shown as is
        return _pointer_string(value, spec)
    return _pointer_string(hash_pointer(value), spec)


def _ip_string(raw: bytes, conv: str) -> bytes:
    if len(raw) == 4:
        return ".".join((f"{b:03d}" if conv == "i" else str(b)) for b in raw).encode()
    groups = struct.unpack(">8H", raw)
    if conv == "i":
        return "".join(f"{g:04x}" for g in groups).encode()
    return ":".join(f"{g:04x}" for g in groups).encode()


@dataclass
class FormatResult:
    """``error`` < 0 when the kernel would refuse the call; else ``output`` is the full
    formatted text (before truncation to the caller's buffer)."""

    error: int
    output: bytes = b""


def bprintf(fmt: bytes, args: Sequence[int], num_args: int, read_str: ReadStr,
            read_kernel: ReadKernel, restricted_user: bool = False) -> FormatResult:
    """Validate and format ``fmt`` (bytes up to, not including, its NUL) with ``args``
    as the kernel does; ``num_args`` is how many arguments the helper passed."""
    out: list[bytes] = []
    bin_used = 0           # bytes of the kernel's 512-byte argument buffer in use
    num_spec = 0
    n = len(fmt)
    i = 0
    lit_start = 0

    def at(k: int) -> int:
        return fmt[k] if k < n else 0

    while i < n:
        c = fmt[i]
        if c < 0x80 and not (_isprint(c) or c in _SPACE):  # UTF-8 bytes pass (Linux >= 6.13)
            return FormatResult(-EINVAL)
        if c != 0x25:  # '%'
            i += 1
            continue
        if at(i + 1) == 0x25:
            out.append(fmt[lit_start:i + 1])
            i += 2
            lit_start = i
            continue
        if num_spec >= num_args:
            return FormatResult(-EINVAL)
        out.append(fmt[lit_start:i])
        i += 1
        flags = ""
        while at(i) in b"0+- " and at(i) != 0:
            if chr(at(i)) not in flags:
                flags += chr(at(i))
            i += 1
        width = -1
        if 0x31 <= at(i) <= 0x39:
            start = i
            while 0x30 <= at(i) <= 0x39:
                i += 1
            width = int(fmt[start:i])
        spec = _Spec(flags.replace("0", "") if "-" in flags else flags, width)
        arg = args[num_spec] & _M64 if num_spec < len(args) else 0
        ch = at(i)
        if ch == 0x70:  # 'p'
            nxt, nxt2 = at(i + 1), at(i + 2)
            if nxt in b"ku" and nxt != 0 and nxt2 == 0x73:  # %pks / %pus
                kind = chr(nxt)
                i += 3
                res = _copy_string(arg, kind, bin_used, read_str, at(i))
                if isinstance(res, int):
                    return FormatResult(res)
                text, bin_used = res
                out.append(_pad(text, spec))
            elif _term_ok(nxt) or nxt in b"KxsS":
                kind = chr(nxt) if nxt in b"KxsS" and nxt != 0 else ""
                i += 1 if not kind else 2
                bin_used = (bin_used + 3) & ~3
                if MAX_BPRINTF_BIN_ARGS - bin_used < 8:
                    return FormatResult(-ENOSPC)
                bin_used += 8
                out.append(_plain_pointer(arg, kind, spec, restricted_user))
            elif nxt == 0x42:  # 'B': formatted now, copied as a string
                i += 2
                text = _symbol(arg)
                room = MAX_BPRINTF_BIN_ARGS - bin_used
                if room > 0:
                    out.append(text[:room - 1])
                bin_used += len(text) + 1
            elif nxt in b"iI" and nxt != 0 and nxt2 in b"46" and nxt2 != 0:
                i += 3
                size = 4 if nxt2 == 0x34 else 16
                if MAX_BPRINTF_BIN_ARGS - bin_used < size:
                    return FormatResult(-ENOSPC)
                raw = read_kernel(arg, size)
                text = _ip_string(raw if raw is not None and len(raw) == size else bytes(size), chr(nxt))
                room = MAX_BPRINTF_BIN_ARGS - bin_used
                text = text[:room - 1]
                bin_used += len(text) + 1
                out.append(text)
            else:
                return FormatResult(-EINVAL)
            # bstr_printf skips the alphanumerics that follow a %p conversion
            while i < n and chr(fmt[i]).isalnum():
                i += 1
            num_spec += 1
            lit_start = i
            continue
        if ch == 0x73:  # 's'
            i += 1
            res = _copy_string(arg, "s", bin_used, read_str, at(i))
            if isinstance(res, int):
                return FormatResult(res)
            text, bin_used = res
            out.append(_pad(text, spec))
            num_spec += 1
            lit_start = i
            continue
        if ch == 0x63:  # 'c'
            i += 1
            if bin_used == MAX_BPRINTF_BIN_ARGS:
                return FormatResult(-ENOSPC)
            bin_used += 1
            out.append(_pad(bytes([arg & 0xFF]), spec))
            num_spec += 1
            lit_start = i
            continue
        size = 4
        if ch == 0x6C:  # 'l'
            size = 8
            i += 1
            if at(i) == 0x6C:
                i += 1
        conv = at(i)
        if conv not in b"iduxX" or conv == 0:
            return FormatResult(-EINVAL)
        i += 1
        bin_used = (bin_used + 3) & ~3
        if MAX_BPRINTF_BIN_ARGS - bin_used < size:
            return FormatResult(-ENOSPC)
        bin_used += size
        out.append(_number(arg, chr(conv), size, spec))
        num_spec += 1
        lit_start = i
    out.append(fmt[lit_start:])
    return FormatResult(0, b"".join(out))


def _copy_string(addr: int, kind: str, bin_used: int, read_str: ReadStr,
                 following: int) -> tuple[bytes, int] | int:
    """The %s / %pks / %pus argument copy of bpf_bprintf_prepare."""
    if not _term_ok(following):
        return -EINVAL
    room = MAX_BPRINTF_BIN_ARGS - bin_used
    if room == 0:
        return -ENOSPC
    text = read_str(addr, kind, room)
    if text is None:
        return b"", bin_used + 1
    text = text[:room - 1]
    return text, bin_used + len(text) + 1


def format_fixed(fmt_mem: bytes, args: Sequence[int], num_args: int, read_str: ReadStr,
                 read_kernel: ReadKernel, restricted_user: bool = False) -> FormatResult:
    """trace_printk / trace_vprintk: ``fmt_mem`` is the ``fmt_size`` bytes the program
    passed; the format must be NUL-terminated within them (else -EINVAL)."""
    end = fmt_mem.find(b"\0")
    if end < 0:
        return FormatResult(-EINVAL)
    return bprintf(fmt_mem[:end], args, num_args, read_str, read_kernel, restricted_user)


def printk_message(output: bytes) -> tuple[int, str]:
    """(return value, trace text) of bpf_trace_printk for a formatted output: the helper
    returns the full length; the trace event keeps at most 1023 bytes up to the first NUL."""
    text = output[:MAX_BPRINTF_BUF - 1]
    nul = text.find(b"\0")
    if nul >= 0:
        text = text[:nul]
    return len(output), text.decode("utf-8", "surrogateescape")
