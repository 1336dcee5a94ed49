"""Shared fixtures: the built corpus and skip reasons for root/kernel tests."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from paths import CONFORMANCE, CORPUS, build_corpus


@pytest.fixture(scope="session")
def corpus_build() -> Path:
    """The directory holding the built corpus objects and targets."""
    if not CORPUS.is_dir():
        pytest.skip(f"shared corpus not found at {CORPUS}")
    return build_corpus()


@pytest.fixture(scope="session")
def conformance_dir() -> Path:
    if not CONFORMANCE.is_dir():
        pytest.skip(f"bpf_conformance not found at {CONFORMANCE}")
    return CONFORMANCE


def root_skip_reason() -> str | None:
    return None if os.geteuid() == 0 else "needs root"


@pytest.fixture(autouse=True)
def _fresh_verifier_memo() -> None:
    """The verifier memoises its pure value functions (``alu.scalar_alu``, ``refine``,
    ``branch_taken``) and shares scalar registers (``state.scalar_reg``), emptied per program;
    empty them per test too, so a test that monkeypatches one of the functions behind them
    leaves no results for the next."""
    from ubpf_py.verifier import alu, state

    alu.reset_memo()
    state.reset_memo()


@pytest.fixture
def pinned():
    """Run on one CPU, so that the CPU in-target C code reads (rdpid) is the one the tracer
    side is told; the affinity is put back afterwards."""
    old = os.sched_getaffinity(0)
    cpu = min(old)
    os.sched_setaffinity(0, {cpu})
    yield cpu
    os.sched_setaffinity(0, old)
