"""The one-ABI rule: runtime/ubpf_abi.h is exactly what ubpf_py/abi generates, and C agrees."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from ubpf_py.abi.__main__ import c_header
from ubpf_py.abi.kernel import PT_REGS

REPO = Path(__file__).resolve().parents[1]


def test_committed_header_is_generated():
    assert (REPO / "runtime" / "ubpf_abi.h").read_text() == c_header(), \
        "regenerate with: python -m ubpf_py.abi > runtime/ubpf_abi.h"


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_header_static_asserts_hold_in_c(tmp_path):
    src = tmp_path / "t.c"
    src.write_text('#include "ubpf_abi.h"\nint f(void) { return 0; }\n')
    p = subprocess.run(["cc", "-ffreestanding", "-c", "-I", str(REPO / "runtime"), str(src),
                        "-o", str(tmp_path / "t.o")], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def test_pt_regs_is_the_kernel_layout():
    assert PT_REGS.size == 168
    assert PT_REGS.off("rip") == 16 * 8 and PT_REGS.off("rsp") == 19 * 8 and PT_REGS.off("rdi") == 14 * 8


def test_per_hit_reads_and_writes_of_shared_blocks_sit_on_separate_lines():
    """Blocks every CPU reads on every hit (a probe's PROBE_BLOCK, a site's SITE block) fill whole
    cache lines (the tracer allocates them CACHE_LINE-aligned), and a probe block's counters, which
    hits write, share no line with the fields hits read: a counted hit on one CPU never takes
    away the line the other CPUs read next."""
    from ubpf_py.abi.runtime import (
        CACHE_LINE,
        PROBE_BLOCK,
        PROBE_BLOCK_READ_PER_HIT,
        PROBE_BLOCK_WRITTEN_PER_HIT,
        SITE,
    )

    for lay in (PROBE_BLOCK, SITE):
        assert lay.align == CACHE_LINE and lay.size % CACHE_LINE == 0, lay.name
        body = c_header().split(f"struct {lay.name} {{\n", 1)[1].split("\n}", 1)[1]
        assert body.startswith(f" __attribute__((aligned({CACHE_LINE})));"), lay.name

    def lines(names):
        return {PROBE_BLOCK.off(n) // CACHE_LINE for n in names}

    assert not lines(PROBE_BLOCK_READ_PER_HIT) & lines(PROBE_BLOCK_WRITTEN_PER_HIT)
    assert set(PROBE_BLOCK_READ_PER_HIT) | set(PROBE_BLOCK_WRITTEN_PER_HIT) <= set(PROBE_BLOCK.offsets)


def test_thread_slots_share_no_line():
    """A thread's block (written on every hit: busy, the shadow stack) and its runtime stack are
    private to the thread: slots start line-aligned in a page-aligned table, and the runtime
    stack (below the slot's end) never reaches into the next slot's block."""
    from ubpf_py.abi.runtime import CACHE_LINE, THREAD_BLOCK
    from ubpf_py.intarget.space import PAGE, THREAD_SLOT_SIZE

    assert THREAD_BLOCK.align == CACHE_LINE and THREAD_BLOCK.size % CACHE_LINE == 0
    assert THREAD_SLOT_SIZE % CACHE_LINE == 0 and PAGE % CACHE_LINE == 0
