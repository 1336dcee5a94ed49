"""The overhead benchmark's machinery on a tiny N: the in-target and kernel engines must
count every call exactly, the in-target column must really be the in-target path (the
JSON "attached" events say so), the multi-thread run must count threads x N, and the
goal verdicts must follow the numbers.  The full benchmark is
``python -m benchmarks.uprobe_overhead``."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest
from paths import REPO

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.uprobe_overhead import goals, runs

N = 2000


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (kernel uprobes, ptrace of the benchmark target)"
    from ubpf_py.kernel.syscall import kernel_bpf_skip_reason

    return kernel_bpf_skip_reason()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    return runs.build(tmp_path_factory.mktemp("bench-build"))


def _cpu() -> int:
    return sorted(os.sched_getaffinity(0))[0]


def test_intarget_counts_every_call_on_the_in_target_path(built: tuple[Path, Path], tmp_path: Path) -> None:
    target, obj = built
    job = runs.Job(runs.Row("f_push", "count", "both"), N, _cpu(), _cpu())
    cell = runs.ubpf_run("intarget", obj, target, job, tmp_path)
    assert cell.ok, f"{cell.error} (command: {cell.command})"
    assert (cell.hits_entry, cell.hits_return) == (N, N)
    assert cell.paths == ["count_entry:in-target", "count_exit:in-target"]
    assert "--mode intarget" in (cell.command or "")
    assert cell.baseline_ns is not None and cell.probed_ns is not None
    assert cell.cpu_share is not None and 0 < cell.cpu_share <= 1.05  # the target reports its CPU time


def test_intarget_ring_pages_fault_in_at_attach_not_on_hits(built: tuple[Path, Path], tmp_path: Path) -> None:
    """20,000 ring records (40 bytes each) fill about 200 pages of the ring: the in-target runtime
    maps every page of the maps before the first hit (the kernel allocates its maps up front), so
    the probed loop takes no page fault per new page (a first touch costs microseconds in a VM,
    as much as a hundred records)."""
    target, obj = built
    n = 20_000
    job = runs.Job(runs.Row("f_push", "ring", "uprobe"), n, _cpu(), _cpu())
    cell = runs.ubpf_run("intarget", obj, target, job, tmp_path)
    assert cell.ok, f"{cell.error} (command: {cell.command})"
    assert cell.hits_entry == n and cell.ring_drops == 0
    assert cell.faults is not None and cell.faults < 50, cell.faults


def test_kernel_counts_every_call(built: tuple[Path, Path], tmp_path: Path) -> None:
    from ubpf_py.obj.elf import load_object

    target, obj = built
    job = runs.Job(runs.Row("f_push", "hash", "uprobe"), N, _cpu(), _cpu())
    cell = runs.kernel_run(load_object(obj), target, job, tmp_path)
    assert cell.ok, cell.error
    assert (cell.hits_entry, cell.hits_return) == (N, 0)


@pytest.mark.parametrize("program", ["count", "pcount"])
@pytest.mark.parametrize("engine", ["kernel", "intarget"])
def test_threads_count_threads_times_n(engine: str, program: str, built: tuple[Path, Path],
                                       tmp_path: Path) -> None:
    """Both multi-thread programs are checked: the shared counter and the per-CPU one, whose
    copies (one per CPU, summed) must add up to threads x N."""
    from ubpf_py.obj.elf import load_object

    target, obj = built
    job = runs.Job(runs.Row("f_push", program, "uprobe"), N, threads=3)
    if engine == "kernel":
        cell = runs.kernel_run(load_object(obj), target, job, tmp_path)
    else:
        cell = runs.ubpf_run(engine, obj, target, job, tmp_path)
    assert cell.ok, cell.error
    assert (cell.hits_entry, cell.hits_return) == (3 * N, 0)
    assert cell.threads == 3 and cell.calls_per_s and cell.calls_per_s > 0


def test_a_probe_on_another_path_fails_the_cell() -> None:
    row = runs.Row("f_push", "count", "both")
    events: list[Any] = [
        {"event": "attached", "program": "count_entry", "err": 0, "path": "in-target", "path_reason": ""},
        {"event": "attached", "program": "count_exit", "err": 0, "path": "ptrace",
         "path_reason": "function shorter than 5 bytes"},
    ]
    with pytest.raises(RuntimeError, match=r"count_exit took path 'ptrace' .*shorter.*expected 'in-target'"):
        runs.check_paths(events, "intarget", row)
    assert runs.check_paths(events[:1], "intarget", runs.Row("f_push", "count", "uprobe")) == \
        ["count_entry:in-target"]
    with pytest.raises(RuntimeError, match="no 'attached' event for count_exit"):
        runs.check_paths(events[:1], "intarget", row)


def _cell(engine: str, placement: str, ns: float | None, error: str | None = None, **kw: Any) -> dict[str, Any]:
    return {"engine": engine, "placement": placement, "overhead_ns": ns, "error": error, **kw}


def test_goal_verdicts_follow_the_numbers() -> None:
    doc = {
        "machine": {"cpus_usable": 2},
        "rows": [
            {"label": "f_push count uprobe", "cells": [_cell("intarget", "same", 40.0),
                                                       _cell("intarget", "diff", 44.0)]},
            {"label": "f_nop5 count uprobe", "cells": [_cell("intarget", "same", 52.0),
                                                       _cell("intarget", "diff", 50.0)]},
            {"label": "f_push hash uprobe", "cells": [_cell("intarget", "same", None, "RuntimeError: boom")]},
            {"label": "f_push ring uprobe", "cells": [_cell("intarget", "same", 100.0),
                                                      _cell("intarget", "diff", 300.0)]},
        ],
        "threads": {"cells": [_cell("intarget", "threads", 40.0, threads=1, calls_per_s=1e6),
                              _cell("intarget", "threads", 40.0, threads=2, calls_per_s=1.7e6),
                              _cell("intarget", "threads", 40.0, threads=4, calls_per_s=1.0e6)]},
    }
    by = {(v.goal.split(" <=")[0], v.where): v for v in goals.evaluate(doc)}
    first = "count, uprobe, push/nop5/endbr64/RIP-relative first instruction"
    assert by[(first, "f_push count uprobe")].verdict == "met"
    assert by[(first, "f_push count uprobe")].measured == "40 / 44"
    assert by[(first, "f_nop5 count uprobe")].verdict == "missed"
    assert by[(first, "f_endbr count uprobe")].verdict == "not measured"
    assert by[("hash", "f_push hash uprobe")].verdict == "missed (failed run)"
    assert by[("ring", "f_push ring uprobe")].verdict == "missed"
    rest = goals.evaluate(doc)[-2:]
    assert rest[0].verdict == "missed" and "2 of 3 rows" in rest[0].measured  # ring: 300 > 100 x 1.1 + 5
    assert rest[1].verdict == "missed" and "4: 1.00x" in rest[1].measured  # 4 threads fell back to 1x
    # the shared-counter series is shown, never judged: the per-CPU series alone decides
    doc["threads"]["cells"][2]["calls_per_s"] = 1.8e6
    doc["threads"]["cells"] += [_cell("intarget", "threads-shared", 40.0, threads=1, calls_per_s=1e6),
                                _cell("intarget", "threads-shared", 40.0, threads=2, calls_per_s=0.9e6)]
    scaling = goals.evaluate(doc)[-1]
    assert scaling.verdict == "met" and "not judged: 1: 1.00x, 2: 0.90x" in scaling.measured


def _pair(engine: str, base: float, probed: float, share: float | None = 1.0, error: str | None = None) -> runs.Cell:
    c = runs.Cell(engine, "", 10, baseline_ns=base, probed_ns=probed, error=error, cpu_share=share,
                  overhead_ns=None if error else probed - base, calls_per_s=1e9 / probed, load1=0.5,
                  baseline_cpu_ns=base, probed_cpu_ns=probed * (share or 1))
    return c


def test_repetitions_are_interleaved_and_combined_with_their_spread() -> None:
    """Rounds alternate the jobs (same, diff, same, diff, ...): a load change falls on both
    placements; a job stops at its first failure; a cell keeps the median and the spread."""
    from benchmarks.uprobe_overhead import run

    order: list[str] = []
    script = {"same": iter([(1, 21), (1, 31), (1, 26)]), "diff": iter([(1, 41), (1, 11), (1, 36)])}

    def one(engine: str, job: runs.Job) -> runs.Cell:
        key = "same" if job.tracer_cpu == 0 else "diff"
        order.append(f"{engine}:{key}")
        if engine == "jit":
            return _pair(engine, 1, 2, error="RuntimeError: boom")
        b, p = next(script[key])
        return _pair(engine, b, p, share=0.5 if p > 35 else 1.0)

    runner = object.__new__(run.Runner)
    runner.one = one  # type: ignore[method-assign]
    row = runs.Row("f_push", "count", "uprobe")
    jobs = {("intarget", "same"): runs.Job(row, 10, 0, 0), ("intarget", "diff"): runs.Job(row, 10, 0, 1),
            ("jit", "same"): runs.Job(row, 10, 0, 0)}
    cells = runner._interleaved(jobs, {"intarget": 3, "jit": 3})
    assert order == ["intarget:same", "intarget:diff", "jit:same"] + ["intarget:same", "intarget:diff"] * 2
    same, diff = cells[("intarget", "same")], cells[("intarget", "diff")]
    assert (same.overhead_ns, same.overhead_min, same.overhead_max) == (25, 20, 30)
    assert (diff.overhead_ns, diff.overhead_min, diff.overhead_max) == (35, 10, 40)
    assert diff.shares == [0.5, 1.0, 0.5] and diff.cpu_share == 0.5 and same.cpu_share == 1.0
    assert diff.cpu_overhead_ns == 17 and same.cpu_overhead_ns == 25   # CPU ns: 20.5-1, 11-1, 18-1
    assert len(same.samples) == 3 and len(same.tputs) == 3
    assert cells[("jit", "same")].error == "RuntimeError: boom"


def test_cpu_share_is_cpu_time_over_wall_time_per_usable_cpu() -> None:
    res = {"ns_total": 1000, "cpu_ns_total": 900, "threads": 1}
    assert runs.cpu_share(res) == 0.9
    res = {"ns_total": 1000, "cpu_ns_total": 1000 * min(4, runs.USABLE_CPUS), "threads": 4}
    assert runs.cpu_share(res) == 1.0
    assert runs.cpu_share({"ns_total": 1000}) is None


def test_same_vs_diff_names_the_worst_row_with_its_spread_and_judges_medians() -> None:
    doc = {"machine": {"cpus_usable": 2}, "rows": [
        {"label": "f_push read uprobe", "cells": [
            _cell("intarget", "same", 82.0, overhead_min=80.0, overhead_max=85.0),
            _cell("intarget", "diff", 96.0, overhead_min=81.0, overhead_max=130.0)]}]}
    v = goals.evaluate(doc)[-2]
    assert v.measured == "0 of 1 rows; largest diff - same: f_push read uprobe (82 [80-85] / 96 [81-130])"
    assert v.verdict == "missed"          # 96 > 82 x 1.1 + 5 = 95.2: the medians decide, not the spread
    doc["rows"][0]["cells"][1]["overhead_ns"] = 95.0
    assert goals.evaluate(doc)[-2].verdict == "met"


def test_scaling_is_the_median_of_per_round_ratios() -> None:
    """Round 2 ran under load (every thread count slow): paired per round, it cancels out; the
    ratio of the medians (1.5 / 1.0 here) would not."""
    one = {"calls_per_s": 1.0, "tputs": [1.0, 0.5, 1.0]}
    two = {"calls_per_s": 1.5, "tputs": [1.9, 0.95, 1.5]}
    assert goals.speedup(two, one) == 1.9
    assert goals.speedup({"calls_per_s": 1.5}, one) == 1.5      # no rounds kept: medians
