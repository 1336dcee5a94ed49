"""What the verifier's rule modules (``calls``, ``memory``, ``globalfuncs``) need from the walk.

``checker.Checker`` drives the abstract interpretation and calls into those modules; they in turn
need a few things of the walk (map definitions, fresh ids, the CFG, pushing a branch).  This
Protocol is that interface, so the rule modules depend on it and not on the checker: the layering
is context <- rule modules <- checker, with no cycle.
"""

from __future__ import annotations

from typing import Any, Protocol

from ubpf_py.obj.spec import MapSpec
from ubpf_py.verifier import state as S
from ubpf_py.verifier.structure import Cfg


class CheckContext(Protocol):
    #: the object's maps, then the inner-map templates of map-in-maps
    maps: list[MapSpec]
    #: outer map index -> index of its inner template in ``maps``
    inner_of: dict[int, int]
    cfg: Cfg
    sleepable: bool
    #: start instruction -> ``globalfuncs.GlobalFunc`` of the global functions verified alone
    global_funcs: dict[int, Any]
    #: the walk is inside a global function verified alone
    in_global: bool
    #: how many of ``maps`` are the object's (the rest are inner-map templates)
    n_object_maps: int
    #: struct bpf_map field loads: insn -> ((map, field, offset in field, size, sign-extended), value)
    map_field_loads: dict[int, tuple[tuple, int]]
    #: loads through kernel pointers (``btfptr``): insn -> {(object kind, struct, field, has a value)}
    btf_loads: dict[int, set[tuple]]

    def new_id(self) -> int: ...

    def note_stack(self, frame: S.Frame, depth: int) -> None: ...

    def enter_function(self, start: int) -> None: ...

    def push(self, st: S.VerifierState, pc: int) -> None: ...

    def check_global_call(self, st: S.VerifierState, pc: int, target: int) -> None: ...

    def note_helper_stack_read(self, st: S.VerifierState, frame: int, lo: int, hi: int) -> None: ...

    def note_precise_stack(self, st: S.VerifierState, frame: int, lo: int, hi: int) -> None: ...
