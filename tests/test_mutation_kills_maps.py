"""Map behaviour checked against the kernel's maps, written to kill mutants that survived
``benchmarks/mutation_score.py`` (named ``path#index`` in each test's docstring).

Each test runs the same operations on a kernel map (``bpf()`` syscalls) and on ubpf-py's
map created from the same attributes and compares every result; skipped (with the
reason) when kernel BPF is not available.
"""

from __future__ import annotations

import pytest
from test_maps_kernel import k32, pair, run_ops

from ubpf_py.maps import consts as C

pytestmark = pytest.mark.kernel


@pytest.fixture(scope="module", autouse=True)
def _kernel():
    from ubpf_py.kernel.syscall import kernel_bpf_skip_reason
    reason = kernel_bpf_skip_reason()
    if reason:
        pytest.skip(reason)


def test_stack_trace_next_key_past_the_buckets():
    """A key at or past the bucket count starts the walk over, like an absent one
    (stack_trace.py#81: the key equal to the bucket count indexed past the table)."""
    kmap, ours = pair(C.STACK_TRACE, 4, 64, 8)
    run_ops(kmap, ours, [("get_next_key", k32(k)) for k in (0, 7, 8, 9, 16, 0xFFFFFFFF)])
