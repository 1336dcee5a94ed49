"""Verifier speed on the corpus (goal: every program in under one second).

Run: python3 benchmarks/verifier_speed.py [--repeat N]

For every program of every corpus object (and the invalid/ set) it reports the
best-of-N wall time, the instructions processed and the states kept, sorted
slowest first, and prints the slowest.  Exit status 1 if any corpus program
takes a second or more.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ubpf_py.obj.elf import load_object
from ubpf_py.verifier import hidden_functions, verify_program

BUILD = Path(__file__).resolve().parents[1] / ".corpus-build"
GOAL_SECONDS = 1.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    rows = []
    paths = sorted(BUILD.glob("*.bpf.o")) + sorted((BUILD / "invalid").glob("*.o"))
    for path in paths:
        obj = load_object(str(path))
        for prog in obj.programs.values():
            best = float("inf")
            rep = None
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                rep = verify_program(prog, obj.maps, mode="warn", btf=obj.btf, hidden=hidden_functions(str(path)))
                best = min(best, time.perf_counter() - t0)
            rows.append((best, path.name, prog.name, rep.processed, rep.states, rep.ok))
    rows.sort(reverse=True)
    print(f"{'seconds':>9} {'insns':>7} {'states':>7}  verdict  program")
    for best, obj, name, processed, states, ok in rows:
        print(f"{best:9.4f} {processed:7} {states:7}  {'ok' if ok else 'reject':7}  {obj}:{name}")
    slow = rows[0]
    total = sum(r[0] for r in rows)
    print(f"\nslowest: {slow[1]}:{slow[2]} {slow[0] * 1000:.1f} ms ({slow[3]} insns processed); "
          f"{len(rows)} programs in {total:.2f} s")
    over = [r for r in rows if r[0] >= GOAL_SECONDS]
    if over:
        print(f"over the {GOAL_SECONDS} s goal: {[f'{r[1]}:{r[2]}' for r in over]}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
