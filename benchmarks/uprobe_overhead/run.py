"""Uprobe overhead: kernel uprobes vs ubpf-py (JIT, interpreter), same object, same target.

    python -m benchmarks.uprobe_overhead [--quick] [--out DIR]
    python benchmarks/uprobe_overhead/run.py [--quick]

Every probed run is paired with an unprobed baseline run of the same target, on the
same CPUs, just before it; the reported overhead is probed minus baseline, in ns per
call of the probed function.  Hit counts are read back from the object's ``hits``
map and must equal N in every run (a run whose count differs is reported as failed,
never averaged in).  The ubpf-py columns call ``ubpf-run``; when it is missing or
fails, the cells say "not available: <reason>".  Nothing is estimated or filled in.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

try:
    from . import report  # python -m benchmarks.uprobe_overhead
except ImportError:  # python benchmarks/uprobe_overhead/run.py
    import report  # type: ignore[no-redef]

FUNCS = ["f_push", "f_endbr", "f_nop5", "f_riprel"]
PROGRAMS = ["count", "hash", "read", "ring"]
MODES = ["uprobe", "uretprobe", "both"]
ENGINES = ["kernel", "jit", "interp"]
SKIPPED_QUICK = "skipped: --quick runs the different-CPU placement for the first row only"
#: cell errors that are not failures
NOT_RUN = ("not available", "skipped")


@dataclass(frozen=True)
class Row:
    func: str
    program: str
    mode: str

    @property
    def label(self) -> str:
        return f"{self.func} {self.program} {self.mode}"


@dataclass
class Cell:
    """One probed run and its paired baseline."""

    engine: str
    placement: str
    n: int
    baseline_ns: float | None = None
    probed_ns: float | None = None
    overhead_ns: float | None = None
    hits_entry: int | None = None
    hits_return: int | None = None
    ring_drops: int = 0
    records: int = 0
    wall_s: float = 0.0
    error: str | None = None
    #: (baseline, probed) ns per call of every repetition; the cell reports medians
    samples: list[tuple[float, float]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None and self.overhead_ns is not None


@dataclass
class Plan:
    rows: list[Row]
    placements: list[str]
    n_kernel: int
    n_ubpf: int
    engines: list[str]
    cells: dict[str, list[Cell]] = field(default_factory=dict)


def plan_rows(quick: bool) -> list[Row]:
    if quick:
        return [Row("f_push", "count", "uprobe"), Row("f_push", "hash", "uprobe"),
                Row("f_push", "ring", "uprobe"), Row("f_push", "count", "uretprobe"),
                Row("f_riprel", "count", "both")]
    rows = [Row("f_push", p, m) for p in PROGRAMS for m in MODES]
    rows += [Row(f, "count", m) for f in FUNCS[1:] for m in MODES]
    return rows


# ---------------------------------------------------------------------------------------
# build
# ---------------------------------------------------------------------------------------
def build(build_dir: Path) -> tuple[Path, Path]:
    build_dir.mkdir(parents=True, exist_ok=True)
    target, obj = build_dir / "target", build_dir / "bench.bpf.o"
    subprocess.run(["gcc", "-O2", "-g", "-Wall", "-o", str(target), str(HERE / "target.c")], check=True)
    clang = shutil.which("clang") or shutil.which("clang-14") or "clang"
    subprocess.run([clang, "-O2", "-g", "-target", "bpf", "-D__TARGET_ARCH_x86",
                    "-I/usr/include/x86_64-linux-gnu", "-c", str(HERE / "bench.bpf.c"), "-o", str(obj)],
                   check=True)
    return target, obj


def attach_list(row: Row) -> list[tuple[str, bool]]:
    """(program, is_return) pairs for a row."""
    out = []
    if row.mode in ("uprobe", "both"):
        out.append((f"{row.program}_entry", False))
    if row.mode in ("uretprobe", "both"):
        out.append((f"{row.program}_exit", True))
    return out


def expected_hits(row: Row, n: int) -> tuple[int, int]:
    return (n if row.mode in ("uprobe", "both") else 0, n if row.mode in ("uretprobe", "both") else 0)


def cpus_for(placement: str) -> tuple[int, int] | None:
    """(target cpu, tracer cpu) or None when the machine cannot do the placement."""
    cpus = sorted(os.sched_getaffinity(0))
    if placement == "same":
        return cpus[0], cpus[0]
    if len(cpus) < 2:
        return None
    return cpus[0], cpus[1]


# ---------------------------------------------------------------------------------------
# runs
# ---------------------------------------------------------------------------------------
def _read_result(path: Path) -> dict[str, Any]:
    text = path.read_text().strip()
    if not text:
        raise RuntimeError("the target wrote no result (did it run to the end?)")
    return json.loads(text.splitlines()[-1])


def baseline_run(target: Path, row: Row, n: int, target_cpu: int, tmp: Path) -> float:
    out = tmp / "baseline.json"
    subprocess.run([str(target), row.func, str(n), "--cpu", str(target_cpu), "--result", str(out)],
                   check=True, stdout=subprocess.DEVNULL, timeout=120)
    return float(_read_result(out)["ns_per_call"])


def _hits_from_entries(entries: list[tuple[bytes, bytes]]) -> dict[int, int]:
    return {struct.unpack("<I", k)[0]: struct.unpack("<Q", v[:8])[0] for k, v in entries}


def kernel_run(spec: Any, target: Path, row: Row, n: int, cpus: tuple[int, int], tmp: Path) -> Cell:
    from ubpf_py.kernel.backend import run_command
    from ubpf_py.live.attach import AttachRequest

    target_cpu, tracer_cpu = cpus
    cell = Cell("kernel", "", n)
    old_aff = os.sched_getaffinity(0)
    out = tmp / "kernel.json"
    try:
        cell.baseline_ns = baseline_run(target, row, n, target_cpu, tmp)
        os.sched_setaffinity(0, {tracer_cpu})
        reqs = [AttachRequest(p, str(target), row.func, retprobe=r) for p, r in attach_list(row)]
        t0 = time.monotonic()
        res = run_command(spec, reqs, [str(target), row.func, str(n), "--cpu", str(target_cpu),
                                       "--result", str(out)], cpu=target_cpu, timeout=600)
        cell.wall_s = time.monotonic() - t0
        if res.exit_code != 0:
            raise RuntimeError(f"target exited with {res.exit_code} (signal {res.signal})")
        cell.probed_ns = float(_read_result(out)["ns_per_call"])
        hits = _hits_from_entries(res.maps["hits"]["entries"] or [])
        cell.hits_entry, cell.hits_return = hits.get(0, 0), hits.get(1, 0)
        cell.ring_drops = hits.get(2, 0)
        cell.records = len(res.records)
        _check_hits(cell, row, n)
        cell.overhead_ns = cell.probed_ns - cell.baseline_ns
    except Exception as exc:  # a failed cell is reported, the benchmark goes on
        cell.error = f"{type(exc).__name__}: {exc}".splitlines()[0]
    finally:
        os.sched_setaffinity(0, old_aff)
    return cell


def _check_hits(cell: Cell, row: Row, n: int) -> None:
    want = expected_hits(row, n)
    got = (cell.hits_entry, cell.hits_return)
    if got != want:
        raise RuntimeError(f"hit count (entry, return) = {got}, expected {want}")


def ubpf_available() -> str | None:
    """None when ``ubpf-run`` can be used; else why not."""
    exe = shutil.which("ubpf-run")
    if exe is None:
        return "ubpf-run is not installed (pip install -e .)"
    try:
        proc = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"ubpf-run --help failed: {exc}"
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        return f"ubpf-run --help failed: {last[:160]}"
    if "--engine" not in proc.stdout:
        return "ubpf-run has no --engine option yet"
    return None


def _find_hits(doc: Any) -> dict[int, int] | None:
    """The ``hits`` map from ubpf-run's JSON output (maps at exit).  Understands a map
    event (``{"event": "map", "name": "hits", "decoded" | "entries": ...}``) and a
    ``{"maps": {"hits": {...}}}`` document; entries are [key, value] pairs of ints or
    of hex byte strings (the kernel oracle's format).  None when there is no such map."""
    if isinstance(doc, list):
        for item in doc:
            found = _find_hits(item)
            if found is not None:
                return found
        return None
    if not isinstance(doc, dict):
        return None
    if doc.get("name") == "hits" and ("decoded" in doc or "entries" in doc):
        return _hits_from_json(doc)
    maps = doc.get("maps")
    if isinstance(maps, dict) and isinstance(maps.get("hits"), dict):
        return _hits_from_json(maps["hits"])
    for v in doc.values():
        if isinstance(v, (dict, list)):
            found = _find_hits(v)
            if found is not None:
                return found
    return None


def _hits_from_json(m: dict[str, Any]) -> dict[int, int]:
    pairs = m.get("decoded") if m.get("decoded") is not None else m.get("entries")
    out: dict[int, int] = {}
    for e in pairs or []:
        k, v = (e.get("key"), e.get("value")) if isinstance(e, dict) else (e[0], e[1])
        out[_as_int(k)] = _as_int(v)
    return out


def _as_int(x: Any) -> int:
    if isinstance(x, int):
        return x
    if isinstance(x, list):
        return sum(_as_int(i) for i in x)  # per-CPU values
    if isinstance(x, str):
        s = x.strip()
        if s.startswith(("0x", "-")) or not s:
            return int(s, 0)
        return int.from_bytes(bytes.fromhex(s.replace(" ", "")), "little")  # hex bytes, as dumped
    raise ValueError(f"cannot read {x!r} as a number")


def ubpf_run(engine: str, obj: Path, target: Path, row: Row, n: int, cpus: tuple[int, int], tmp: Path) -> Cell:
    target_cpu, tracer_cpu = cpus
    cell = Cell(engine, "", n)
    out = tmp / f"{engine}.json"
    try:
        cell.baseline_ns = baseline_run(target, row, n, target_cpu, tmp)
        # options first: everything after the object may be taken as the command
        cmd = ["ubpf-run", "--engine", engine, "--format", "json"]
        for prog, _ret in attach_list(row):
            cmd += ["--attach", f"{prog}={target}:{row.func}"]
        cmd += [str(obj), "--", str(target), row.func, str(n), "--cpu", str(target_cpu), "--result", str(out)]
        t0 = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                              preexec_fn=lambda: os.sched_setaffinity(0, {tracer_cpu}))
        cell.wall_s = time.monotonic() - t0
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
            raise RuntimeError(f"ubpf-run failed: {last[:200]}")
        cell.probed_ns = float(_read_result(out)["ns_per_call"])
        hits = _parse_ubpf_hits(proc.stdout)
        if hits is None:
            raise RuntimeError("ubpf-run's JSON output has no 'hits' map, so hit counts cannot be checked")
        cell.hits_entry, cell.hits_return = hits.get(0, 0), hits.get(1, 0)
        cell.ring_drops = hits.get(2, 0)
        _check_hits(cell, row, n)
        cell.overhead_ns = cell.probed_ns - cell.baseline_ns
    except Exception as exc:
        cell.error = f"{type(exc).__name__}: {exc}".splitlines()[0]
    return cell


