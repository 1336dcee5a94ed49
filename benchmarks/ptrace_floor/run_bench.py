"""Per-hit cost of the probe engine against a minimal C ptrace tracer (the floor).

    python3 benchmarks/ptrace_floor/run_bench.py [--calls N] [--cpu C] [--modes push,endbr,...]

For every first-instruction kind of bench_target.c it runs, pinned to one CPU
(tracer and target share it, as in the issue's floor measurement):

* the target alone (baseline),
* ``floor`` (C, no handler),
* the engine with the pure-Python loop and a no-op Python handler,
* the engine with the native loop (native/hotloop.c) and the same Python handler,
* the engine with the native loop and a native handler (a C function pointer, no Python per hit).

Per-hit cost = (time with probe - baseline time) / calls, both as wall time and
as CPU time (tracer + target: the honest figure on a loaded machine).  Results
are printed as a table and written to benchmarks/results/ptrace_floor.json.

Every side is timed over the same span: from starting the target (or the tracer
that starts it) to the target's exit, set-up included -- the baseline and the
floor as whole processes, the engine from ``ProbeSession.launch`` to the end of
``run()`` (only the Python interpreter's own start-up is left out).  Every side's
hit count is checked: the floor's ``hits=N``, the engine's hit counter and (Python
handlers) the handler's own count must all equal the number of calls, so an
engine that missed breakpoints cannot look cheap.  The load average before and
after the run is printed and stored with the results.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

MODES = ["push", "endbr", "nop", "sub", "jmp", "lea", "riprel"]


def build(out: Path) -> tuple[Path, Path]:
    target, floor = out / "bench_target", out / "floor"
    subprocess.run(["gcc", "-O2", "-o", str(target), str(HERE / "bench_target.c")], check=True)
    subprocess.run(["gcc", "-O2", "-o", str(floor), str(HERE / "floor.c")], check=True)
    return target, floor


def cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_cmd(argv: list[str]) -> tuple[float, float, bytes, bytes]:
    c0, t0 = cpu_children(), time.perf_counter()
    p = subprocess.run(argv, capture_output=True, check=True)
    return time.perf_counter() - t0, cpu_children() - c0, p.stdout, p.stderr


def engine_child(target: str, mode: str, calls: int, loop: str) -> None:
    """Runs in a fresh interpreter: one traced run, prints wall/cpu of the run as JSON."""
    from ubpf_py.probe.engine import ProbeSession
    from ubpf_py.probe.symbols import resolve_function
    off = resolve_function(target, f"f_{mode}")
    count = [0]

    def handler(hit) -> None:
        count[0] += 1

    r, w = os.pipe()
    # the same span as the floor's whole process: from starting the target to its exit
    c0, cc0, t0 = cpu_self(), cpu_children(), time.perf_counter()
    s = ProbeSession.launch([target, mode, str(calls)], stdout=w, native=(loop != "python"))
    os.close(w)
    if loop == "native-prog":
        labs = ctypes.cast(ctypes.CDLL(None).labs, ctypes.c_void_p).value
        probe = s.add_probe(target, off, None, native_prog=labs)
    else:
        probe = s.add_probe(target, off, handler)
    status = s.run()
    wall = time.perf_counter() - t0
    cpu = cpu_self() - c0 + cpu_children() - cc0
    out = os.read(r, 4096)
    st = s.stats
    print(json.dumps({"wall": wall, "cpu": cpu, "status": status, "stdout": out.decode(),
                      "handler_calls": count[0], "hits": st.hits.get(probe, 0),
                      "tracer_us": st.per_hit_us, "overhead_us": st.overhead_per_hit_us}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--cpu", type=int, default=0)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--engine-child", nargs=4, metavar=("TARGET", "MODE", "CALLS", "LOOP"))
    a = ap.parse_args()
    if a.engine_child:
        t, m, n, loop = a.engine_child
        engine_child(t, m, int(n), loop)
        return
    os.sched_setaffinity(0, {a.cpu})
    tmp = Path(tempfile.mkdtemp(prefix="ptrace_floor."))
    target, floor = build(tmp)
    from ubpf_py.probe.symbols import resolve_function
    results = []
    n = a.calls
    load_start = os.getloadavg()
    print(f"calls per run: {n}, pinned to CPU {a.cpu}, load average {load_start[0]:.2f} at start")
    print(f"{'mode':8} {'floor wall':>10} {'cpu':>6} | {'python wall':>11} {'cpu':>6} | "
          f"{'native wall':>11} {'cpu':>6} | {'nat-prog wall':>13} {'cpu':>6}  (us/hit)  ratio native/floor cpu")
    for mode in a.modes.split(","):
        off = resolve_function(str(target), f"f_{mode}")
        bw, bc, ref, _ = run_cmd([str(target), mode, str(n)])
        fw, fc, fout, ferr = run_cmd([str(floor), hex(off), "--", str(target), mode, str(n)])
        assert fout == ref, (mode, fout, ref)
        assert f"hits={n}".encode() in ferr, (mode, "floor hit count", ferr)
        row = {"mode": mode, "calls": n, "baseline_wall": bw, "baseline_cpu": bc,
               "floor_wall_us": (fw - bw) / n * 1e6, "floor_cpu_us": (fc - bc) / n * 1e6}
        for loop in ("python", "native", "native-prog"):
            p = subprocess.run([sys.executable, __file__, "--engine-child", str(target), mode, str(n), loop],
                               capture_output=True, check=True, text=True)
            d = json.loads(p.stdout.strip().splitlines()[-1])
            assert d["stdout"].encode() == ref and d["status"] == 0, (mode, loop, d)
            assert d["hits"] == n, (mode, loop, "engine hit count", d["hits"], n)
            if loop != "native-prog":
                assert d["handler_calls"] == n, (mode, loop, "handler calls", d["handler_calls"], n)
            row[f"{loop}_wall_us"] = (d["wall"] - bw) / n * 1e6
            row[f"{loop}_cpu_us"] = (d["cpu"] - bc) / n * 1e6
            row[f"{loop}_tracer_us"] = d["tracer_us"]
        results.append(row)
        print(f"{mode:8} {row['floor_wall_us']:10.1f} {row['floor_cpu_us']:6.1f} | "
              f"{row['python_wall_us']:11.1f} {row['python_cpu_us']:6.1f} | "
              f"{row['native_wall_us']:11.1f} {row['native_cpu_us']:6.1f} | "
              f"{row['native-prog_wall_us']:13.1f} {row['native-prog_cpu_us']:6.1f}   "
              f"{row['native_cpu_us'] / row['floor_cpu_us']:.2f}x (prog {row['native-prog_cpu_us'] / row['floor_cpu_us']:.2f}x)")
    res = ROOT / "benchmarks" / "results"
    res.mkdir(parents=True, exist_ok=True)
    load_end = os.getloadavg()
    print(f"load average {load_end[0]:.2f} at end (1/5/15 min: start {load_start}, end {load_end})")
    (res / "ptrace_floor.json").write_text(json.dumps({"load_start": load_start, "load_end": load_end,
                                                       "ncpus": os.cpu_count(), "rows": results}, indent=1))


if __name__ == "__main__":
    main()
