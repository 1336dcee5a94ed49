"""Fuzzed objects (issue 12 item 6): a fixed-seed sample of mutated corpus objects, each
checked with ``ubpf-run --check`` and, when it still loads, a short run against the corpus
``hello`` target -- in this process (one import, no subprocess per object).  Every outcome
must be a documented exit code with at most one error line: no traceback, no MemoryError,
no internal error, no hang (``no_hang`` ends the worker with stacks; each case is timed).

``benchmarks/fuzz_campaign.py`` runs the same with more objects and other seeds."""

from __future__ import annotations

import random

import pytest
from fuzz_objects import corpus_objects, first_program, mutate, run_cli_inprocess, write_case
from tests_edge_util import no_hang

pytestmark = pytest.mark.ptrace

SEED = 12
CHECKS = 300
RUN_EVERY = 6          # a short run for every 6th object that still has a program


def test_fuzzed_objects(corpus_build, tmp_path, capfd):
    objs = corpus_objects(corpus_build)
    if not objs:
        pytest.skip("no corpus objects")
    rng = random.Random(SEED)
    hello = corpus_build / "hello"
    problems = []
    runs = 0
    with no_hang(240):
        for i in range(CHECKS):
            src = rng.choice(objs)
            how, data = mutate(rng, src.read_bytes())
            path = write_case(tmp_path, i, data)
            o = run_cli_inprocess(["--check", str(path)])
            if o.problem or o.seconds > 10:
                problems.append((i, src.name, how, "check", o.problem or f"took {o.seconds:.1f}s", o.stderr[-300:]))
            prog = first_program(path) if i % RUN_EVERY == 0 else None
            if prog is not None:
                runs += 1
                o = run_cli_inprocess([str(path), "--no-auto", "-a", f"{prog}={hello}:add", "-d", "5",
                                       "--verifier", "off" if i % 12 == 0 else "strict",
                                       "--engine", "interp" if i % 2 else "jit", "--", str(hello)])
                if o.problem or o.seconds > 15:
                    problems.append((i, src.name, how, "run", o.problem or f"took {o.seconds:.1f}s",
                                     o.stderr[-300:]))
    capfd.readouterr()      # the hello target's own output went to the captured fds
    assert not problems, problems[:5]
    assert runs >= 10
