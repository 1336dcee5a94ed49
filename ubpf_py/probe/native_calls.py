"""Native programs (``add_probe(native_prog=...)``) called from the Python side of the tracer.

The C loop (native/hotloop.c) calls them itself for plain entry hits; return probes, slow
stops, exact-cpu sessions and the pure-Python loop call them from here, filling the same
facts block and testing the same status word, so a program behaves the same either way.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Callable

from ubpf_py.abi.runtime import FACTS
from ubpf_py.errors import ProbeError
from ubpf_py.probe.breakpoints import Probe
from ubpf_py.vm.env import HitContext

_PROG = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_uint64)
#: the facts block of a native program (``abi.runtime.FACTS``)
_FACTS = struct.Struct(f"<{FACTS.size // 8}Q")
assert [FACTS.word(n) for n in ("cpu", "pid_tgid", "uid_gid", "func_ip", "cookie")] == [0, 1, 2, 3, 4]
M64 = (1 << 64) - 1


class NativeCalls:
    """Runs probes' native programs from Python and turns a failed one into its error.

    ``regs_addr`` is the session's pt_regs buffer (every program's context); ``probes`` the
    tracer's probe table (shared), searched when the C loop reports a failure without saying
    which program failed."""

    def __init__(self, regs_addr: int, probes: dict[int, Probe]) -> None:
        self.regs_addr = regs_addr
        self.probes = probes
        self._fns: dict[int, Callable[[int], int]] = {}

    def run(self, p: Probe, hit: HitContext) -> None:
        """Run ``p``'s native program (slow stops, return probes, Python loop): fill its facts
        block from ``hit`` first, raise its failure after."""
        if p.native_facts:
            _FACTS.pack_into((ctypes.c_char * FACTS.size).from_address(p.native_facts), 0,
                             hit.cpu & M64, (hit.tgid << 32 | hit.tid) & M64,
                             ((hit.gid & 0xFFFFFFFF) << 32 | (hit.uid & 0xFFFFFFFF)),
                             hit.func_ip & M64, hit.cookie & M64)
        fn = self._fns.get(p.native_fn)
        if fn is None:
            fn = self._fns[p.native_fn] = _PROG(p.native_fn)
        fn(self.regs_addr)
        if _failed(p):
            _raise(p)

    def raise_failure(self) -> None:
        """The C loop stopped because a native program's status word is set: raise its error."""
        for p in self.probes.values():
            if _failed(p):
                _raise(p)
        raise ProbeError("the native loop reported a failed native program but no status word is set")


def _failed(p: Probe) -> bool:
    return bool(p.native_status and ctypes.c_uint64.from_address(p.native_status).value)


def _raise(p: Probe) -> None:
    if p.native_error is not None:
        p.native_error()
    raise ProbeError(f"the native program of probe {p.id} failed (status word set)")
