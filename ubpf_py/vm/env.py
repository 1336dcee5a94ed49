"""Contracts between the engines, the helpers, the maps and the probe engine.

Nothing here knows about ptrace or about instruction semantics; it only says
what flows between them:

* ``HitContext`` -- facts about the current probe hit.  The probe engine owns
  one per attachment and *updates it in place* on every hit (no allocation on
  the hot path); helpers read it.
* ``UserMemory`` -- how helpers read/write the traced process's memory.
* ``HelperFn`` -- a helper as the engines call it: five u64 arguments, one
  integer result (the engine masks it to u64).
* ``ExecEnv`` -- everything a running program can reach: memory regions,
  helpers by id, maps by handle address, the hit context, and the hooks the
  engines provide for tail calls and callbacks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ubpf_py.vm.memory import MemoryMap

HelperFn = Callable[[int, int, int, int, int], int]


class UserMemory(Protocol):
    """Access to the traced process's address space (process_vm_readv/writev)."""

    def read(self, addr: int, size: int) -> bytes | None:
        """``size`` bytes at ``addr``, or None if any of it is unmapped."""

    def read_str(self, addr: int, max_size: int) -> bytes | None:
        """Bytes up to and excluding the first NUL (at most ``max_size - 1``), or None on fault."""

    def write(self, addr: int, data: bytes) -> bool:
        """Write; False if the memory is not writable/mapped."""


class NoUserMemory:
    """UserMemory for programs that run without a target (tests, BPF_PROG_TEST_RUN-like)."""

    def read(self, addr: int, size: int) -> bytes | None:
        return None

    def read_str(self, addr: int, max_size: int) -> bytes | None:
        return None

    def write(self, addr: int, data: bytes) -> bool:
        return False


@dataclass(slots=True)
class HitContext:
    """Per-hit facts, filled by the probe engine before each program run.

    ``ctx_addr`` is the host address of the kernel-layout ``struct pt_regs``
    (168 bytes) built from the thread's registers; ``ip`` there equals the
    probe address for entry probes.
    """

    tgid: int = 0
    tid: int = 0
    uid: int = 0
    gid: int = 0
    comm: bytes = b""
    cpu: int = 0
    func_ip: int = 0
    cookie: int = 0
    ctx_addr: int = 0
    is_return: bool = False
    user_memory: UserMemory = field(default_factory=NoUserMemory)
    #: frame-pointer unwinder supplied by the probe engine: max_frames -> return addresses,
    #: innermost first (the first entry is the current ip)
    unwind_user_stack: Callable[[int], list[int]] | None = None
    #: sends a signal to the current thread/process (bpf_send_signal); None when unavailable
    send_signal: Callable[[int], int] | None = None
    #: anything engine-specific (the probe engine may hang its own state here)
    extra: Any = None


class Executable(Protocol):
    """A loaded program ready to run on one engine."""

    def run(self, ctx_addr: int) -> int:
        """Run with r1 = ``ctx_addr``; returns r0 (u64)."""


@dataclass
class ExecEnv:
    """Everything a running program can reach.  One per loaded object/collection.

    Engines fill in ``invoke_callback`` and ``tail_call`` while a program is
    running (they are engine-specific); helpers call them.
    """

    memory: MemoryMap
    hit: HitContext
    #: helper implementations by kernel helper id
    helpers: dict[int, HelperFn] = field(default_factory=dict)
    #: map objects by their handle address (the value lddw loads for a map reference)
    maps_by_addr: dict[int, Any] = field(default_factory=dict)
    #: engine hook: call a BPF function pointer (from lddw BPF_PSEUDO_FUNC) with r1..r5
    invoke_callback: Callable[[int, int, int, int, int, int], int] | None = None
    #: resolver for tail calls: (prog_array map handle, index) -> Executable or None
    resolve_tail_call: Callable[[int, int], Any] | None = None
    #: tail calls taken in the current chain (kernel MAX_TAIL_CALL_CNT = 33); see ARCHITECTURE.md
    tail_call_count: int = 0
    #: where bpf_trace_printk/vprintk messages go: (hit, message text without newline)
    printk: Callable[[HitContext, str], None] | None = None
