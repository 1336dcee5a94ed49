"""Which map storage runs on the C runtime's operations.

Maps whose allocator is shared with a traced process (``SharedArena.native_maps``)
are changed by the target's threads too, so their inserts, deletes and ring
producers must be the C runtime's (``runtime/maps.c``, ``runtime/ringbuf.c``),
called here through the copy linked into the tracer: one implementation, one lock
word, one slot allocator.  With no C compiler the maps keep their Python
implementation (the in-target path is then unavailable anyway).
"""

from __future__ import annotations

from typing import Any


def runtime_for(alloc: Any) -> Any:
    """The tracer-side runtime (``intarget.runtime_obj.TracerRuntime``) when maps on
    ``alloc`` must use it, else None."""
    if not getattr(alloc, "native_maps", False):
        return None
    from ubpf_py.intarget.runtime_obj import try_tracer_runtime

    return try_tracer_runtime()
