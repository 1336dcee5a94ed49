"""A longer fuzz campaign than the CI sample (tests/test_fuzz.py): N mutated corpus objects,
each through ``ubpf-run --check`` and (every K-th that still has a program) a short run
against the corpus ``hello`` target, all in this process.

    UBPF_CORPUS_BUILD=.corpus-build python3 benchmarks/fuzz_campaign.py --objects 3000 --seed 7

Prints objects tried, runs, tracebacks, internal errors, MemoryErrors, hangs (a case past
its time limit), other problems, exit-code counts per mutator, and the first problems
with the mutated object kept in --keep-dir to reproduce them.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fuzz_objects import corpus_objects, first_program, mutate, run_cli_inprocess, write_case


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--objects", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--run-every", type=int, default=5)
    ap.add_argument("--limit", type=float, default=30.0, help="seconds before a case counts as a hang")
    ap.add_argument("--keep-dir", default="fuzz-problems")
    a = ap.parse_args()
    build = Path(os.environ.get("UBPF_CORPUS_BUILD", ".corpus-build"))
    objs = corpus_objects(build)
    if not objs:
        print(f"no corpus objects in {build}", file=sys.stderr)
        return 2
    hello = build / "hello"
    rng = random.Random(a.seed)
    signal.signal(signal.SIGALRM, _alarm)
    counts: collections.Counter = collections.Counter()
    codes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    problems = []
    slowest = 0.0
    tmp = Path(tempfile.mkdtemp(prefix="fuzz-"))
    t_start = time.monotonic()
    # the hello target prints to fd 1: keep it out of the report
    report = os.fdopen(os.dup(1), "w")
    sys.__stdout__.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    try:
        for i in range(a.objects):
            src = rng.choice(objs)
            how, data = mutate(rng, src.read_bytes())
            path = write_case(tmp, i % 50, data)
            cases = [("check", ["--check", str(path)])]
            if i % a.run_every == 0:
                prog = first_program(path)
                if prog is not None:
                    cases.append(("run", [str(path), "--no-auto", "-a", f"{prog}={hello}:add", "-d", "5",
                                          "--verifier", rng.choice(["strict", "warn", "off"]),
                                          "--engine", rng.choice(["jit", "interp"]), "--", str(hello)]))
            for kind, argv in cases:
                counts[kind] += 1
                signal.setitimer(signal.ITIMER_REAL, a.limit)
                try:
                    o = run_cli_inprocess(argv)
                    problem = o.problem
                    slowest = max(slowest, o.seconds)
                    if not problem and o.seconds > a.limit:
                        # a run's own --duration timer replaces our SIGALRM: time it as well
                        problem = f"hang: took {o.seconds:.0f} s"
                    if o.seconds > 10:
                        print(f"slow case {i} {how} {kind} {o.seconds:.1f} s", file=report, flush=True)
                    codes[how][o.code] += 1
                except Hang:
                    problem, o = "hang", None
                    print(f"hang {i} {how} {kind}", file=report, flush=True)
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                if problem:
                    key = problem.split(":")[0]
                    counts[key] += 1
                    keep = Path(a.keep_dir)
                    keep.mkdir(exist_ok=True)
                    saved = keep / f"{i}-{how}-{kind}.bpf.o"
                    shutil.copy(path, saved)
                    problems.append((i, src.name, how, kind, problem, saved, (o.stderr[-200:] if o else "")))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    took = time.monotonic() - t_start
    print(f"objects tried: {a.objects} (seed {a.seed}), --check runs: {counts['check']}, short runs: "
          f"{counts['run']}, {took:.0f} s, slowest case {slowest:.1f} s", file=report)
    print(f"tracebacks: {counts['traceback']}, internal errors: {counts['internal error']}, "
          f"MemoryError: {counts['MemoryError']}, hangs: {counts['hang']}, other problems: "
          f"{len(problems) - counts['traceback'] - counts['internal error'] - counts['MemoryError'] - counts['hang']}",
          file=report)
    for how, c in sorted(codes.items()):
        print(f"  {how:24s} exit codes {dict(sorted(c.items()))}", file=report)
    for p in problems[:20]:
        print("PROBLEM", *p, file=report)
    report.flush()
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
