"""One measured cell of the overhead benchmark: an unprobed baseline run of the target
and a probed run right after it, with one engine, hit counts checked.

Engines:
  kernel    the project's kernel backend (``ubpf_py.kernel``: bpf() + PMU uprobes)
  intarget  ``ubpf-run --engine jit --mode intarget``: the program runs inside the
            target, entered from a patched jump; a probe that cannot run there makes
            ubpf-run fail, and every JSON "attached" event must say path "in-target",
            so this column is never the ptrace path in disguise
  jit       ``ubpf-run --engine jit --mode ptrace``: int3 + a stop in the tracer per hit
  interp    ``ubpf-run --engine interp --mode ptrace``

ubpf-run is run as ``python -m ubpf_py.cli`` from the checkout this file is in, so the
numbers belong to this tree and not to whatever ``ubpf-run`` is first on PATH.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import statistics
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

UBPF_ENGINES = {
    "intarget": ["--engine", "jit", "--mode", "intarget"],
    "jit": ["--engine", "jit", "--mode", "ptrace"],
    "interp": ["--engine", "interp", "--mode", "ptrace"],
}
#: the path every probe of an engine must report in its "attached" event
EXPECTED_PATH = {"intarget": "in-target", "jit": "ptrace", "interp": "ptrace"}
ENGINES = ["kernel", "intarget", "jit", "interp"]
#: engines cheap enough per hit for the kernel's N and repeat count
FAST_ENGINES = ("kernel", "intarget")
#: CPUs this process may use: a run's CPU share is its threads' CPU time over wall time x
#: min(threads, CPUs)
USABLE_CPUS = len(os.sched_getaffinity(0))


@dataclass(frozen=True)
class Row:
    func: str
    program: str
    mode: str

    @property
    def label(self) -> str:
        return f"{self.func} {self.program} {self.mode}"


@dataclass(frozen=True)
class Job:
    """What the target runs in one cell: ``threads`` = 0 is the single-thread loop pinned to
    ``target_cpu`` with the tracer on ``tracer_cpu``; ``threads`` = T runs T threads, unpinned."""

    row: Row
    n: int
    target_cpu: int | None = None
    tracer_cpu: int | None = None
    threads: int = 0

    @property
    def calls(self) -> int:
        return self.n * max(1, self.threads)

    def target_argv(self, target: Path, result: Path) -> list[str]:
        argv = [str(target), self.row.func, str(self.n)]
        if self.target_cpu is not None:
            argv += ["--cpu", str(self.target_cpu)]
        if self.threads:
            argv += ["--threads", str(self.threads)]
        return [*argv, "--result", str(result)]


@dataclass
class Cell:
    """One probed run and its paired baseline (or the medians of several)."""

    engine: str
    placement: str
    n: int
    threads: int = 0
    baseline_ns: float | None = None
    probed_ns: float | None = None
    overhead_ns: float | None = None
    baseline_calls_per_s: float | None = None
    calls_per_s: float | None = None
    hits_entry: int | None = None
    hits_return: int | None = None
    ring_drops: int = 0
    records: int = 0
    wall_s: float = 0.0
    #: 1-minute load average when the cell started (combined cells: the highest of its runs)
    load1: float | None = None
    #: the 1-minute load average at the start of every repetition
    loads: list[float] = field(default_factory=list)
    #: "program:path (reason)" of every attached probe (ubpf-run engines)
    paths: list[str] = field(default_factory=list)
    #: the ubpf-run command line, to reproduce a failure
    command: str | None = None
    error: str | None = None
    #: (baseline, probed) ns per call of every repetition; the cell reports medians
    samples: list[tuple[float, float]] = field(default_factory=list)
    #: lowest and highest (probed - baseline) over the repetitions: the cell's spread
    overhead_min: float | None = None
    overhead_max: float | None = None
    #: share of the CPUs the probed run's calling threads got (their CPU time / (wall time x
    #: min(threads, CPUs))), median over repetitions: near 1 on a quiet machine; lower means
    #: other work (or the tracer) took CPU time from the target while it was timed
    cpu_share: float | None = None
    #: every repetition's ``cpu_share``
    shares: list[float] = field(default_factory=list)
    #: every repetition's probed calls/s (multi-thread cells)
    tputs: list[float] = field(default_factory=list)
    #: CPU ns per call (the calling threads' CPU time / calls) of the baseline and the probed run
    baseline_cpu_ns: float | None = None
    probed_cpu_ns: float | None = None
    #: page faults the probed run's calling threads took while timed (the highest over repetitions):
    #: memory a probe touches for the first time on a hit (say, ring buffer pages) shows here
    faults: int | None = None
    #: probed - baseline CPU ns per call, median over repetitions: the probe's cost in CPU time,
    #: which time other work held the CPU does not inflate (threads contending for a cache line
    #: spend more CPU time per call; threads waiting for a CPU do not)
    cpu_overhead_ns: float | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.overhead_ns is not None


# ---------------------------------------------------------------------------------------
# build
# ---------------------------------------------------------------------------------------
def build(build_dir: Path) -> tuple[Path, Path]:
    build_dir.mkdir(parents=True, exist_ok=True)
    target, obj = build_dir / "target", build_dir / "bench.bpf.o"
    subprocess.run(["gcc", "-O2", "-g", "-Wall", "-pthread", "-o", str(target), str(HERE / "target.c")],
                   check=True)
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


def expected_hits(row: Row, calls: int) -> tuple[int, int]:
    return (calls if row.mode in ("uprobe", "both") else 0, calls if row.mode in ("uretprobe", "both") else 0)


# ---------------------------------------------------------------------------------------
# runs
# ---------------------------------------------------------------------------------------
def _read_result(path: Path) -> dict[str, Any]:
    text = path.read_text().strip() if path.exists() else ""
    if not text:
        raise RuntimeError("the target wrote no result (did it run to the end?)")
    return json.loads(text.splitlines()[-1])


def cpu_share(res: dict[str, Any]) -> float | None:
    """The share of the CPUs a target run's calling threads got while timed (see Cell.cpu_share)."""
    wall, cpu = res.get("ns_total"), res.get("cpu_ns_total")
    if not wall or cpu is None:
        return None
    return round(float(cpu) / (float(wall) * min(int(res.get("threads") or 1), USABLE_CPUS)), 3)


