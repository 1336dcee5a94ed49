"""Multi-threaded target under probes: exact counts and cost (8 threads x 100,000 calls by default).

    python3 benchmarks/ptrace_floor/mt_bench.py [--threads 8] [--calls 100000] [--loops native,python]

Every thread checks every result of the probed function, so a corrupted
register or stack makes the target exit 1; the hit count must equal
threads x calls exactly (entry probe) and the return probe count too.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    from ubpf_py.probe.engine import ProbeSession
    from ubpf_py.probe.symbols import resolve_function
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--calls", type=int, default=100000)
    ap.add_argument("--loops", default="native,python")
    ap.add_argument("--retprobe", action="store_true", help="also a return probe on tick")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mt_bench."))
    target = tmp / "mt_target"
    subprocess.run(["gcc", "-O2", "-pthread", "-o", str(target), str(HERE / "mt_target.c")], check=True)
    off = resolve_function(str(target), "tick")
    want = a.threads * a.calls
    rows = []
    for loop in a.loops.split(","):
        r, w = os.pipe()
        s = ProbeSession.launch([str(target), str(a.threads), str(a.calls)], stdout=w, native=loop == "native")
        os.close(w)
        n = {"e": 0, "r": 0}

        def on_e(h, n=n):
            n["e"] += 1

        def on_r(h, n=n):
            n["r"] += 1
        s.add_probe(str(target), off, on_e)
        if a.retprobe:
            s.add_probe(str(target), off, on_r, is_return=True)
        t0 = time.perf_counter()
        status = s.run()
        wall = time.perf_counter() - t0
        out = os.read(r, 4096).decode()
        os.close(r)
        st = s.stats
        ok = status == 0 and n["e"] == want and (not a.retprobe or n["r"] == want) and "bad=0" in out
        row = {"loop": loop, "threads": a.threads, "calls": a.calls, "entry_hits": n["e"], "return_hits": n["r"],
               "status": status, "ok": ok, "wall_s": round(wall, 2), "us_per_call": round(wall / want * 1e6, 2),
               "tracer_us_per_hit": round(st.per_hit_us, 2)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    res = ROOT / "benchmarks" / "results"
    res.mkdir(parents=True, exist_ok=True)
    (res / "mt_bench.json").write_text(json.dumps(rows, indent=1))
    sys.exit(0 if all(r["ok"] for r in rows) else 1)


if __name__ == "__main__":
    main()
