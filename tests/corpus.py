#!/usr/bin/env python3
"""Run corpus cases through ``ubpf-run`` and check them like the kernel oracle.

    python tests/corpus.py [--engine jit|interp] [--build DIR] [--keep] [CASE ...]

For each case of ../shared/corpus/manifest.json it runs ``ubpf-run OBJECT
--format json -o FILE [--attach ...] [--set ...] -- TARGET`` in the build dir,
turns the JSON lines into the oracle's JSON document (shared/corpus/README.md,
"Oracle JSON") and checks it with ``shared/corpus/oracle/check.py --result``.
Prints PASS/FAIL per case and ends with "N passed, N failed".
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paths import BUILD, CORPUS, build_corpus

CHECK = CORPUS / "oracle" / "check.py"


def load_manifest() -> list[dict]:
    return json.loads((CORPUS / "manifest.json").read_text())["cases"]


def ubpf_argv(case: dict, out_file: str, engine: str) -> list[str]:
    """The ubpf-run command line for a manifest case (engine "kernel" = ``--backend kernel``;
    "jit" runs verified programs inside the target where it can, "jit-ptrace" never does)."""
    argv = [sys.executable, "-m", "ubpf_py.cli", case["bpf"], "--format", "json", "-o", out_file]
    if engine == "kernel":
        argv += ["--backend", "kernel"]
    elif engine == "jit-ptrace":
        argv += ["--engine", "jit", "--mode", "ptrace"]
    else:
        argv += ["--engine", engine]
    attach = case.get("attach", "auto")
    entries = [attach] if isinstance(attach, str) else attach
    if "auto" not in entries:
        argv.append("--no-auto")
    for a in entries:
        if a == "auto":
            continue
        cookie = f"@{a['cookie']}" if "cookie" in a else ""
        if "usdt" in a:
            argv += ["--attach", f"{a['program']}={a['binary']}:{a['usdt']}{cookie}"]
        else:
            off = f"+{a['offset']}" if a.get("offset") else ""
            argv += ["--attach", f"{a['program']}={a['binary']}:{a['function']}{off}{cookie}"]
    for k, v in case.get("set", {}).items():
        argv += ["--set", f"{k}={v}"]
    return [*argv, "--", *case["target"]]


def to_oracle(lines: list[dict], stdout: str) -> dict:
    """Oracle JSON from ubpf-run's JSON lines."""
    res: dict = {"pid": None, "exit_code": None, "signal": None, "stdout": stdout, "attached": [],
                 "printk": [], "records": [], "perf_lost": 0, "maps": {}, "globals": {}, "proc_maps": []}
    for ev in lines:
        kind = ev.get("event")
        if kind == "attached":
            res["attached"].append({"program": ev["program"], "target": ev["target"], "err": ev.get("err", 0)})
        elif kind == "printk":
            res["printk"].append(ev["message"])
        elif kind == "record":
            rec = {"kind": ev["kind"], "map": ev["map"], "data": ev["data"]}
            if "cpu" in ev:
                rec["cpu"] = ev["cpu"]
            res["records"].append(rec)
        elif kind == "lost" and ev["kind"] == "perfbuf":
            res["perf_lost"] += ev["count"]
        elif kind == "exit":
            res["pid"], res["exit_code"], res["signal"] = ev["pid"], ev["exit_code"], ev["signal"]
        elif kind == "proc_maps":
            res["proc_maps"] = ev["maps"]
        elif kind == "map":
            res["maps"][ev["name"]] = {k: ev[k] for k in ("type", "key_size", "value_size", "max_entries",
                                                          "internal", "entries")}
        elif kind == "global":
            res["globals"][ev["name"]] = ev["data"]
    return res


def run_case(case: dict, build: Path, engine: str = "jit", keep: str | None = None) -> tuple[bool, str]:
    """Run one case; returns (passed, report text)."""
    with tempfile.TemporaryDirectory(prefix="ubpf-corpus-") as tmp:
        out_file = os.path.join(tmp, "out.jsonl")
        argv = ubpf_argv(case, out_file, engine)
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
        try:
            p = subprocess.run(argv, cwd=build, capture_output=True, text=True,
                               timeout=case.get("timeout", 60) + 60, env=env)
        except subprocess.TimeoutExpired:
            return False, f"ubpf-run timed out: {' '.join(argv)}"
        if p.returncode != 0:
            return False, f"ubpf-run exited {p.returncode}: {p.stderr.strip()[-1500:]}"
        lines = [json.loads(x) for x in Path(out_file).read_text().splitlines() if x.strip()]
        res = to_oracle(lines, p.stdout)
        result_file = keep or os.path.join(tmp, "result.json")
        Path(result_file).write_text(json.dumps(res, indent=1))
        c = subprocess.run([sys.executable, str(CHECK), "--build", str(build), "--result", result_file,
                            case["name"]], capture_output=True, text=True)
        ok = c.returncode == 0 and f"PASS {case['name']}" in c.stdout
        return ok, (c.stdout + c.stderr).strip() + ("" if ok else f"\nstderr of ubpf-run:\n{p.stderr[-1500:]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cases", nargs="*")
    ap.add_argument("--engine", choices=["jit", "interp", "kernel"], default="jit",
                    help="userspace engine, or kernel for ubpf-run --backend kernel")
    ap.add_argument("--build", default=None, help=f"corpus build dir (default {BUILD}, built if missing)")
    ap.add_argument("--keep", metavar="FILE", help="keep the oracle JSON of the (single) case here")
    a = ap.parse_args()
    build = Path(a.build).resolve() if a.build else build_corpus()
    cases = [c for c in load_manifest() if not a.cases or c["name"] in a.cases]
    unknown = set(a.cases) - {c["name"] for c in cases}
    if unknown:
        print(f"unknown case(s): {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    npass = nfail = 0
    for case in cases:
        ok, text = run_case(case, build, a.engine, a.keep)
        npass += ok
        nfail += not ok
        print(f"{'PASS' if ok else 'FAIL'} {case['name']}" + ("" if ok else f"\n{text}"))
    print(f"{npass} passed, {nfail} failed")
    return 1 if nfail else 0


if __name__ == "__main__":
    sys.exit(main())
