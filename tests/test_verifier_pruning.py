"""Pruning at least as strong as the kernel's: where checkpoints are taken.

The kernel takes a checkpoint at a prune point only if 2 jumps and 8 instructions
were processed since the last one (is_state_visited).  ubpf-py also prunes at the
fall-through of every conditional jump, which the kernel does not; a checkpoint
there must not count for that spacing, or it hides the checkpoint the kernel
takes a few instructions later, and a second path reaching that point is walked
again instead of pruned (biotop, klockstat, filetop, tcptracer walked up to 16%
more instructions than the kernel that way).  The kernel's processed count is
checked when root.
"""

from __future__ import annotations

import ctypes
import os
import re

import pytest
from kernel_verdict import kernel_skip_reason
from test_verifier import prog

import ubpf_py.verifier as V
from ubpf_py.verifier import structure, verify_program

BODY = 24
#: r6 == 0 jumps over two instructions to k; the fall-through reaches k first.  The jeq is
#: the second jump since the start, so the kernel takes no checkpoint at it but one at k
#: (2 jumps, 13 insns); ubpf-py's fall-through checkpoint comes first and must not hide it
HIDDEN_CHECKPOINT = "\n".join(
    ["call 7", "mov %r6, %r0"] + ["mov %r1, 0"] * 7 + ["jeq %r6, 0, k", "mov %r1, 0", "mov %r1, 0", "k:"]
    + ["mov %r0, 0"] * BODY + ["exit"])


def _processed(text: str) -> int:
    r = verify_program(prog(text), [], mode="warn", time_budget=20)
    assert r.ok, r.log
    return r.processed


def test_fallthrough_checkpoint_does_not_hide_the_kernels() -> None:
    n = len(prog(HIDDEN_CHECKPOINT).instructions)
    # the fall-through path walks every instruction once; the jump's path is pruned at k
    assert _processed(HIDDEN_CHECKPOINT) <= n + 1


def test_fallthrough_checkpoint_counted_would_walk_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    """If fall-through checkpoints counted for the spacing (all prune points the kernel's), the
    jump's path would walk the body again: the test above depends on the rule."""
    real = structure.analyse

    def counted(insns, *a, **k):
        cfg = real(insns, *a, **k)
        cfg.extra_points = set()
        return cfg

    monkeypatch.setattr(V, "analyse", counted)
    n = len(prog(HIDDEN_CHECKPOINT).instructions)
    assert _processed(HIDDEN_CHECKPOINT) > n + BODY


def kernel_processed(text: str) -> tuple[bool, int]:
    """(accepted, processed insns) from the running kernel's verifier (BPF_LOG_STATS)."""
    from ubpf_py.isa.instruction import encode
    from ubpf_py.kernel.prog import KPROBE
    from ubpf_py.kernel.syscall import BPF_PROG_LOAD, ProgLoadAttr, bpf_rc

    code = encode(prog(text).instructions)
    insns = ctypes.create_string_buffer(code, len(code))
    lic = ctypes.create_string_buffer(b"GPL\0")
    log = ctypes.create_string_buffer(1 << 16)
    attr = ProgLoadAttr(prog_type=KPROBE, insn_cnt=len(code) // 8, insns=ctypes.addressof(insns),
                        license=ctypes.addressof(lic), log_level=4, log_size=len(log),
                        log_buf=ctypes.addressof(log))
    fd = bpf_rc(BPF_PROG_LOAD, attr)
    if fd >= 0:
        os.close(fd)
    m = re.search(r"processed (\d+) insns", log.value.decode(errors="replace"))
    return fd >= 0, int(m.group(1)) if m else -1


@pytest.mark.kernel
def test_hidden_checkpoint_processed_no_more_than_kernel() -> None:
    reason = kernel_skip_reason()
    if reason:
        pytest.skip(reason)
    ok, kernel = kernel_processed(HIDDEN_CHECKPOINT)
    assert ok and kernel > 0
    assert _processed(HIDDEN_CHECKPOINT) <= kernel
