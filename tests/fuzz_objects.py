"""Mutated BPF objects and an in-process ``ubpf-run`` runner that judges each outcome.

Shared by ``tests/test_fuzz.py`` (a fixed-seed sample in CI) and
``benchmarks/fuzz_campaign.py`` (a longer campaign).  Mutators work on the raw ELF
bytes of the corpus objects, aimed at the parts a loader trusts: byte flips,
truncation, section headers, BTF type ids / string offsets / array sizes (BTF map
definitions: ``__uint(max_entries, N)`` is an array of N elements), relocation
entries, legacy map definitions.

A run is judged by what a user would see: a documented exit code, no traceback,
no "internal error" (exit 70 is a bug), no MemoryError, at most one error line.
"""

from __future__ import annotations

import contextlib
import io
import random
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

#: exit codes ``ubpf-run --help`` documents (70 = a bug, never acceptable here)
DOCUMENTED = {0, 1, 2, 3, 4, 5, 6, 64, 130}

_HUGE = (0xFFFFFFFF, 0x10000001, 0x7FFFFFFF, 0x80000000, 0, 1 << 24, 0xFFFF)

# BTF kinds -> bytes after the 12-byte common header (vlen-dependent ones computed)
_INT, _ARRAY, _STRUCT, _UNION, _ENUM, _FUNC_PROTO, _VAR, _DATASEC, _DECL_TAG, _ENUM64 = (
    1, 3, 4, 5, 6, 13, 14, 15, 17, 19)


@dataclass
class Elf:
    """Just enough of an ELF64 file to aim mutations: section headers by index."""

    data: bytearray
    shoff: int = 0
    shnum: int = 0
    shentsize: int = 64
    sections: list[tuple[int, int, int, int, int]] = field(default_factory=list)   # name, type, off, size, hdr
    names: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, data: bytes) -> Elf | None:
        e = cls(bytearray(data))
        if len(data) < 64 or data[:4] != b"\x7fELF":
            return None
        e.shoff, = struct.unpack_from("<Q", data, 0x28)
        e.shentsize, e.shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
        if e.shentsize != 64 or e.shoff + e.shnum * 64 > len(data):
            return None
        for i in range(e.shnum):
            hdr = e.shoff + i * 64
            name, typ, _flags, _addr, off, size = struct.unpack_from("<IIQQQQ", data, hdr)
            e.sections.append((name, typ, off, size, hdr))
        if shstrndx >= e.shnum:
            return None
        _, _, soff, ssize, _ = e.sections[shstrndx]
        strtab = bytes(data[soff:soff + ssize])
        for name, *_ in e.sections:
            end = strtab.find(b"\0", name)
            e.names.append(strtab[name:end].decode("latin-1") if 0 <= name < len(strtab) and end >= 0 else "")
        return e

    def section(self, name: str) -> tuple[int, int, int] | None:
        for i, n in enumerate(self.names):
            if n == name:
                _, _, off, size, hdr = self.sections[i]
                if off + size <= len(self.data):
                    return off, size, hdr
        return None


def _btf_records(data: bytearray, base: int, size: int):
    """(kind, vlen, offset of the record, offset of its extra data) of each BTF type."""
    if size < 24 or struct.unpack_from("<H", data, base)[0] != 0xEB9F:
        return
    hdr_len, type_off, type_len = struct.unpack_from("<III", data, base + 4)
    pos = base + hdr_len + type_off
    end = min(pos + type_len, base + size)
    while pos + 12 <= end:
        info, = struct.unpack_from("<I", data, pos + 4)
        kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
        extra = {_INT: 4, _ARRAY: 12, _VAR: 4, _DECL_TAG: 4}.get(kind, 0)
        if kind in (_STRUCT, _UNION, _DATASEC, _ENUM64):
            extra = 12 * vlen
        elif kind in (_ENUM, _FUNC_PROTO):
            extra = 8 * vlen
        yield kind, vlen, pos, pos + 12
        pos += 12 + extra


def _u32(buf: bytearray, off: int, value: int) -> None:
    if off >= 0 and off + 4 <= len(buf):
        struct.pack_into("<I", buf, off, value & 0xFFFFFFFF)