def _cpu_per_call(res: dict[str, Any]) -> float | None:
    calls, cpu = res.get("calls"), res.get("cpu_ns_total")
    return float(cpu) / float(calls) if calls and cpu is not None else None


def _store_result(cell: Cell, res: dict[str, Any], baseline: bool) -> None:
    if baseline:
        cell.baseline_cpu_ns = _cpu_per_call(res)
        cell.baseline_ns = float(res["ns_per_call"])
        cell.baseline_calls_per_s = float(res.get("calls_per_s") or 0) or None
    else:
        cell.probed_ns = float(res["ns_per_call"])
        cell.calls_per_s = float(res.get("calls_per_s") or 0) or None
        cell.cpu_share = cpu_share(res)
        cell.probed_cpu_ns = _cpu_per_call(res)
        cell.faults = res.get("faults")


def baseline_run(target: Path, job: Job, cell: Cell, tmp: Path) -> None:
    out = tmp / "baseline.json"
    out.unlink(missing_ok=True)
    subprocess.run(job.target_argv(target, out), check=True, stdout=subprocess.DEVNULL, timeout=300)
    _store_result(cell, _read_result(out), baseline=True)


def _new_cell(engine: str, job: Job) -> Cell:
    return Cell(engine, "", job.n, threads=job.threads, load1=round(os.getloadavg()[0], 2))


def hits_map(row: Row) -> str:
    """The map a row's program counts its hits in (pcount: the per-CPU one)."""
    return "phits" if row.program == "pcount" else "hits"


def _hits_from_entries(entries: list[tuple[bytes, Any]]) -> dict[int, int]:
    """key -> count; a per-CPU value (a list of per-CPU u64 values) is summed."""
    return {struct.unpack("<I", k)[0]: sum(struct.unpack("<Q", x[:8])[0] for x in (v if isinstance(v, list) else [v]))
            for k, v in entries}


def _fail(cell: Cell, exc: BaseException) -> None:
    cell.error = f"{type(exc).__name__}: {exc}".splitlines()[0]


