"""Bob Jenkins' lookup3 hash as the kernel uses it (<linux/jhash.h>).

The stack trace map buckets stacks by ``jhash2(ips, n, 0)`` and the bloom filter
hashes values with ``jhash``/``jhash2`` seeded per hash function.  Using the
same function makes stack ids and bloom-filter false positives identical to the
kernel's (bloom filters created with BPF_F_ZERO_SEED).
"""

from __future__ import annotations

import struct

_M = 0xFFFFFFFF
JHASH_INITVAL = 0xDEADBEEF


def _rol(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _M


def _mix(a: int, b: int, c: int) -> tuple[int, int, int]:
    a = (a - c) & _M; a ^= _rol(c, 4); c = (c + b) & _M  # noqa: E702
    b = (b - a) & _M; b ^= _rol(a, 6); a = (a + c) & _M  # noqa: E702
    c = (c - b) & _M; c ^= _rol(b, 8); b = (b + a) & _M  # noqa: E702
    a = (a - c) & _M; a ^= _rol(c, 16); c = (c + b) & _M  # noqa: E702
    b = (b - a) & _M; b ^= _rol(a, 19); a = (a + c) & _M  # noqa: E702
    c = (c - b) & _M; c ^= _rol(b, 4); b = (b + a) & _M  # noqa: E702
    return a, b, c


def _final(a: int, b: int, c: int) -> int:
    c ^= b; c = (c - _rol(b, 14)) & _M  # noqa: E702
    a ^= c; a = (a - _rol(c, 11)) & _M  # noqa: E702
    b ^= a; b = (b - _rol(a, 25)) & _M  # noqa: E702
    c ^= b; c = (c - _rol(b, 16)) & _M  # noqa: E702
    a ^= c; a = (a - _rol(c, 4)) & _M  # noqa: E702
    b ^= a; b = (b - _rol(a, 14)) & _M  # noqa: E702
    c ^= b; c = (c - _rol(b, 24)) & _M  # noqa: E702
    return c


def jhash2(words: list[int] | tuple[int, ...], initval: int = 0) -> int:
    """Hash of a sequence of u32 words (kernel ``jhash2``)."""
    n = len(words)
    a = b = c = (JHASH_INITVAL + (n << 2) + initval) & _M
    i = 0
    while n > 3:
        a = (a + words[i]) & _M
        b = (b + words[i + 1]) & _M
        c = (c + words[i + 2]) & _M
        a, b, c = _mix(a, b, c)
        n -= 3
        i += 3
    if n == 0:
        return c
    if n >= 3:
        c = (c + words[i + 2]) & _M
    if n >= 2:
        b = (b + words[i + 1]) & _M
    a = (a + words[i]) & _M
    return _final(a, b, c)


def jhash2_bytes(data: bytes, initval: int = 0) -> int:
    """jhash2 of ``data`` read as native-endian u32 words (len must be a multiple of 4)."""
    return jhash2(struct.unpack(f"<{len(data) // 4}I", data), initval)


def jhash(key: bytes, initval: int = 0) -> int:
    """Hash of an arbitrary byte string (kernel ``jhash``, little-endian loads)."""
    length = len(key)
    a = b = c = (JHASH_INITVAL + length + initval) & _M
    k = 0
    while length > 12:
        a = (a + int.from_bytes(key[k:k + 4], "little")) & _M
        b = (b + int.from_bytes(key[k + 4:k + 8], "little")) & _M
        c = (c + int.from_bytes(key[k + 8:k + 12], "little")) & _M
        a, b, c = _mix(a, b, c)
        length -= 12
        k += 12
    if length == 0:
        return c
    tail = key[k:k + length] + bytes(12 - length)
    # the kernel's switch adds tail bytes byte by byte into a, b, c (little-endian order)
    a = (a + int.from_bytes(tail[0:4], "little")) & _M
    b = (b + int.from_bytes(tail[4:8], "little")) & _M
    c = (c + int.from_bytes(tail[8:12], "little")) & _M
    return _final(a, b, c)