# ---------------------------------------------------------------------------- mutators
def flip_bytes(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 16)):
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    return bytes(b)


def truncate(rng: random.Random, data: bytes) -> bytes:
    return data[:rng.randrange(len(data))]


def corrupt_section_header(rng: random.Random, data: bytes) -> bytes:
    e = Elf.parse(data)
    if e is None or not e.sections:
        return flip_bytes(rng, data)
    _, _, _, _, hdr = e.sections[rng.randrange(len(e.sections))]
    field_off, width = rng.choice([(0, 4), (4, 4), (24, 8), (32, 8), (40, 4), (44, 4), (56, 8)])
    value = rng.choice([0, 0xFFFFFFFF, len(data) + rng.randrange(1 << 20), rng.getrandbits(width * 8),
                        (1 << 63) | rng.getrandbits(32)])
    struct.pack_into("<I" if width == 4 else "<Q", e.data, hdr + field_off, value & ((1 << (8 * width)) - 1))
    return bytes(e.data)


def corrupt_btf(rng: random.Random, data: bytes) -> bytes:
    """Out-of-range type ids and string offsets, absurd array sizes (BTF map definitions)."""
    e = Elf.parse(data)
    sec = e.section(".BTF") if e else None
    if sec is None:
        return flip_bytes(rng, data)
    off, size, _ = sec
    recs = list(_btf_records(e.data, off, size))
    if not recs:
        return flip_bytes(rng, data)
    str_len, = struct.unpack_from("<I", e.data, off + 20)
    for _ in range(rng.randint(1, 4)):
        kind, vlen, pos, extra = rng.choice(recs)
        what = rng.randrange(4)
        if what == 0:            # name offset beyond the string section
            _u32(e.data, pos, str_len + rng.choice([0, 1, 1000, 0x7FFFFFFF]))
        elif what == 1:          # the type a record refers to: out of range
            _u32(e.data, pos + 8, len(recs) + rng.choice([1, 2, 1000, 0xFFFFFF]))
        elif what == 2 and kind == _ARRAY:
            _u32(e.data, extra + 8, rng.choice(_HUGE))
        elif kind in (_STRUCT, _UNION, _DATASEC) and vlen:
            m = extra + 12 * rng.randrange(vlen)
            _u32(e.data, m + rng.choice([0, 4, 8]), rng.choice([len(recs) + 7, 0xFFFFFFFF, str_len + 3]))
        else:                    # vlen / kind bits
            info, = struct.unpack_from("<I", e.data, pos + 4)
            _u32(e.data, pos + 4, info ^ (1 << rng.randrange(32)))
    return bytes(e.data)


def absurd_map(rng: random.Random, data: bytes) -> bytes:
    """Every BTF array (map definitions' max_entries / key_size / type) gets an absurd size."""
    e = Elf.parse(data)
    sec = e.section(".BTF") if e else None
    if sec is None:
        return flip_bytes(rng, data)
    off, size, _ = sec
    arrays = [extra for kind, _v, _p, extra in _btf_records(e.data, off, size) if kind == _ARRAY]
    if not arrays:
        return corrupt_btf(rng, data)
    for a in rng.sample(arrays, k=min(len(arrays), rng.randint(1, 3))):
        _u32(e.data, a + 8, rng.choice(_HUGE))
    return bytes(e.data)


def absurd_max_entries(rng: random.Random, data: bytes) -> bytes:
    """A BTF map definition's ``__uint(max_entries, N)`` (member ``max_entries`` -> pointer ->
    array of N) set to an absurd N: the sizes that once ended in MemoryError."""
    e = Elf.parse(data)
    sec = e.section(".BTF") if e else None
    if sec is None:
        return flip_bytes(rng, data)
    off, size, _ = sec
    recs = list(_btf_records(e.data, off, size))
    hdr_len, _to, _tl, str_off, str_len = struct.unpack_from("<IIIII", e.data, off + 4)
    strings = bytes(e.data[off + hdr_len + str_off:off + hdr_len + str_off + str_len])
    targets = []
    for kind, vlen, _pos, extra in recs:
        if kind != _STRUCT:
            continue
        for k in range(vlen):
            name_off, mtype, _moff = struct.unpack_from("<III", e.data, extra + 12 * k)
            if strings[name_off:name_off + 12] == b"max_entries\0" and 0 < mtype <= len(recs):
                pkind, _, ppos, _ = recs[mtype - 1]
                target = struct.unpack_from("<I", e.data, ppos + 8)[0] if pkind == 2 else 0
                if 0 < target <= len(recs) and recs[target - 1][0] == _ARRAY:
                    targets.append(recs[target - 1][3] + 8)
    if not targets:
        return absurd_map(rng, data)
    for t in rng.sample(targets, k=rng.randint(1, len(targets))):
        _u32(e.data, t, rng.choice(_HUGE))
    return bytes(e.data)


