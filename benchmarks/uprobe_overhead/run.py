"""Uprobe overhead: kernel uprobes vs ubpf-py (in-target, ptrace JIT, interpreter), same object, same target.

    python -m benchmarks.uprobe_overhead [--quick] [--out DIR]
    python benchmarks/uprobe_overhead/run.py [--quick]

Every probed run is paired with an unprobed baseline run of the same target, on the
same CPUs, just before it; the reported overhead is probed minus baseline, in ns per
call of the probed function.  Hit counts are read back from the object's ``hits``
map and must equal the number of calls in every run (a run whose count differs is
reported as failed, never averaged in); ubpf-py runs must also report, per probe, the
path their engine stands for (in-target or ptrace).  A second section runs 1, 2, 4, 8
threads calling the probed function together (total probed calls per second).
Nothing is estimated or filled in: a cell that could not run says why.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

try:  # python -m benchmarks.uprobe_overhead
    from . import report, runs
except ImportError:  # python benchmarks/uprobe_overhead/run.py
    import report  # type: ignore[no-redef]
    import runs  # type: ignore[no-redef]

Cell, Job, Row = runs.Cell, runs.Job, runs.Row

FUNCS = ["f_push", "f_endbr", "f_nop5", "f_riprel"]
PROGRAMS = ["count", "hash", "read", "ring"]
MODES = ["uprobe", "uretprobe", "both"]
#: the multi-thread section: kernel vs in-target, entry probe on f_push; the per-CPU counter
#: program measures the probe (threads share no written line), the shared counter program what a
#: contended atomic in the program itself costs (the same in the kernel)
THREAD_ENGINES = ["kernel", "intarget"]
THREAD_ROW = Row("f_push", "pcount", "uprobe")
SHARED_THREAD_ROW = Row("f_push", "count", "uprobe")
#: Cell.placement of the two multi-thread series
THREAD_PLACEMENTS = {"threads": THREAD_ROW, "threads-shared": SHARED_THREAD_ROW}
SKIPPED_QUICK = "skipped: --quick runs the different-CPU placement for the first row only"
#: cell errors that are not failures
NOT_RUN = ("not available", "skipped")


@dataclass
class Plan:
    """What to run.  Calls per run differ by engine so that every timed loop lasts long enough
    (tens of ms or more) for a timer tick, a page fault or one preemption not to decide it: a
    kernel uprobe costs about 1 us per call, an in-target probe tens of ns."""

    rows: list[Row]
    placements: list[str]
    n_kernel: int
    n_intarget: int
    n_ubpf: int
    engines: list[str]
    threads: list[int]
    n_threads_kernel: int
    n_threads_intarget: int
    cells: dict[str, list[Cell]] = field(default_factory=dict)
    thread_cells: list[Cell] = field(default_factory=list)

    def n_for(self, engine: str) -> int:
        return {"kernel": self.n_kernel, "intarget": self.n_intarget}.get(engine, self.n_ubpf)

    def n_threads_for(self, engine: str) -> int:
        return self.n_threads_kernel if engine == "kernel" else self.n_threads_intarget


def plan_rows(quick: bool) -> list[Row]:
    if quick:
        return [Row("f_push", "count", "uprobe"), Row("f_push", "hash", "uprobe"),
                Row("f_push", "ring", "uprobe"), Row("f_push", "count", "uretprobe"),
                Row("f_riprel", "count", "both")]
    rows = [Row("f_push", p, m) for p in PROGRAMS for m in MODES]
    rows += [Row(f, "count", m) for f in FUNCS[1:] for m in MODES]
    return rows


def cpus_for(placement: str) -> tuple[int, int] | None:
    """(target cpu, tracer cpu) or None when the machine cannot do the placement."""
    cpus = sorted(os.sched_getaffinity(0))
    if placement == "same":
        return cpus[0], cpus[0]
    if len(cpus) < 2:
        return None
    return cpus[0], cpus[1]


def wait_for_quiet(max_load: float, max_wait_s: float) -> dict[str, Any]:
    """Wait (up to ``max_wait_s``) until the 1-minute load average is at most ``max_load``:
    the machine is shared and the numbers are only as good as its quiet."""
    t0, first = time.monotonic(), os.getloadavg()[0]
    while os.getloadavg()[0] > max_load and time.monotonic() - t0 < max_wait_s:
        time.sleep(10)
    return {"max_load": max_load, "load_before": round(first, 2), "load_after": round(os.getloadavg()[0], 2),
            "waited_s": round(time.monotonic() - t0, 1)}


class Runner:
    """Runs the cells of a plan; knows which engines are available and why not.

    Repetitions are interleaved: each round runs every placement (rows) or thread count
    (multi-thread section) once, so a change in the machine's load during the run falls on
    every column alike instead of on whichever ran last; a cell then combines its rounds
    (medians, with the spread kept)."""

    def __init__(self, plan: Plan, target: Path, obj: Path, tmp: Path, repeats: dict[str, int],
                 repeat_threads: int) -> None:
        self.plan, self.target, self.obj, self.tmp = plan, target, obj, tmp
        #: pairs per cell by engine
        self.repeats, self.repeat_threads = repeats, repeat_threads
        self.spec: Any = None
        self.unavailable: dict[str, str | None] = {}
        if "kernel" in plan.engines:
            self.unavailable["kernel"] = self._load_kernel()
        ubpf_reason = runs.ubpf_available() if set(plan.engines) - {"kernel"} else None
        for e in plan.engines:
            if e != "kernel":
                self.unavailable[e] = ubpf_reason

    def _load_kernel(self) -> str | None:
        from ubpf_py.kernel.syscall import kernel_bpf_skip_reason

        reason = kernel_bpf_skip_reason()
        if reason is None:
            try:
                from ubpf_py.obj.elf import load_object

                self.spec = load_object(self.obj)
            except Exception as exc:
                reason = f"cannot load {self.obj.name}: {exc}"
        return reason

    def reps_for(self, engine: str) -> int:
        return self.repeats.get(engine, 1)

    def one(self, engine: str, job: Job) -> Cell:
        """One baseline + probed pair."""
        if engine == "kernel":
            return runs.kernel_run(self.spec, self.target, job, self.tmp)
        return runs.ubpf_run(engine, self.obj, self.target, job, self.tmp)

    def _interleaved(self, jobs: dict[tuple[str, Any], Job], reps: dict[str, int]) -> dict[tuple[str, Any], Cell]:
        """Run every (engine, key) job ``reps[engine]`` times, one round of all jobs after
        another; a job stops repeating at its first failure.  -> combined cells."""
        done: dict[tuple[str, Any], list[Cell]] = {k: [] for k in jobs}
        for rnd in range(max(reps.values(), default=0)):
            for (engine, key), job in jobs.items():
                got = done[(engine, key)]
                if rnd < reps[engine] and (not got or got[-1].ok):
                    got.append(self.one(engine, job))
        return {k: runs.combine(v) for k, v in done.items() if v}

    def run_rows(self, quick: bool) -> None:
        plan = self.plan
        for r_i, row in enumerate(plan.rows):
            fixed: dict[tuple[str, str], Cell] = {}
            jobs: dict[tuple[str, Any], Job] = {}
            for placement in plan.placements:
                cpus = cpus_for(placement)
                for engine in plan.engines:
                    n = plan.n_for(engine)
                    why = self.unavailable.get(engine)
                    if why:
                        fixed[(engine, placement)] = Cell(engine, placement, n, error=f"not available: {why}")
                    elif quick and placement == "diff" and r_i > 0:
                        fixed[(engine, placement)] = Cell(engine, placement, n, error=SKIPPED_QUICK)
                    elif cpus is None:
                        fixed[(engine, placement)] = Cell(engine, placement, n, error="not available: needs 2 CPUs")
                    else:
                        jobs[(engine, placement)] = Job(row, n, cpus[0], cpus[1])
            ran = self._interleaved(jobs, {e: self.reps_for(e) for e in plan.engines})
            cells: list[Cell] = []
            for placement in plan.placements:
                for engine in plan.engines:
                    cell = fixed.get((engine, placement)) or ran[(engine, placement)]
                    cell.placement = placement
                    cells.append(cell)
                    _progress(row.label, cell)
            plan.cells[row.label] = cells

    def run_threads(self) -> None:
        plan = self.plan
        engines = [e for e in THREAD_ENGINES if e in plan.engines]
        for placement, row in THREAD_PLACEMENTS.items():
            jobs: dict[tuple[str, Any], Job] = {}
            fixed: dict[tuple[str, Any], Cell] = {}
            for t in plan.threads:
                for engine in engines:
                    n = plan.n_threads_for(engine)
                    why = self.unavailable.get(engine)
                    if why:
                        fixed[(engine, t)] = Cell(engine, placement, n, threads=t, error=f"not available: {why}")
                    else:
                        jobs[(engine, t)] = Job(row, n, threads=t)
            ran = self._interleaved(jobs, {e: self.repeat_threads for e in engines})
            for t in plan.threads:
                for engine in engines:
                    cell = fixed.get((engine, t)) or ran[(engine, t)]
                    cell.placement = placement
                    plan.thread_cells.append(cell)
                    _progress(f"{row.label} x{t} threads", cell)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small N and fewer rows (about a minute)")
    ap.add_argument("--out", help="directory for results.{md,json} and the charts (default results/, "
                                  "--quick: results-quick/, so a quick run never overwrites the full one)")
    ap.add_argument("--build-dir", default=os.path.join(tempfile.gettempdir(), "ubpf-py-bench"))
    ap.add_argument("--n", type=int, help="calls per kernel run (default 50000, quick 20000)")
    ap.add_argument("--n-intarget", type=int,
                    help="calls per in-target run (default 200000, quick 50000): an in-target call "
                         "takes tens of ns, so a run needs this many to last several ms")
    ap.add_argument("--n-threads", type=int,
                    help="calls per thread in the kernel's multi-thread runs (default 500000, quick 100000)")
    ap.add_argument("--n-threads-intarget", type=int,
                    help="calls per thread in the in-target multi-thread runs (default 6000000, quick "
                         "200000): each run must last long enough (250 ms or more at 2 threads) for a thread's start "
                         "or one preemption not to decide its calls/s")
    ap.add_argument("--n-ubpf", type=int, help="calls per ptrace JIT/interp run (default 3000, quick 2000)")
    ap.add_argument("--engines", default=",".join(runs.ENGINES), help="subset of " + ",".join(runs.ENGINES))
    ap.add_argument("--threads", default="1,2,4,8",
                    help="thread counts of the multi-thread section ('' to skip it)")
    ap.add_argument("--repeat", type=int,
                    help="baseline+probed pairs per in-target cell, median kept, rounds interleaved "
                         "over the two CPU placements (default 5, quick 1)")
    ap.add_argument("--repeat-kernel", type=int,
                    help="baseline+probed pairs per kernel cell (default 3, quick 1)")
    ap.add_argument("--repeat-threads", type=int,
                    help="rounds of the multi-thread section, each running every thread count once "
                         "(default 5, quick 1)")
    ap.add_argument("--repeat-ubpf", type=int, default=1,
                    help="pairs per ptrace JIT/interp cell (default 1: each run costs seconds)")
    ap.add_argument("--threads-only", action="store_true",
                    help="run only the multi-thread section (e.g. to study scaling); write it with --out "
                         "somewhere else than the committed full run")
    ap.add_argument("--wait-load", type=float, metavar="LOAD",
                    help="first wait until the 1-minute load average is at most LOAD")
    ap.add_argument("--wait-max", type=float, default=600, metavar="S",
                    help="give up waiting for --wait-load after S seconds (default 600) and run anyway")
    args = ap.parse_args(argv)

    engines = [e for e in args.engines.split(",") if e]
    bad = [e for e in engines if e not in runs.ENGINES]
    if bad:
        ap.error(f"unknown engine(s) {','.join(bad)}: choose from {','.join(runs.ENGINES)}")
    try:
        threads = [int(t) for t in args.threads.split(",") if t.strip()]
    except ValueError:
        ap.error(f"--threads takes comma-separated counts such as 1,2,4,8, not {args.threads!r}")
    plan = Plan(plan_rows(args.quick), ["same", "diff"],
                args.n or (20_000 if args.quick else 50_000),
                args.n_intarget or (50_000 if args.quick else 200_000),
                args.n_ubpf or (2_000 if args.quick else 3_000), engines, threads,
                args.n_threads or (100_000 if args.quick else 500_000),
                args.n_threads_intarget or (200_000 if args.quick else 6_000_000))
    repeat = args.repeat or (1 if args.quick else 5)
    repeat_kernel = args.repeat_kernel or (1 if args.quick else 3)
    repeats = {"kernel": repeat_kernel, "intarget": repeat, "jit": args.repeat_ubpf, "interp": args.repeat_ubpf}
    repeat_threads = args.repeat_threads or (1 if args.quick else 5)
    out = Path(args.out or HERE / ("results-quick" if args.quick else "results"))
    target, obj = runs.build(Path(args.build_dir))
    quiet = wait_for_quiet(args.wait_load, args.wait_max) if args.wait_load is not None else None
    t_start = time.monotonic()
    load_start = os.getloadavg()

    with tempfile.TemporaryDirectory(prefix="ubpf-bench-") as tmpd:
        runner = Runner(plan, target, obj, Path(tmpd), repeats, repeat_threads)
        if not args.threads_only:
            runner.run_rows(args.quick)
        runner.run_threads()

    elapsed = time.monotonic() - t_start
    out.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": "uprobe_overhead", "quick": args.quick, "elapsed_s": round(elapsed, 1),
        "machine": {**report.machine_info(), "load_avg_start": load_start}, "quiet_wait": quiet,
        "repeat": repeat, "repeat_kernel": repeat_kernel, "repeat_ubpf": args.repeat_ubpf,
        "repeat_threads": repeat_threads,
        "n_kernel": plan.n_kernel, "n_intarget": plan.n_intarget, "n_ubpf": plan.n_ubpf,
        "n_threads": plan.n_threads_kernel, "n_threads_intarget": plan.n_threads_intarget, "engines": engines,
        "unavailable": {k: v for k, v in runner.unavailable.items() if v},
        "rows": [{**asdict(r), "label": r.label, "cells": [asdict(c) for c in plan.cells.get(r.label, [])]}
                 for r in plan.rows],
        "threads": {"row": {**asdict(THREAD_ROW), "label": THREAD_ROW.label},
                    "rows": {pl: {**asdict(r), "label": r.label} for pl, r in THREAD_PLACEMENTS.items()},
                    "counts": threads, "cells": [asdict(c) for c in plan.thread_cells]},
    }
    (out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    md = report.markdown(doc)
    (out / "results.md").write_text(md)
    pngs = [p for p in (report.chart(doc, out / "overhead.png"), report.threads_chart(doc, out / "threads.png"))
            if p]
    print(md)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}" + "".join(f", {p}" for p in pngs))
    cells = [c for r in doc["rows"] for c in r["cells"]] + doc["threads"]["cells"]
    failed = [c for c in cells if c["error"] and not c["error"].startswith(NOT_RUN)]
    return 1 if failed else 0


def _progress(label: str, cell: Cell) -> None:
    if cell.ok:
        msg = f"{cell.overhead_ns:9.1f} ns/call added (baseline {cell.baseline_ns:.1f})"
        if cell.threads:
            msg += f", {cell.calls_per_s or 0:,.0f} calls/s"
    else:
        msg = cell.error or "?"
    print(f"  {label:<30} {cell.engine:<8} {cell.placement:<7} {msg}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
