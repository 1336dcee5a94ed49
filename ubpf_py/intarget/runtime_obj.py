"""The in-target runtime object (``runtime/*.c``): where it is, what it implements, and
a copy linked into this process.

Lookup order for the object: ``ubpf_py/_runtime.o`` from the package build
(setup.py) when it was built from the current sources, else a build on demand into
``~/.cache/ubpf-py`` (as ``probe.native`` does for the stop loop).  With no C
compiler at all the in-target path is unavailable and ``unavailable_reason()``
says why.

``tracer_runtime()`` links the same object into the tracer (``selfload``) so the
Python map classes run the C inserts, deletes and ring-buffer producers on shared
memory: one implementation for both sides.
"""

from __future__ import annotations

import ctypes
import functools
import io
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from elftools.elf.elffile import ELFFile

from ubpf_py.errors import NotSupportedError
from ubpf_py.intarget import runtime_build
from ubpf_py.intarget.selfload import LoadedImage, load_here

RUNTIME_DIR = Path(__file__).resolve().parents[2] / "runtime"
PACKAGED = Path(__file__).resolve().parents[1] / "_runtime.o"
_HELPER = re.compile(r"ubpf_helper_(\d+)$")
_DIGEST = re.compile(r"ubpf_runtime_digest_([0-9a-f]+)$")
#: helper flags the runtime refuses (returns -EOPNOTSUPP): programs using them stay on
#: the ptrace path.  helper id -> (register holding the flags, flag mask)
UNSUPPORTED_FLAGS = {67: (4, 1 << 11)}   # bpf_get_stack: flags in r4, BPF_F_USER_BUILD_ID
#: helpers whose in-target return value differs from the kernel's: a program that reads
#: r0 after calling them stays on the ptrace path (see runtime/printk.c)
RETURN_VALUE_DIFFERS = frozenset({6, 177})   # trace_printk/vprintk: 0 once queued, not the length


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ubpf-py"


def _object_digest(raw: bytes) -> str | None:
    symtab = ELFFile(io.BytesIO(raw)).get_section_by_name(".symtab")
    for s in symtab.iter_symbols() if symtab is not None else ():
        m = _DIGEST.match(s.name)
        if m:
            return m.group(1)
    return None


@functools.cache
def _locate() -> tuple[bytes | None, str]:
    """(object bytes, "") or (None, why the in-target path is unavailable)."""
    have_src = bool(runtime_build.sources(RUNTIME_DIR))
    want = runtime_build.digest(RUNTIME_DIR) if have_src else None
    if PACKAGED.exists():
        raw = PACKAGED.read_bytes()
        if want is None or _object_digest(raw) == want:
            return raw, ""
    if not have_src:
        return None, "the in-target runtime was not built with the package and its sources are missing"
    out = _cache_dir() / f"runtime-{want}.o"
    if not out.exists():
        try:
            runtime_build.build(RUNTIME_DIR, out)
        except subprocess.CalledProcessError as e:
            first = (e.stderr or "").strip().splitlines()[:1]
            return None, f"building the in-target runtime failed: {first[0] if first else e}"
        except (OSError, subprocess.SubprocessError) as e:
            return None, f"cannot build the in-target runtime ({e}); install a C compiler (apt install gcc)"
    return out.read_bytes(), ""


def object_bytes() -> bytes:
    """The runtime object; NotSupportedError naming the reason when there is none."""
    raw, why = _locate()
    if raw is None:
        raise NotSupportedError(f"in-target execution: {why}")
    return raw


def unavailable_reason() -> str | None:
    """None when the runtime object exists (or could be built), else why not."""
    return _locate()[1] or None


@functools.cache
def helper_ids() -> frozenset[int]:
    """Kernel helper ids the runtime implements as ``ubpf_helper_<id>``."""
    symtab = ELFFile(io.BytesIO(object_bytes())).get_section_by_name(".symtab")
    ids = set()
    for s in symtab.iter_symbols():
        m = _HELPER.match(s.name)
        if m and s["st_shndx"] != "SHN_UNDEF":
            ids.add(int(m.group(1)))
    return frozenset(ids)


def helper_symbol(helper_id: int) -> str:
    return f"ubpf_helper_{helper_id}"


