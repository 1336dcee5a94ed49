"""Per-hit cost of reading each fact exactly (probe.hits.HitFiller.refresh) vs the approximation.

    python3 benchmarks/hit_facts.py [--n 20000]

Reads the facts of a sleeping thread of this process the way the tracer reads a stopped
tracee's, for each set of facts a program can need, and prints microseconds per hit.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    from ubpf_py.probe import ptrace as P
    from ubpf_py.probe.hits import HitFiller

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    n = ap.parse_args().n
    stop = threading.Event()
    tids: list[int] = []
    t = threading.Thread(target=lambda: (tids.append(threading.get_native_id()), stop.wait()))
    t.start()
    while not tids:
        time.sleep(0.001)
    tgid, tid = os.getpid(), tids[0]
    print(f"load average {os.getloadavg()[0]:.2f}; {n} reads each")
    for label, exact, needs in (("approximation (--approx-facts)", False, set()), ("cpu", True, {"cpu"}),
                                ("comm", True, {"comm"}), ("uid/gid", True, {"ids"}),
                                ("cpu + uid/gid + comm", True, {"cpu", "ids", "comm"})):
        f = HitFiller(P.RegsBuf(), exact_cpu=exact)
        f.needs = needs
        f.switch(tgid, tid)
        t0 = time.perf_counter()
        for _ in range(n):
            f.refresh(tgid, tid)
        print(f"{label:32} {(time.perf_counter() - t0) / n * 1e6:6.2f} us/hit")
    stop.set()
    t.join()


if __name__ == "__main__":
    main()
