"""The native hit path: a JIT program called straight from the probe engine's C loop.

``JitProgram.native_entry()`` returns the address of a tiny generated function
``uint64_t f(uint64_t ctx)`` with the instance's runtime block baked in as a
constant; the C loop (native/hotloop.c) fills the runtime block's fact slots
(``layout.FACTS_FIRST_SLOT``..+5) and calls it with the pt_regs address, so a
hit of an eligible program never enters Python.

Eligible means nothing the program may call needs per-hit Python state that the C
loop does not provide:

* fact / clock / prandom helpers must run natively in this instance (``native_paths``);
* other helpers must be map or ring-buffer helpers of ``ubpf_py.helpers.map_helpers``
  (they read only ``env.hit.cpu``, which the trampolines copy from the facts block
  while ``SLOT_NATIVE`` is set) -- such Python trampolines are safe from the C loop:
  it always runs with the GIL released (the extension's ``run`` saves the thread state)
  and takes it back to call a Python handler;
* no tail calls, callbacks or callx (they dispatch through Python with ``env`` state);
* comm, printk, user-memory reads, stacks, signals, perf output stay Python: not eligible.

Faults: checked-mode faults and helper exceptions set ``rt[SLOT_STATUS]``; the
C loop tests that word after the call (``native_status_addr``) and stops with the
thread held at its breakpoint; ``JitProgram.raise_native_fault()`` raises the same
``VMFault`` / exception ``run()`` would have raised.
"""

from __future__ import annotations

import itertools
from typing import Any

from ubpf_py.vm.jit import backend as _backend
from ubpf_py.vm.jit import fastpath as _fastpath
from ubpf_py.vm.jit import layout as L
from ubpf_py.vm.jit.compiler import ProgramLayout

#: map / ring-buffer helpers whose standard implementations read only env.hit.cpu
PY_SAFE_HELPERS = frozenset({1, 2, 3, 87, 88, 89, 130, 131, 132, 133, 134})
_PY_SAFE_MODULE = "ubpf_py.helpers.map_helpers"
_ids = itertools.count()


def ineligible_reason(plan: ProgramLayout, native_helpers: tuple[int, ...],
                      helpers: dict[int, Any]) -> str | None:
    """Why a program cannot run from the C loop without Python, or None when it can: its
    compiled ``plan``, the helpers running natively in its instance, its helper table."""
    if plan.uses_tail_call:
        return "it uses bpf_tail_call"
    if plan.uses_callbacks:
        return "it uses callbacks (bpf_loop, for_each_map_elem, ...)"
    if plan.uses_callx:
        return "it uses callx"
    native = set(native_helpers)
    for hid in plan.helper_ids:
        if hid in _fastpath.FACT_SLOTS or hid in (5, 7, 125):
            if hid not in native:
                return f"helper {hid} does not run natively in this instance"
            continue
        if hid not in PY_SAFE_HELPERS:
            return f"helper {hid} needs per-hit state only the Python path provides"
        fn = helpers.get(hid)
        if getattr(fn, "__module__", None) != _PY_SAFE_MODULE:
            return f"helper {hid} is not ubpf-py's standard implementation"
    return None


def build_wrapper(entry1_addr: int, rt_addr: int) -> int:
    """Compile ``u64 f(u64 ctx)`` = ``entry1(ctx, rt)`` with ``rt[SLOT_NATIVE]`` set around it."""
    name = f"ubpf_native_hit_{next(_ids)}"
    flag = rt_addr + 8 * L.SLOT_NATIVE
    text = f"""
define i64 @{name}(i64 %ctx) {{
  %flag = inttoptr i64 {flag} to ptr
  store volatile i64 1, ptr %flag
  %rt = inttoptr i64 {rt_addr} to ptr
  %fn = inttoptr i64 {entry1_addr} to ptr
  %r = call i64 %fn(i64 %ctx, ptr %rt)
  store volatile i64 0, ptr %flag
  ret i64 %r
}}
"""
    return _backend.backend().compile(text, [name], "fast")[name]
