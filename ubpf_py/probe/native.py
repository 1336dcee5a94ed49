"""Loading and driving the native stop loop (native/hotloop.c) through ctypes.

The loop is built by the package build as the extension module
``ubpf_py._hotloop`` (setup.py); its C functions are reached through ctypes,
so no CPython API is involved per hit except the handler callback.  When the
extension is missing (a source checkout that was never built) the file is
compiled once with the system C compiler into a per-user cache; when that is
impossible too, ``load()`` returns None and the pure-Python loop is used.
``UBPF_NATIVE=0`` forces the Python loop.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

_SRC = Path(__file__).resolve().parents[2] / "native" / "hotloop.c"
_lib: ctypes.CDLL | None = None
_ext = None          # the extension module (its run() calls handlers through the C API)
_tried = False

CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int32, ctypes.c_int32, ctypes.c_int32)
BP_FAST, BP_PYCB = 1, 2
#: ``ub_abi()`` of the hotloop.c this module speaks to
ABI = 2
#: run() results (see run_loop in hotloop.c)
RC_NATIVE_FAULT, RC_POLL = 4, 5


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    u64, i32, u32, vp = ctypes.c_uint64, ctypes.c_int32, ctypes.c_uint32, ctypes.c_void_p
    lib.ub_new.restype = vp
    lib.ub_new.argtypes = [u32, u32, vp]
    lib.ub_free.argtypes = [vp]
    lib.ub_set_cb.argtypes = [vp, CB]
    lib.ub_request_stop.argtypes = [vp]
    lib.ub_set_wakeup_fd.argtypes = [vp, i32]
    lib.ub_last_tid.argtypes = [vp]
    lib.ub_last_tid.restype = i32
    lib.ub_stats.argtypes = [vp, ctypes.POINTER(u64)]
    lib.ub_abi.restype = i32
    lib.ub_abi.argtypes = []
    if lib.ub_abi() != ABI:
        raise OSError(f"stale native loop build (abi {lib.ub_abi()}, need {ABI})")
    lib.ub_set_ids.argtypes = [vp, i32, u64]
    lib.ub_set_poll.argtypes = [vp, u64]
    lib.ub_bp_put.argtypes = [vp, u64, i32, u64, u64, u64, u64, i32, i32, i32, i32, u64, u64, u64, u64, u64]
    lib.ub_bp_put.restype = ctypes.c_int
    lib.ub_bp_del.argtypes = [vp, u64]
    lib.ub_bp_clear.argtypes = [vp]
    lib.ub_tid_add.argtypes = [vp, i32]
    lib.ub_tid_add.restype = ctypes.c_int
    lib.ub_tid_del.argtypes = [vp, i32]
    lib.ub_tid_clear.argtypes = [vp]
    lib.ub_run.argtypes = [vp, ctypes.POINTER(i32), ctypes.POINTER(i32), ctypes.POINTER(i32)]
    lib.ub_run.restype = ctypes.c_int
    return lib


def _build_cached() -> tuple[str, bool] | None:
    """Compile native/hotloop.c into the user cache: as an extension module when Python's
    headers are there (then ``run`` calls handlers through the C API), else a plain .so."""
    if not _SRC.exists():
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        return None
    digest = hashlib.sha256(_SRC.read_bytes() + sys.version.encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ubpf-py"
    inc = sysconfig.get_paths().get("include", "")
    variants = []
    if inc and os.path.exists(os.path.join(inc, "Python.h")):
        variants.append((cache / f"hotloop-{digest}-py.so", ["-I", inc], True))
    variants.append((cache / f"hotloop-{digest}.so", ["-DUBPF_NO_PYTHON"], False))
    for out, flags, is_ext in variants:
        if out.exists():
            return str(out), is_ext
        try:
            cache.mkdir(parents=True, exist_ok=True)
            tmp = out.with_suffix(f".{os.getpid()}.tmp")
            subprocess.run([cc, "-O2", "-shared", "-fPIC", *flags, "-o", str(tmp), str(_SRC)],
                           check=True, capture_output=True, timeout=120)
            os.replace(tmp, out)
            return str(out), is_ext
        except (OSError, subprocess.SubprocessError):
            continue
    return None


def _load_ext(path: str):
    spec = importlib.util.spec_from_file_location("ubpf_py._hotloop", path)
    if spec is None or spec.loader is None:
        return None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load() -> ctypes.CDLL | None:
    """The native loop library, or None (then the Python loop runs)."""
    global _lib, _tried, _ext
    if _tried:
        return _lib
    _tried = True
    if os.environ.get("UBPF_NATIVE", "1") == "0":
        return None
    path = None
    try:
        import ubpf_py._hotloop as ext  # built by setup.py
        path = ext.__file__
        _ext = ext
    except ImportError:
        built = _build_cached()
        if built is None:
            return None
        path, is_ext = built
        if is_ext:
            try:
                _ext = _load_ext(path)
            except ImportError:
                _ext = None
    if os.environ.get("UBPF_NATIVE_CTYPES") == "1":
        _ext = None      # force the ctypes callback path (benchmarks compare both)
    try:
        _lib = _declare(ctypes.CDLL(path))
    except AttributeError:       # an old installed build without ub_abi
        _lib = None
        built = _build_cached()
        if built is not None:
            path, is_ext = built
            _ext = _load_ext(path) if is_ext else None
            try:
                _lib = _declare(ctypes.CDLL(path))
            except (OSError, AttributeError):
                _lib = None
    except OSError as e:
        print(f"ubpf-py: native loop unavailable ({e}); using the Python loop", file=sys.stderr)
        _lib = None
    return _lib


class NativeLoop:
    """One ``struct ub_loop``: breakpoint and thread tables mirrored from the Python tracer."""

    def __init__(self, lib: ctypes.CDLL, regs_addr: int, callback) -> None:
        self.lib = lib
        self.bp_cap = 1024
        self.state = lib.ub_new(self.bp_cap, 4096, regs_addr)
        if not self.state:
            raise MemoryError("native loop state")
        self.cb = CB(callback)          # keep the thunk alive
        self.callback = callback
        self.ext_run = getattr(_ext, "run", None)
        lib.ub_set_cb(self.state, self.cb)
        self.regs_addr = regs_addr
        self.tid = ctypes.c_int32(0)
        self.status = ctypes.c_int32(0)
        self.regs_valid = ctypes.c_int32(0)
        self._stats = (ctypes.c_uint64 * 3)()
        self.wakeup_fd = -1
        self.poll_ns = 0

    def load_tables(self, bps: list[tuple], tids) -> None:
        """Replace both tables.  ``bps``: (addr, kind, next, slot, target, imm, reg, cond, token,
        flags, prog, facts, status, counter, cookie) tuples (see hotloop.c)."""
        lib, s = self.lib, self.state
        need = 1024
        while need < 2 * len(bps) + 16:
            need *= 2
        if need != self.bp_cap:
            stats = self.stats()
            lib.ub_free(s)
            self.state = s = lib.ub_new(need, 4096, self.regs_addr)
            if not s:
                raise MemoryError("native loop state")
            lib.ub_set_cb(s, self.cb)
            lib.ub_set_wakeup_fd(s, self.wakeup_fd)
            lib.ub_set_poll(s, self.poll_ns)
            self.bp_cap = need
            self._carry = stats
        lib.ub_bp_clear(s)
        for b in bps:
            lib.ub_bp_put(s, *b)
        lib.ub_tid_clear(s)
        for t in tids:
            lib.ub_tid_add(s, t)

    def set_ids(self, tgid: int, uid: int, gid: int) -> None:
        """The process whose hits the loop handles: tgid and credentials for the facts block."""
        self.lib.ub_set_ids(self.state, tgid, (gid & 0xFFFFFFFF) << 32 | (uid & 0xFFFFFFFF))

    def set_poll(self, interval_ns: int) -> None:
        """Return RC_POLL after a hit once ``interval_ns`` has passed (0 = never)."""
        self.poll_ns = interval_ns
        self.lib.ub_set_poll(self.state, interval_ns)

    def set_wakeup_fd(self, fd: int) -> None:
        self.wakeup_fd = fd
        self.lib.ub_set_wakeup_fd(self.state, fd)

    def run(self) -> int:
        if self.ext_run is not None:
            r, self.tid.value, self.status.value, self.regs_valid.value = self.ext_run(self.state, self.callback)
            return r
        return self.lib.ub_run(self.state, ctypes.byref(self.tid), ctypes.byref(self.status),
                               ctypes.byref(self.regs_valid))

    def stats(self) -> tuple[int, int, int]:
        self.lib.ub_stats(self.state, self._stats)
        c = getattr(self, "_carry", (0, 0, 0))
        return (self._stats[0] + c[0], self._stats[1] + c[1], self._stats[2] + c[2])

    def close(self) -> None:
        if self.state:
            self.lib.ub_free(self.state)
            self.state = None