_u64, _s64, _vp = ctypes.c_uint64, ctypes.c_int64, ctypes.c_void_p


@dataclass(frozen=True)
class TracerRuntime:
    """The runtime linked into this process, with typed entry points."""

    image: LoadedImage
    map_lookup: ctypes._CFuncPtr     # (desc, key, cpu) -> value address or 0 (LRU: marks referenced)
    map_update: ctypes._CFuncPtr     # (desc, key, value, flags, cpu; -1 = user space) -> 0 / -errno
    map_delete: ctypes._CFuncPtr     # (desc, key) -> 0 / -errno
    hash_find: ctypes._CFuncPtr      # (desc, key) -> slot + 1, 0 when absent
    rb_reserve: ctypes._CFuncPtr     # (desc, size) -> record address or 0
    rb_commit: ctypes._CFuncPtr      # (record, discard) -> 0 / -EINVAL
    rb_output: ctypes._CFuncPtr      # (desc, data, size) -> 0 / -EAGAIN
    perf_output: ctypes._CFuncPtr    # (desc, cpu, data, size, flags) -> 0 / -errno
    stack_store: ctypes._CFuncPtr    # (desc, ips, n, flags) -> stack id / -errno
    stack_delete: ctypes._CFuncPtr   # (desc, id) -> 0 / -ENOENT
    queue_push: ctypes._CFuncPtr     # (desc, value, flags) -> 0 / -errno
    queue_take: ctypes._CFuncPtr     # (desc, out, remove) -> 0 / -ENOENT
    bloom_push: ctypes._CFuncPtr     # (desc, value, flags) -> 0 / -EINVAL
    bloom_peek: ctypes._CFuncPtr     # (desc, value) -> 0 (maybe present) / -ENOENT
    set_inner: ctypes._CFuncPtr      # (ARRAY_OF_MAPS desc, index, inner handle or 0) -> 0 / -errno

    def helper(self, helper_id: int) -> ctypes._CFuncPtr:
        """``ubpf_helper_<id>(r1..r5, hit_frame)`` as a ctypes function (tests, benchmarks)."""
        proto = ctypes.CFUNCTYPE(_u64, _u64, _u64, _u64, _u64, _u64, _vp)
        return self.image.fn(helper_symbol(helper_id), proto)


@functools.cache
def tracer_runtime() -> TracerRuntime:
    """The runtime linked into this process (once); NotSupportedError when unavailable."""
    img = load_here([("runtime", object_bytes())])
    F = ctypes.CFUNCTYPE
    return TracerRuntime(
        img,
        img.fn("ubpf_map_lookup", F(_u64, _vp, _vp, _s64)),
        img.fn("ubpf_map_update", F(_s64, _vp, _vp, _vp, _u64, _s64)),
        img.fn("ubpf_map_delete", F(_s64, _vp, _vp)),
        img.fn("ubpf_hash_find", F(_u64, _vp, _vp)),
        img.fn("ubpf_rb_reserve", F(_u64, _vp, _u64)),
        img.fn("ubpf_rb_commit", F(_s64, _u64, _u64)),
        img.fn("ubpf_rb_output", F(_s64, _vp, _vp, _u64)),
        img.fn("ubpf_perf_output", F(_s64, _vp, _u64, _vp, _u64, _u64)),
        img.fn("ubpf_stack_store", F(_s64, _vp, _vp, _u64, _u64)),
        img.fn("ubpf_stack_delete", F(_s64, _vp, _u64)),
        img.fn("ubpf_queue_push", F(_s64, _vp, _vp, _u64)),
        img.fn("ubpf_queue_take", F(_s64, _vp, _vp, _u64)),
        img.fn("ubpf_bloom_push", F(_s64, _vp, _vp, _u64)),
        img.fn("ubpf_bloom_peek", F(_s64, _vp, _vp)),
        img.fn("ubpf_map_set_inner", F(_s64, _vp, _u64, _u64)),
    )


def try_tracer_runtime() -> TracerRuntime | None:
    """``tracer_runtime()`` or None when the runtime cannot be built here."""
    if unavailable_reason() is not None:
        return None
    return tracer_runtime()