def kernel_run(spec: Any, target: Path, job: Job, tmp: Path) -> Cell:
    from ubpf_py.kernel.backend import run_command
    from ubpf_py.live.attach import AttachRequest

    cell = _new_cell("kernel", job)
    old_aff = os.sched_getaffinity(0)
    out = tmp / "kernel.json"
    out.unlink(missing_ok=True)
    try:
        baseline_run(target, job, cell, tmp)
        if job.tracer_cpu is not None:
            os.sched_setaffinity(0, {job.tracer_cpu})
        reqs = [AttachRequest(p, str(target), job.row.func, retprobe=r) for p, r in attach_list(job.row)]
        t0 = time.monotonic()
        res = run_command(spec, reqs, job.target_argv(target, out), cpu=job.target_cpu, timeout=600)
        cell.wall_s = time.monotonic() - t0
        if res.exit_code != 0:
            raise RuntimeError(f"target exited with {res.exit_code} (signal {res.signal})")
        _store_result(cell, _read_result(out), baseline=False)
        hits = _hits_from_entries(res.maps[hits_map(job.row)]["entries"] or [])
        cell.hits_entry, cell.hits_return = hits.get(0, 0), hits.get(1, 0)
        cell.ring_drops = hits.get(2, 0)
        cell.records = len(res.records)
        _check_hits(cell, job)
        cell.overhead_ns = cell.probed_ns - cell.baseline_ns
    except Exception as exc:  # a failed cell is reported, the benchmark goes on
        _fail(cell, exc)
    finally:
        os.sched_setaffinity(0, old_aff)
    return cell


def _check_hits(cell: Cell, job: Job) -> None:
    want = expected_hits(job.row, job.calls)
    got = (cell.hits_entry, cell.hits_return)
    if got != want:
        raise RuntimeError(f"hit count (entry, return) = {got}, expected {want}")


def ubpf_command() -> list[str]:
    return [sys.executable, "-m", "ubpf_py.cli"]


def ubpf_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def ubpf_available() -> str | None:
    """None when this checkout's ubpf-run can be used; else why not."""
    try:
        proc = subprocess.run([*ubpf_command(), "--help"], capture_output=True, text=True, timeout=60,
                              env=ubpf_env(), cwd=REPO)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"ubpf-run --help failed: {exc}"
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        return f"ubpf-run --help failed: {last[:160]}"
    if "--mode" not in proc.stdout:
        return "ubpf-run has no --mode option (in-target execution) in this checkout"
    return None


def _json_lines(stdout: str) -> list[Any]:
    try:
        doc = json.loads(stdout)
        return doc if isinstance(doc, list) else [doc]
    except json.JSONDecodeError:
        pass
    out = []
    for line in stdout.splitlines():
        line = line.strip()
        if line.startswith(("{", "[")):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def _find_hits(doc: Any, name: str = "hits") -> dict[int, int] | None:
    """The hits map ``name`` from ubpf-run's JSON output (maps at exit): a map event
    (``{"event": "map", "name": "hits", "decoded" | "entries": ...}``) or a
    ``{"maps": {"hits": {...}}}`` document; entries are [key, value] pairs of ints or
    of hex byte strings (the kernel oracle's format).  None when there is no such map."""
    if isinstance(doc, list):
        found = None
        for item in doc:
            hits = _find_hits(item, name)
            if hits is not None:
                found = hits  # the last print wins: the maps at exit
        return found
    if not isinstance(doc, dict):
        return None
    if doc.get("name") == name and ("decoded" in doc or "entries" in doc):
        return _hits_from_json(doc)
    maps = doc.get("maps")
    if isinstance(maps, dict) and isinstance(maps.get(name), dict):
        return _hits_from_json(maps[name])
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


def check_paths(events: list[Any], engine: str, row: Row) -> list[str]:
    """The "attached" events of a run: one per attached program, each with the path the
    engine must take; returns "program:path" strings, raises when a probe is missing,
    failed to attach, or took another path."""
    want = EXPECTED_PATH[engine]
    attached = [e for e in events if isinstance(e, dict) and e.get("event") == "attached"]
    by_prog = {e.get("program"): e for e in attached}
    out = []
    for prog, _ret in attach_list(row):
        ev = by_prog.get(prog)
        if ev is None:
            raise RuntimeError(f"ubpf-run's JSON has no 'attached' event for {prog}")
        if ev.get("err"):
            raise RuntimeError(f"{prog} did not attach: err {ev['err']} {ev.get('detail', '')}".strip())
        path, reason = ev.get("path"), ev.get("path_reason") or ""
        out.append(f"{prog}:{path}" + (f" ({reason})" if reason else ""))
        if path != want:
            raise RuntimeError(f"{prog} took path {path!r}" + (f" ({reason})" if reason else "")
                               + f", expected {want!r}")
    return out


