"""Native programs (``add_probe(native_prog=...)``) called from the Python side of the tracer.

The C loop (native/hotloop.c) calls them itself for plain entry hits; return probes, slow
stops, exact-cpu sessions and the pure-Python loop call them from here, filling the same
facts block and testing the same status word, so a program behaves the same either way.
"""

from __future__ import annotations

import ctypes
import struct

from ubpf_py.abi.runtime import FACTS
from ubpf_py.errors import ProbeError
from ubpf_py.probe.breakpoints import Probe

_PROG = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_uint64)
#: the facts block of a native program (``abi.runtime.FACTS``)
_FACTS = struct.Struct(f"<{FACTS.size // 8}Q")
assert [FACTS.word(n) for n in ("cpu", "pid_tgid", "uid_gid", "func_ip", "cookie")] == [0, 1, 2, 3, 4]
M64 = (1 << 64) - 1
_progs: dict[int, object] = {}


def _call_native(fn: int, ctx: int) -> int:
    """Call a native program ``u64 prog(u64 ctx)`` from the Python loop."""
    f = _progs.get(fn)
    if f is None:
        f = _progs[fn] = _PROG(fn)
    return f(ctx)


class NativeCallsMixin:
    """Tracer methods for native programs (needs ``self.probes`` and ``self.regs``)."""

    def _raise_native_failure(self) -> None:
        """The C loop stopped because a native program's status word is set: raise its error."""
        for p in self.probes.values():
            if p.native_status and ctypes.c_uint64.from_address(p.native_status).value:
                if p.native_error is not None:
                    p.native_error()
                raise ProbeError(f"the native program of probe {p.id} failed (status word set)")
        raise ProbeError("the native loop reported a failed native program but no status word is set")

    def _run_native(self, p: Probe, hit) -> None:
        """Run ``p``'s native program from Python (slow stops, return probes, Python loop):
        fill its facts block from ``hit`` first, raise its failure after."""
        if p.native_facts:
            _FACTS.pack_into((ctypes.c_char * FACTS.size).from_address(p.native_facts), 0,
                             hit.cpu & M64, (hit.tgid << 32 | hit.tid) & M64,
                             ((hit.gid & 0xFFFFFFFF) << 32 | (hit.uid & 0xFFFFFFFF)),
                             hit.func_ip & M64, hit.cookie & M64)
        _call_native(p.native_fn, self.regs.addr)
        if p.native_status and ctypes.c_uint64.from_address(p.native_status).value:
            if p.native_error is not None:
                p.native_error()
            raise ProbeError(f"the native program of probe {p.id} failed (status word set)")
