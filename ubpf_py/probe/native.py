"""Loading and driving the native stop loop (native/hotloop.c) through ctypes.

The loop is built by the package build as the extension module
``ubpf_py._hotloop`` (setup.py): its ``run()`` enters the loop (GIL released,
taken back only to call the tracer's callback for hits with Python handlers),
its table functions are reached through ctypes.  When the extension is missing
(a source checkout that was never built) the file is compiled once with the
system C compiler and Python's headers into a per-user cache; when that is
impossible too, ``load()`` returns None and the pure-Python loop is used.
``UBPF_NATIVE=0`` forces the Python loop.

``NativeLoop`` also keeps the loop's mirror of the breakpoint table (``sync``):
which breakpoints the loop may finish itself, and what it calls at each.
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
from collections.abc import Callable
from pathlib import Path

from ubpf_py.abi.runtime import BP_FAST, BP_PYCB, BP_REWIND
from ubpf_py.probe import ool as O
from ubpf_py.probe.breakpoints import Breakpoint
from ubpf_py.probe.procs import Proc

_SRC = Path(__file__).resolve().parents[2] / "native" / "hotloop.c"
_lib: ctypes.CDLL | None = None
_ext = None          # the extension module (its run() calls handlers through the C API)
_tried = False

#: ``ub_abi()`` of the hotloop.c this module speaks to
ABI = 3
#: run() results (see run_loop in hotloop.c): stopped by a request or a signal; a stop for
#: Python (tid/status set); a Python handler failed; handlers ran but the displaced instruction
#: faulted (Python finishes it); a native program failed; the poll interval has passed
RC_INTERRUPTED, RC_STOP, RC_HANDLER_FAILED, RC_FINISH, RC_NATIVE_FAULT, RC_POLL = 0, 1, 2, 3, 4, 5


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    u64, i32, u32, vp = ctypes.c_uint64, ctypes.c_int32, ctypes.c_uint32, ctypes.c_void_p
    lib.ub_new.restype = vp
    lib.ub_new.argtypes = [u32, u32, vp]
    lib.ub_free.argtypes = [vp]
    lib.ub_request_stop.argtypes = [vp]
    lib.ub_set_wakeup_fd.argtypes = [vp, i32]
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
    return lib


def _build_cached() -> str | None:
    """Compile native/hotloop.c into the user cache as an extension module (needs Python's
    headers; without them there is no C loop)."""
    if not _SRC.exists():
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        return None
    digest = hashlib.sha256(_SRC.read_bytes() + sys.version.encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ubpf-py"
    inc = sysconfig.get_paths().get("include", "")
    if not inc or not os.path.exists(os.path.join(inc, "Python.h")):
        return None
    out = cache / f"hotloop-{digest}-py.so"
    if out.exists():
        return str(out)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        subprocess.run([cc, "-O2", "-shared", "-fPIC", "-I", inc, "-o", str(tmp), str(_SRC)],
                       check=True, capture_output=True, timeout=120)
        os.replace(tmp, out)
        return str(out)
    except (OSError, subprocess.SubprocessError):
        return None


def _load_ext(path: str):
    spec = importlib.util.spec_from_file_location("ubpf_py._hotloop", path)
    if spec is None or spec.loader is None:
        return None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _open(ext) -> ctypes.CDLL:
    """The table functions of extension module ``ext`` (OSError/AttributeError: stale or foreign)."""
    if not callable(getattr(ext, "run", None)):
        raise AttributeError("no run()")
    return _declare(ctypes.CDLL(ext.__file__))


def load() -> ctypes.CDLL | None:
    """The native loop library, or None (then the Python loop runs)."""
    global _lib, _tried, _ext
    if _tried:
        return _lib
    _tried = True
    if os.environ.get("UBPF_NATIVE", "1") == "0":
        return None
    try:
        import ubpf_py._hotloop as ext  # built by setup.py
        _lib, _ext = _open(ext), ext
        return _lib
    except (ImportError, AttributeError, OSError):
        pass        # not built, or an old build (another ABI): the cached build instead
    path = _build_cached()
    if path is None:
        return None
    try:
        ext = _load_ext(path)
        _lib, _ext = _open(ext), ext
    except (ImportError, AttributeError, OSError) as e:
        print(f"ubpf-py: native loop unavailable ({e}); using the Python loop", file=sys.stderr)
        _lib = _ext = None
    return _lib


class NativeLoop:
    """One ``struct ub_loop``: the C stop loop, with breakpoint and thread tables mirrored from
    the Python tracer (``sync``).  ``callback(token, tid, cpu) -> int`` is called for hits of
    breakpoints with Python handlers (``tokens[token]`` is the breakpoint)."""

    def __init__(self, lib: ctypes.CDLL, regs_addr: int, callback: Callable[[int, int, int], int]) -> None:
        self.lib = lib
        self.bp_cap = 1024
        self.state = lib.ub_new(self.bp_cap, 4096, regs_addr)
        if not self.state:
            raise MemoryError("native loop state")
        self.callback = callback
        self.ext_run = _ext.run
        self.regs_addr = regs_addr
        #: the breakpoints of the loaded table, by token
        self.tokens: list[Breakpoint] = []
        #: the last run()'s stop: thread, wait status, whether the register buffer holds its registers
        self.tid = self.status = 0
        self.regs_valid = False
        self._stats = (ctypes.c_uint64 * 3)()
        self._carry = (0, 0, 0)
        self.wakeup_fd = -1
        self.poll_ns = 0

    def sync(self, main: Proc | None, exact_facts: bool, uid_gid: tuple[int, int]) -> None:
        """Mirror ``main``'s armed breakpoints and threads into the loop's tables.

        A breakpoint is finished in C (BP_FAST) unless Python must see it (dlopen watch, return
        probes, indirect branches, a vfork child); a single probe with a native program and no
        Python handler runs with no Python at all unless ``exact_facts`` asks for per-thread cpu
        or ids it reads (the C loop has neither); other probes get the Python callback (BP_PYCB).
        ``uid_gid``: the credentials the loop puts in native programs' facts blocks."""
        rows = []
        tokens: list[Breakpoint] = []
        if main is not None:
            #: a trap guard in the target: every hit is rewound at once (abi.runtime.BP_REWIND)
            rewind = BP_REWIND if main.scratch.guard is not None else 0
            for bp in main.bps.values():
                if not bp.armed:
                    continue
                plan = bp.plan
                fast = (bp.internal is None and not bp.ret_probes and plan.kind != O.K_IND
                        and main.run_handlers)
                prog = facts = status = counter = cookie = 0
                p0 = bp.probes[0] if len(bp.probes) == 1 else None
                if p0 is not None and p0.native_fn and p0.handler is None and not (p0.native_facts and exact_facts):
                    prog = p0.native_fn      # runs with no Python at all
                    facts, status, cookie = p0.native_facts, p0.native_status, p0.cookie
                    if p0.native_counter is None:
                        p0.native_counter = (ctypes.c_uint64 * 2)()
                    counter = ctypes.addressof(p0.native_counter)
                flags = (BP_FAST if fast else 0) | (BP_PYCB if bp.probes and not prog else 0) | rewind
                rows.append((bp.addr, plan.kind, plan.next, plan.slot, plan.target, plan.imm, plan.reg,
                             plan.cond, len(tokens), flags, prog, facts, status, counter, cookie))
                tokens.append(bp)
            if rewind and main.scratch.tramp:   # returns through the trampoline: Python's, rewound first
                rows.append((main.scratch.tramp, 0, 0, 0, 0, 0, 0, 0, -1, BP_REWIND, 0, 0, 0, 0, 0))
        self.tokens = tokens
        self._load_tables(rows, list(main.threads) if main is not None else [])
        if main is not None:
            uid, gid = uid_gid
            self.lib.ub_set_ids(self.state, main.tgid, (gid & 0xFFFFFFFF) << 32 | (uid & 0xFFFFFFFF))

    def _load_tables(self, bps: list[tuple], tids) -> None:
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

    def set_poll(self, interval_ns: int) -> None:
        """Return RC_POLL after a hit once ``interval_ns`` has passed (0 = never)."""
        self.poll_ns = interval_ns
        self.lib.ub_set_poll(self.state, interval_ns)

    def set_wakeup_fd(self, fd: int) -> None:
        self.wakeup_fd = fd
        self.lib.ub_set_wakeup_fd(self.state, fd)

    def request_stop(self) -> None:
        """Make run() return 0 at its next check (safe from a signal handler)."""
        self.lib.ub_request_stop(self.state)

    def run(self) -> int:
        """Run the loop until a stop it does not handle; the result codes are run_loop's
        (hotloop.c), the stop is in ``tid``/``status``/``regs_valid``."""
        r, self.tid, self.status, rv = self.ext_run(self.state, self.callback)
        self.regs_valid = bool(rv)
        return r

    def stats(self) -> tuple[int, int, int]:
        self.lib.ub_stats(self.state, self._stats)
        c = self._carry
        return (self._stats[0] + c[0], self._stats[1] + c[1], self._stats[2] + c[2])

    def close(self) -> None:
        if self.state:
            self.lib.ub_free(self.state)
            self.state = None
