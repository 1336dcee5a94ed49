"""How often does a target survive ``kill -9`` of its tracer?  (the guardian's figure)

    python3 benchmarks/ptrace_floor/kill_survival.py [--kills 100] [--threads 4] [--sleep-us -1]
                                                     [--no-guardian] [--native 0|1]

Each round starts a tracer process (this script with ``--tracer``) that
launches mt_target under probes (tick: entry + return probe) with the
guardian on, kills the tracer with SIGKILL after a random 50-500 ms, waits for
the guardian to repair, then checks the target:

* its executable text equals the file's again (no int3 left);
* it still runs: SIGTERM makes it report and exit 0 with every result right (bad=0).

``--sleep-us -1`` is heavy probing (tick in a tight loop on every thread); a
positive value sleeps that long between calls.  This script becomes a child
subreaper so orphaned targets are reparented to it and their status is seen.
Results: benchmarks/results/kill_survival.json.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
PR_SET_CHILD_SUBREAPER = 36


def tracer_main(target: str, threads: int, sleep_us: int, guardian: bool, native: bool, out: str) -> None:
    import faulthandler
    faulthandler.register(signal.SIGUSR2)    # stack dump on demand (debugging a stuck tracer)
    from ubpf_py.probe.engine import ProbeSession
    from ubpf_py.probe.symbols import resolve_function
    off = resolve_function(target, "tick")
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    s = ProbeSession.launch([target, str(threads), "-1" if sleep_us < 0 else "0", str(max(sleep_us, 0))],
                            stdout=fd, guardian=guardian, native=native)
    n = [0]

    def h(hit):
        n[0] += 1

    s.add_probe(target, off, h)
    s.add_probe(target, off, h, is_return=True)
    told = [False]

    def ready() -> None:
        """The pid goes out once the stop loop runs, with its signal handlers in place: a
        signal sent right after reading it must find a tracer that can detach."""
        if not told[0]:
            told[0] = True
            print(s.pid, flush=True)

    if s.native_loop:
        s.add_poll(ready, 3600.0)
    else:
        ready()
    s.run()


def text_intact(pid: int, exe: str) -> bool:
    """Every executable mapping of ``exe`` in ``pid`` equals the file's bytes."""
    real = os.path.realpath(exe)
    with open(f"/proc/{pid}/maps") as f:
        lines = [ln.split() for ln in f]
    data = Path(real).read_bytes()
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        for parts in lines:
            if len(parts) >= 6 and parts[5] == real and "x" in parts[1]:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                off = int(parts[2], 16)
                mem = os.pread(fd, hi - lo, lo)
                want = data[off:off + (hi - lo)]
                if mem[:len(want)] != want:
                    bad = [i for i in range(len(want)) if mem[i] != want[i]][:4]
                    print(f"text differs at file offsets {[hex(off + i) for i in bad]}: "
                          f"{[hex(mem[i]) for i in bad]} vs {[hex(want[i]) for i in bad]}", file=sys.stderr)
                    return False
    finally:
        os.close(fd)
    return True


def wait_exit(pid: int, timeout: float) -> int | None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            p, st = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return None
        if p == pid:
            return st
        time.sleep(0.01)
    return None


def one_round(target: Path, args, rng: random.Random, tmp: Path) -> dict:
    out = tmp / "target.out"
    err = tmp / "tracer.err"
    with open(err, "w") as ef:
        tr = subprocess.Popen([sys.executable, __file__, "--tracer", str(target), str(args.threads),
                               str(args.sleep_us), "0" if args.no_guardian else "1", str(args.native), str(out)],
                              stdout=subprocess.PIPE, stderr=ef, text=True)
    pid = int(tr.stdout.readline())
    delay = rng.uniform(0.05, 0.5)
    time.sleep(delay)
    t_kill = time.monotonic()
    os.kill(tr.pid, signal.SIGKILL)
    tr.wait()
    time.sleep(0.3)                      # the guardian repairs
    res = {"delay": round(delay, 3), "pid": pid, "kill_at": round(t_kill, 6),
           "stderr": err.read_text()[-300:]}
    st = wait_exit(pid, 0.0)
    if st is not None:                   # died right after the kill
        res.update(survived=False, why=f"died: signal {os.WTERMSIG(st)}" if os.WIFSIGNALED(st) else "exited")
        return res
    try:
        res["text_intact"] = text_intact(pid, str(target))
    except OSError:
        res["text_intact"] = False
    time.sleep(0.2)                      # keep running a little: stray int3/trampoline would kill it now
    os.kill(pid, signal.SIGTERM)
    st = wait_exit(pid, 10.0)
    if st is None:
        os.kill(pid, signal.SIGKILL)
        wait_exit(pid, 5.0)
        res.update(survived=False, why="hung")
        return res
    text = out.read_text()
    ok = os.WIFEXITED(st) and os.WEXITSTATUS(st) == 0 and "bad=0" in text
    res.update(survived=ok and res["text_intact"],
               why="" if ok else (f"signal {os.WTERMSIG(st)}" if os.WIFSIGNALED(st) else f"exit {os.WEXITSTATUS(st)} {text.strip()}"))
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=int, default=100)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--sleep-us", type=int, default=-1)
    ap.add_argument("--no-guardian", action="store_true")
    ap.add_argument("--native", type=int, default=1)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--tracer", nargs=6)
    a = ap.parse_args()
    if a.tracer:
        t, n, sl, g, nat, out = a.tracer
        tracer_main(t, int(n), int(sl), g == "1", nat == "1", out)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    tmp = Path(tempfile.mkdtemp(prefix="kill_survival."))
    target = tmp / "mt_target"
    subprocess.run(["gcc", "-O2", "-pthread", "-o", str(target), str(HERE / "mt_target.c")], check=True)
    rng = random.Random(a.seed)
    rounds = []
    for i in range(a.kills):
        r = one_round(target, a, rng, tmp)
        rounds.append(r)
        print(f"{i + 1:3d} delay={r['delay']:.3f}s survived={r['survived']} {r.get('why', '')}", flush=True)
    n = sum(r["survived"] for r in rounds)
    mode = "heavy (tight loop)" if a.sleep_us < 0 else f"{a.sleep_us} us between calls"
    print(f"survived {n}/{len(rounds)} tracer kills; {a.threads} threads, {mode}, "
          f"guardian {'off' if a.no_guardian else 'on'}, {'native' if a.native else 'python'} loop")
    res = ROOT / "benchmarks" / "results"
    res.mkdir(parents=True, exist_ok=True)
    name = f"kill_survival_{'noguard' if a.no_guardian else 'guard'}_{a.sleep_us}.json"
    (res / name).write_text(json.dumps({"survived": n, "kills": len(rounds), "threads": a.threads,
                                        "sleep_us": a.sleep_us, "rounds": rounds}, indent=1))


if __name__ == "__main__":
    main()