def _parse_ubpf_hits(stdout: str) -> dict[int, int] | None:
    try:
        return _find_hits(json.loads(stdout))
    except json.JSONDecodeError:
        pass
    found = None
    for line in stdout.splitlines():
        line = line.strip()
        if line.startswith(("{", "[")):
            try:
                hits = _find_hits(json.loads(line))
            except json.JSONDecodeError:
                continue
            if hits is not None:
                found = hits
    return found


# ---------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------
def repeated(fn: Any, repeat: int) -> Cell:
    """Run ``fn() -> Cell`` ``repeat`` times (each a baseline + probed pair) and keep the
    medians; the first failing repetition makes the cell fail."""
    cells = []
    for _ in range(repeat):
        c = fn()
        if not c.ok:
            return c
        cells.append(c)
    out = cells[0]
    out.samples = [(c.baseline_ns, c.probed_ns) for c in cells]
    out.baseline_ns = statistics.median(b for b, _ in out.samples)
    out.probed_ns = statistics.median(p for _, p in out.samples)
    out.overhead_ns = statistics.median(p - b for b, p in out.samples)
    out.ring_drops = max(c.ring_drops for c in cells)
    out.wall_s = sum(c.wall_s for c in cells)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small N and fewer rows (< 1 minute)")
    ap.add_argument("--out", default=str(HERE / "results"), help="directory for results.{md,json,png}")
    ap.add_argument("--build-dir", default=os.path.join(tempfile.gettempdir(), "ubpf-py-bench"))
    ap.add_argument("--n", type=int, help="calls per kernel run (default 50000, quick 20000)")
    ap.add_argument("--n-ubpf", type=int, help="calls per ubpf-py run (default 3000, quick 2000)")
    ap.add_argument("--engines", default=",".join(ENGINES), help="subset of kernel,jit,interp")
    ap.add_argument("--repeat", type=int,
                    help="baseline+probed pairs per kernel cell, median kept (default 3, quick 1)")
    ap.add_argument("--repeat-ubpf", type=int, default=1,
                    help="pairs per ubpf-py cell (default 1: each run pays the tool's start-up)")
    args = ap.parse_args(argv)

    engines = [e for e in args.engines.split(",") if e]
    plan = Plan(plan_rows(args.quick), ["same", "diff"],
                args.n or (20_000 if args.quick else 50_000),
                args.n_ubpf or (2_000 if args.quick else 3_000), engines)
    repeat = args.repeat or (1 if args.quick else 3)
    target, obj = build(Path(args.build_dir))
    t_start = time.monotonic()
    load_start = os.getloadavg()

    kernel_reason: str | None = None
    spec = None
    if "kernel" in engines:
        from ubpf_py.kernel.syscall import kernel_bpf_skip_reason

        kernel_reason = kernel_bpf_skip_reason()
        if kernel_reason is None:
            try:
                from ubpf_py.obj.elf import load_object

                spec = load_object(obj)
            except Exception as exc:
                kernel_reason = f"cannot load {obj.name}: {exc}"
    ubpf_reason = ubpf_available() if {"jit", "interp"} & set(engines) else None
    unavailable = {"kernel": kernel_reason, "jit": ubpf_reason, "interp": ubpf_reason}

    with tempfile.TemporaryDirectory(prefix="ubpf-bench-") as tmpd:
        tmp = Path(tmpd)
        for r_i, row in enumerate(plan.rows):
            cells: list[Cell] = []
            for placement in plan.placements:
                cpus = cpus_for(placement)
                for engine in engines:
                    n = plan.n_kernel if engine == "kernel" else plan.n_ubpf
                    if args.quick and placement == "diff" and r_i > 0:
                        cell = Cell(engine, placement, n, error=SKIPPED_QUICK)
                    elif cpus is None:
                        cell = Cell(engine, placement, n, error="not available: needs 2 CPUs")
                    elif unavailable.get(engine):
                        cell = Cell(engine, placement, n, error=f"not available: {unavailable[engine]}")
                    elif engine == "kernel":
                        cell = repeated(partial(kernel_run, spec, target, row, n, cpus, tmp), repeat)
                    else:
                        cell = repeated(partial(ubpf_run, engine, obj, target, row, n, cpus, tmp),
                                        args.repeat_ubpf)
                    cell.placement = placement
                    cells.append(cell)
                    _progress(row, cell)
            plan.cells[row.label] = cells

    elapsed = time.monotonic() - t_start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": "uprobe_overhead", "quick": args.quick, "elapsed_s": round(elapsed, 1),
        "machine": {**report.machine_info(), "load_avg_start": load_start}, "repeat": repeat,
        "repeat_ubpf": args.repeat_ubpf,
        "n_kernel": plan.n_kernel, "n_ubpf": plan.n_ubpf,
        "unavailable": {k: v for k, v in unavailable.items() if v},
        "rows": [{**asdict(r), "label": r.label, "cells": [asdict(c) for c in plan.cells[r.label]]}
                 for r in plan.rows],
    }
    (out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    md = report.markdown(doc)
    (out / "results.md").write_text(md)
    png = report.chart(doc, out / "overhead.png")
    print(md)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}" + (f", {png}" if png else ""))
    failed = [c for r in doc["rows"] for c in r["cells"] if c["error"] and not c["error"].startswith(NOT_RUN)]
    return 1 if failed else 0


def _progress(row: Row, cell: Cell) -> None:
    if cell.ok:
        msg = f"{cell.overhead_ns:9.1f} ns/call added (baseline {cell.baseline_ns:.1f})"
    else:
        msg = cell.error or "?"
    print(f"  {row.label:<28} {cell.engine:<6} {cell.placement:<4} {msg}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
