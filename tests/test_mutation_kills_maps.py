"""Map behaviour checked against the kernel's maps, written to kill mutants that survived
``benchmarks/mutation_score.py`` (named ``path#index`` in each test's docstring).

Where the kernel can be asked (user-space map operations through ``bpf()``), the same
operations run on a kernel map and compare every result; ring-buffer producer rules
(reachable only from programs) follow the kernel's bpf_ringbuf_commit/reserve.
"""

from __future__ import annotations

import pytest
from test_maps_kernel import k32, pair, run_ops

from ubpf_py.maps import consts as C


def _need_kernel() -> None:
    from ubpf_py.kernel.syscall import kernel_bpf_skip_reason
    reason = kernel_bpf_skip_reason()
    if reason:
        pytest.skip(reason)


@pytest.mark.kernel
def test_stack_trace_next_key_past_the_buckets():
    """A key at or past the bucket count starts the walk over, like an absent one
    (stack_trace.py#81: the key equal to the bucket count indexed past the table)."""
    _need_kernel()
    kmap, ours = pair(C.STACK_TRACE, 4, 64, 8)
    run_ops(kmap, ours, [("get_next_key", k32(k)) for k in (0, 7, 8, 9, 16, 0xFFFFFFFF)])


def _ring():
    from ubpf_py.maps import create_map
    from ubpf_py.obj.spec import MapSpec

    rb = create_map(MapSpec("rb", C.RINGBUF, 0, 0, 4096))
    woken = []
    rb.wakeup = lambda: woken.append(rb.producer_pos)
    return rb, woken


def test_ringbuf_commit_wakes_the_consumer_only_at_its_position():
    """The kernel's bpf_ringbuf_commit: wake the consumer when the committed record is the one
    it waits at (consumer position), never with BPF_RB_NO_WAKEUP, always with
    BPF_RB_FORCE_WAKEUP (ringbuf.py#140: the consumer position or-ed with the mask)."""
    rb, woken = _ring()
    first = rb.reserve(8)
    second = rb.reserve(8)
    rb.commit(second)                    # not where the consumer waits
    assert woken == []
    rb.commit(first, flags=C.BPF_RB_NO_WAKEUP)
    assert woken == []
    rb.commit(rb.reserve(8), flags=C.BPF_RB_FORCE_WAKEUP)
    assert len(woken) == 1
    assert len(rb.consume()) == 3
    rb.commit(rb.reserve(8))             # the consumer caught up: it waits at this record
    assert len(woken) == 2


def test_ringbuf_oversized_reserve_is_one_drop():
    """A record over the kernel's maximum (RINGBUF_MAX_RECORD_SZ) is refused with NULL and
    counted once (ringbuf.py#48: counted twice)."""
    from ubpf_py.maps.ringbuf import RINGBUF_MAX_RECORD_SZ

    rb, _ = _ring()
    assert rb.reserve(RINGBUF_MAX_RECORD_SZ + 1) == 0
    assert rb.dropped == 1


def test_ringbuf_commit_and_discard_in_a_shared_arena():
    """The same rules through the tracer-side C runtime that in-target maps use: a submitted
    record is read, a discarded one is skipped (ringbuf.py#103: every commit a discard)."""
    from ubpf_py.intarget.arena import SharedArena
    from ubpf_py.maps import create_map
    from ubpf_py.obj.spec import MapSpec

    rb = create_map(MapSpec("rb", C.RINGBUF, 0, 0, 4096), alloc=SharedArena(1 << 20))
    if rb._c is None:
        pytest.skip("the tracer-side runtime could not be built (no C compiler)")
    kept, dropped = rb.reserve(8), rb.reserve(8)
    rb.commit(dropped, discard=True)
    rb.commit(kept)
    assert len(rb.consume()) == 1
