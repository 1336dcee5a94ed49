"""Return probes: return-address hijacking with a per-thread shadow stack.

At the entry of a function with return probes the return address at ``[rsp]``
is replaced by the trampoline (an int3 in the scratch page) and pushed on the
thread's shadow stack with the stack slot it came from.  When the trampoline
traps, rsp is one word above the slot of the returning frame; every shadow
entry whose slot is *below* that (a frame abandoned by longjmp or an
exception) is dropped first -- the kernel's rule -- and the top entry is the
returning call.  A tail call from one probed function into another finds the
trampoline already at ``[rsp]``: the new entry is *chained* (its original
return address is the trampoline) and one trap then completes both, innermost
first, like the kernel's chained return instances.

Entries are mirrored into a ``ReturnLog`` (shared memory) so the guardian can
put the original return addresses back if the tracer is killed.
"""

from __future__ import annotations

from dataclasses import dataclass

from ubpf_py.probe.breakpoints import Probe

MAX_DEPTH = 64


@dataclass(slots=True)
class RetEntry:
    slot: int          # stack address that held the return address
    orig_ret: int      # the original return address (for chained entries: the one below's)
    func: int          # probed function address (func_ip for the return probe)
    probes: list[Probe]
    chained: bool = False  # tail call: completes together with the entry below it
    log_index: int = -1


class ShadowStack:
    """The pending returns of one thread, innermost last."""

    __slots__ = ("entries",)

    def __init__(self) -> None:
        self.entries: list[RetEntry] = []

    def drop_abandoned(self, sp_slot: int) -> list[RetEntry]:
        """Remove entries whose slot is below ``sp_slot`` (their frames are gone); returns them."""
        dropped = []
        e = self.entries
        while e and e[-1].slot < sp_slot:
            dropped.append(e.pop())
        return dropped