def corrupt_relocation(rng: random.Random, data: bytes) -> bytes:
    """A relocation entry pointing outside its section, at a symbol that does not exist, or
    misaligned."""
    e = Elf.parse(data)
    rels = [(off, size) for (_n, typ, off, size, _h) in (e.sections if e else []) if typ == 9 and size >= 16
            and off + size <= len(data)]
    if not rels:
        return flip_bytes(rng, data)
    off, size = rng.choice(rels)
    ent = off + 16 * rng.randrange(size // 16)
    if rng.random() < 0.5:
        struct.pack_into("<Q", e.data, ent, rng.choice([1 << 40, 0xFFFFFFF8, 3, size * 1000 + 8]))
    else:
        r_info, = struct.unpack_from("<Q", e.data, ent + 8)
        struct.pack_into("<Q", e.data, ent + 8, (rng.choice([0xFFFFFF, 100000]) << 32) | (r_info & 0xFFFFFFFF))
    return bytes(e.data)


MUTATORS = [flip_bytes, truncate, corrupt_section_header, corrupt_btf, absurd_map, absurd_max_entries,
            corrupt_relocation]


def mutate(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    m = rng.choice(MUTATORS)
    return m.__name__, m(rng, data)


# ---------------------------------------------------------------------------- judging
@dataclass
class Outcome:
    code: int
    seconds: float
    stdout: str
    stderr: str
    problem: str = ""     # empty when acceptable


def run_cli_inprocess(argv: list[str]) -> Outcome:
    """``ubpf-run ARGV`` in this process (imports are paid once), output captured."""
    from ubpf_py import cli

    out, err = io.StringIO(), io.StringIO()
    t0 = time.monotonic()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as e:       # argparse --help / version: not expected here
            code = int(e.code or 0)
    return judge(Outcome(code, time.monotonic() - t0, out.getvalue(), err.getvalue()))


def judge(o: Outcome) -> Outcome:
    errors = [ln for ln in o.stderr.splitlines() if ln.startswith("ubpf-run: error: ")]
    others = [ln for ln in o.stderr.splitlines() if ln.strip() and not ln.startswith("ubpf-run: ")]
    if "Traceback" in o.stderr or "Traceback" in o.stdout:
        o.problem = "traceback"
    elif "MemoryError" in o.stderr:
        o.problem = "MemoryError"
    elif o.code == 70 or "internal error" in o.stderr:
        o.problem = "internal error"
    elif o.code not in DOCUMENTED:
        o.problem = f"undocumented exit code {o.code}"
    elif len(errors) > 1:
        o.problem = "more than one error line"
    elif o.code not in (0, 3) and not errors:
        o.problem = "failure without an error line"
    elif others and o.code != 0:
        o.problem = f"stray stderr line: {others[0][:80]}"
    return o


def corpus_objects(build: Path) -> list[Path]:
    return sorted(build.glob("*.bpf.o"))


def first_program(path: Path) -> str | None:
    """Name of the object's first program, when it loads at all (for a short run)."""
    import warnings

    from ubpf_py.errors import UbpfError
    from ubpf_py.obj.elf import load_object

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            spec = load_object(path)
    except (UbpfError, OSError):
        return None
    return next(iter(spec.programs), None)


def write_case(directory: Path, i: int, data: bytes) -> Path:
    p = directory / f"fuzz{i}.bpf.o"
    p.write_bytes(data)
    return p


def log(msg: str) -> None:
    print(msg, file=sys.__stderr__, flush=True)
