"""Map behaviour checked against the kernel's maps, written to kill mutants that survived
``benchmarks/mutation_score.py`` (named in each test's docstring: ``path#index`` from the earlier hand-written mutator,
``path:operator#occurrence`` from cosmic-ray).

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


@pytest.mark.kernel
def test_prog_array_lookup_at_and_past_max_entries():
    """A user-space lookup of a program array at or past max_entries finds nothing, like the
    kernel's (fd_array.py:ReplaceComparisonOperator_GtE_Gt#0: the index equal to max_entries
    read past the table)."""
    _need_kernel()
    kmap, ours = pair(C.PROG_ARRAY, 4, 4, 4)
    run_ops(kmap, ours, [("lookup", k32(k)) for k in (0, 3, 4, 5, 0xFFFFFFFF)])


@pytest.mark.kernel
def test_cgroup_array_update_in_and_past_range():
    """Storing a cgroup (an open cgroup v2 directory's fd) in a cgroup array: every index below
    max_entries takes it, the one past is E2BIG, like the kernel's
    (cgroup_array.py:ReplaceComparisonOperator_LtE_Gt#0: every valid index refused)."""
    import os

    from ubpf_py.helpers.kernel_task import cgroup2_root

    _need_kernel()
    root = cgroup2_root()
    if root is None:
        pytest.skip("no cgroup v2 hierarchy mounted")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        kmap, ours = pair(C.CGROUP_ARRAY, 4, 4, 2)
        run_ops(kmap, ours, [("update", k32(k), k32(fd)) for k in (0, 1, 2)])
    finally:
        os.close(fd)


class _Counting:
    """An allocator that counts the bytes maps ask for (backed by the heap allocator)."""

    def __init__(self) -> None:
        from ubpf_py.vm.memory import HEAP
        self.inner, self.total = HEAP, 0

    def alloc(self, size: int, align: int = 16):
        self.total += size
        return self.inner.alloc(size, align)


@pytest.mark.parametrize("t, key, value, n", [(C.RINGBUF, 0, 0, 1 << 16), (C.STACK_TRACE, 4, 127 * 8, 64),
                                              (C.ARRAY, 4, 256, 256), (C.QUEUE, 0, 64, 512),
                                              (C.BLOOM_FILTER, 0, 8, 4096)])
def test_creation_estimate_covers_the_allocation(t, key, value, n):
    """The memory budget's creation estimate is not below what creating the map allocates (the
    limit would let through a map it cannot hold); a ring buffer maps its data area twice
    (budget.py:AddNot#10: a ring buffer estimated as allocating nothing at creation)."""
    from ubpf_py.maps import create_map
    from ubpf_py.maps.budget import footprint
    from ubpf_py.obj.spec import MapSpec

    spec = MapSpec("m", t, key, value, n)
    counting = _Counting()
    create_map(spec, alloc=counting)
    now, _ = footprint(spec)
    # the fixed part (the map's handle, a ring buffer's header page) is left out of the estimate
    assert counting.total - 2 * 4096 <= now, (counting.total, now)
