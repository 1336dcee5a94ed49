"""The processes and threads the tracer knows: what each address space holds of ours.

Shared by the tracer (event loop), its detach logic (``restore``) and the session
(``engine``); kept apart from all three so none of them imports another for these types.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field

from ubpf_py.errors import ProbeError, TargetError
from ubpf_py.probe import ptrace as P
from ubpf_py.probe.breakpoints import Breakpoint
from ubpf_py.probe.scratch import Injector, ScratchArea
from ubpf_py.probe.uretprobe import ShadowStack


@dataclass(slots=True, eq=False)
class Thread:
    tid: int
    proc: Proc
    shadow: ShadowStack = field(default_factory=ShadowStack)
    stopped: bool = False
    pending_sig: int = 0
    #: stopped on one of our int3 bytes with the hit not finished yet (rewind on detach)
    at_bp: bool = False
    #: a zombie that cannot stop (a leader whose exit waits for the other threads)
    dead: bool = False
    #: a thread the process created while it was not traced (``Proc.no_clone``), seized only to
    #: stop the world for a moment (late arming, detach) and released afterwards
    temp: bool = False


@dataclass(slots=True, eq=False)
class Proc:
    """One address space we patch (the target, followed fork children, a vfork child)."""

    tgid: int
    mem: P.ProcMem
    inj: Injector
    scratch: ScratchArea
    bps: dict[int, Breakpoint] = field(default_factory=dict)
    threads: dict[int, Thread] = field(default_factory=dict)
    run_handlers: bool = True
    #: a vfork child sharing its parent's memory (bps/scratch are the parent's objects)
    vfork_parent: Proc | None = None
    exit_status: int | None = None
    #: USDT semaphores we incremented: address -> how many times (decremented on detach)
    semas: dict[int, int] = field(default_factory=dict)
    #: (probe id, semaphore address) pairs already counted
    sema_done: set = field(default_factory=set)
    #: its traced threads run with ``NOCLONE_OPTIONS``: threads it creates are not traced (every
    #: probe runs in the target and no int3 is armed; see ``Tracer.settle_clone_tracing``)
    no_clone: bool = False

    def any_stopped_tid(self) -> int:
        for t in self.threads.values():
            if t.stopped:
                return t.tid
        raise ProbeError(f"no stopped thread in pid {self.tgid} to run an injected call")


def new_proc(tgid: int) -> Proc:
    try:
        mem = P.ProcMem(tgid)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM, errno.ESRCH, errno.ENOENT):
            raise P.attach_error(tgid, errno.ESRCH if e.errno == errno.ENOENT else errno.EPERM) from None
        raise TargetError(f"cannot open /proc/{tgid}/mem: {e.strerror} (run as the target's user or root)") from None
    inj = Injector(mem)
    return Proc(tgid, mem, inj, ScratchArea(mem, inj))
