"""Probes (what the user asked for) and breakpoints (int3 bytes in one address space).

A ``Probe`` names a location the kernel way -- ``(binary path, file offset)``
plus is_return and cookie -- and is independent of any process.  A
``Breakpoint`` is that location mapped at a runtime address of one address
space: the original byte, the plan for the displaced instruction, and the
probes that fire there (several probes may share an address; their handlers
run in attach order, entry probes before the return address is hijacked).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

from ubpf_py.errors import ProbeError
from ubpf_py.probe.ool import Plan

Handler = Callable[..., None]


@dataclass(slots=True)
class Probe:
    """One attachment: a file location, a handler and its cookie."""

    id: int
    binary_path: str
    file_offset: int
    handler: Handler
    is_return: bool
    cookie: int
    hits: int = 0
    handler_ns: int = 0
    #: native handler: an integer function pointer ``u64 prog(u64 ctx)`` (0 = Python handler)
    native_fn: int = 0
    #: USDT semaphore (file offset of a u16 in a writable segment), incremented while armed; 0 = none
    ref_ctr_offset: int = 0
    #: native program extras (``ProbeSession.add_probe``): facts block filled before each call
    #: (layout in native/hotloop.c), status word (non-zero = the program failed) and
    #: ``native_error()`` that raises the failure; 0/None = none
    native_facts: int = 0
    native_status: int = 0
    native_error: Callable[[], None] | None = None
    #: two u64 (hits, ns) the C loop counts native-only hits in (a ctypes array)
    native_counter: object = None
    #: in-target program: its entry address in the session's in-target image (0 = none);
    #: sites that cannot take a jump fall back to an int3 and ``handler``/``native_fn``
    target_entry: int = 0
    #: the ids the in-target program reports ("pid": pid/tgid, printk lines; "uid": uid/gid): in a
    #: process of a child pid or user namespace it takes the ptrace path
    #: (``intarget.process.namespace_reason``)
    target_reports_ids: frozenset[str] = frozenset()


@dataclass(slots=True)
class Breakpoint:
    """An armed int3 at ``addr`` in one address space."""

    addr: int
    orig: bytes                 # the original bytes of the whole displaced instruction
    plan: Plan
    probes: list[Probe] = field(default_factory=list)      # entry probes
    ret_probes: list[Probe] = field(default_factory=list)  # return probes (function entry)
    internal: Callable[[int], None] | None = None           # engine-internal (dynamic linker)
    armed: bool = False
    hits: int = 0
    #: push rbp / endbr64: a function's first instruction (the unwinder then reports [rsp] too)
    at_entry: bool = False


def check_offset(path: str, file_offset: int) -> None:
    size = os.path.getsize(path)
    if not 0 <= file_offset < size:
        raise ProbeError(f"probe offset 0x{file_offset:x} is outside {path} ({size} bytes)")