def ubpf_run(engine: str, obj: Path, target: Path, job: Job, tmp: Path) -> Cell:
    cell = _new_cell(engine, job)
    out = tmp / f"{engine}.json"
    out.unlink(missing_ok=True)
    # options first: everything after the object may be taken as the command
    cmd = ubpf_command() + UBPF_ENGINES[engine] + ["--format", "json"]
    for prog, _ret in attach_list(job.row):
        cmd += ["--attach", f"{prog}={target}:{job.row.func}"]
    cmd += [str(obj), "--", *job.target_argv(target, out)]
    cell.command = "ubpf-run " + shlex.join(cmd[len(ubpf_command()):])
    tracer_cpu = job.tracer_cpu

    def pin() -> None:
        if tracer_cpu is not None:
            os.sched_setaffinity(0, {tracer_cpu})

    try:
        baseline_run(target, job, cell, tmp)
        t0 = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, preexec_fn=pin,
                              env=ubpf_env(), cwd=REPO)
        cell.wall_s = time.monotonic() - t0
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
            raise RuntimeError(f"ubpf-run failed (exit {proc.returncode}): {last[:300]}")
        events = _json_lines(proc.stdout)
        cell.paths = check_paths(events, engine, job.row)
        _store_result(cell, _read_result(out), baseline=False)
        hits = _find_hits(events, hits_map(job.row))
        if hits is None:
            raise RuntimeError(f"ubpf-run's JSON output has no {hits_map(job.row)!r} map, "
                               "so hit counts cannot be checked")
        cell.hits_entry, cell.hits_return = hits.get(0, 0), hits.get(1, 0)
        cell.ring_drops = hits.get(2, 0)
        _check_hits(cell, job)
        cell.overhead_ns = cell.probed_ns - cell.baseline_ns
    except Exception as exc:
        _fail(cell, exc)
    return cell


def combine(cells: list[Cell]) -> Cell:
    """One cell from repetitions of the same measurement (each a baseline + probed pair): the
    medians, with the spread of the overhead and every run's CPU share kept; a failed
    repetition makes the cell that failure."""
    failed = next((c for c in cells if not c.ok), None)
    if failed is not None:
        return failed
    out = cells[0]
    out.samples = [(c.baseline_ns, c.probed_ns) for c in cells]  # type: ignore[misc]
    out.baseline_ns = statistics.median(b for b, _ in out.samples)
    out.probed_ns = statistics.median(p for _, p in out.samples)
    added = [p - b for b, p in out.samples]
    out.overhead_ns = statistics.median(added)
    out.overhead_min, out.overhead_max = min(added), max(added)
    out.tputs = [c.calls_per_s for c in cells if c.calls_per_s]
    out.calls_per_s = statistics.median(out.tputs) if out.tputs else None
    base_tput = [c.baseline_calls_per_s for c in cells if c.baseline_calls_per_s]
    out.baseline_calls_per_s = statistics.median(base_tput) if base_tput else None
    cpu = [(c.baseline_cpu_ns, c.probed_cpu_ns) for c in cells
           if c.baseline_cpu_ns is not None and c.probed_cpu_ns is not None]
    if cpu:
        out.baseline_cpu_ns = statistics.median(b for b, _ in cpu)
        out.probed_cpu_ns = statistics.median(p for _, p in cpu)
        out.cpu_overhead_ns = statistics.median(p - b for b, p in cpu)
    faults = [c.faults for c in cells if c.faults is not None]
    out.faults = max(faults) if faults else None
    out.shares = [c.cpu_share for c in cells if c.cpu_share is not None]
    out.cpu_share = statistics.median(out.shares) if out.shares else None
    out.ring_drops = max(c.ring_drops for c in cells)
    out.wall_s = sum(c.wall_s for c in cells)
    out.loads = [c.load1 for c in cells if c.load1 is not None]
    out.load1 = max(out.loads) if out.loads else None
    return out
