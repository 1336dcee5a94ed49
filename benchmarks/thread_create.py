"""Cost of a thread create + join in a traced target, with and without tracing new threads.

A probe that runs in the target needs no tracer per new thread; tracing every thread anyway
(PTRACE_O_TRACECLONE, ``UBPF_TRACE_NEW_THREADS=1``) stops parent and child per
``pthread_create`` and sends both through the tracer.  The target (C, built here) waits until
the tracer has armed an in-target entry probe on ``work``, then runs N rounds of
pthread_create + pthread_join of a thread that calls ``work`` once, and prints the median and
the best 10% of the per-round times.  Three runs: no tracer, every thread traced, new threads
untraced (the default).  Usage: ``python3 benchmarks/thread_create.py [--rounds N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TARGET = r"""
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
volatile long sink;
__attribute__((noinline, used)) long work(long x) { sink += x; return x + 1; }
static void *body(void *p) { work((long)p); return 0; }
static long now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec * 1000000000L + t.tv_nsec; }
static int cmp(const void *a, const void *b) { long x = *(const long *)a, y = *(const long *)b; return (x > y) - (x < y); }
int main(int argc, char **argv)
{
	int n = atoi(argv[1]);
	while (argc > 2 && access(argv[2], F_OK) != 0)
		usleep(1000);
	long *ns = malloc(n * sizeof(long));
	for (int i = 0; i < n; i++) {
		pthread_t t;
		long t0 = now();
		pthread_create(&t, 0, body, (void *)(long)i);
		pthread_join(t, 0);
		ns[i] = now() - t0;
	}
	qsort(ns, n, sizeof(long), cmp);
	long best = 0;
	for (int i = 0; i < n / 10; i++)
		best += ns[i];
	printf("{\"median_ns\": %ld, \"best10_ns\": %ld}\n", ns[n / 2], best / (n / 10));
	return 0;
}
"""

PROG = r"""
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
char LICENSE[] SEC("license") = "GPL";
struct { __uint(type, BPF_MAP_TYPE_ARRAY); __uint(max_entries, 1); __type(key, __u32); __type(value, __u64); } hits SEC(".maps");
SEC("uprobe") int count(void *ctx)
{
	__u32 k = 0;
	__u64 *v = bpf_map_lookup_elem(&hits, &k);
	if (v)
		__sync_fetch_and_add(v, 1);
	return 0;
}
"""


def build(d: Path) -> tuple[Path, Path]:
    (d / "t.c").write_text(TARGET)
    subprocess.run(["gcc", "-O2", "-pthread", "-o", str(d / "t"), str(d / "t.c")], check=True)
    (d / "p.bpf.c").write_text(PROG)
    clang = shutil.which("clang") or shutil.which("clang-14")
    subprocess.run([clang, "-O2", "-g", "-target", "bpf", "-I/usr/include/x86_64-linux-gnu", "-c", str(d / "p.bpf.c"),
                    "-o", str(d / "p.bpf.o")], check=True)
    return d / "t", d / "p.bpf.o"


def traced(exe: Path, prog: Path, rounds: int, trace_new: bool, d: Path) -> dict:
    gate, out = d / "gate", d / "out.jsonl"
    gate.unlink(missing_ok=True)
    out.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=str(REPO), UBPF_TRACE_NEW_THREADS="1" if trace_new else "0")
    p = subprocess.Popen([sys.executable, "-m", "ubpf_py.cli", str(prog), "--no-auto", "-a", f"count={exe}:work",
                          "-f", "json", "-o", str(out), "--", str(exe), str(rounds), str(gate)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and '"attached"' not in (out.read_text() if out.exists() else ""):
        time.sleep(0.02)
    gate.touch()
    so, se = p.communicate(timeout=600)
    if p.returncode != 0 or not so.strip():
        raise SystemExit(f"ubpf-run failed ({p.returncode}): {se[-2000:]}")
    res = json.loads(so.strip().splitlines()[0])
    hits = next(e["decoded"][0][1] for e in map(json.loads, out.read_text().splitlines())
                if e.get("event") == "map" and e["name"] == "hits")
    if hits != rounds:
        raise SystemExit(f"probe counted {hits} of {rounds} calls: {se[-2000:]}")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2000)
    a = ap.parse_args()
    d = Path(tempfile.mkdtemp(prefix="ubpf-thread-create-"))
    try:
        exe, prog = build(d)
        plain = json.loads(subprocess.run([str(exe), str(a.rounds)], capture_output=True, text=True,
                                          check=True).stdout)
        rows = [("no tracer", plain),
                ("traced, every new thread traced (UBPF_TRACE_NEW_THREADS=1)", traced(exe, prog, a.rounds, True, d)),
                ("traced, new threads untraced (default)", traced(exe, prog, a.rounds, False, d))]
        print(f"thread create + join, {a.rounds} rounds, in-target entry probe on the thread's function")
        print(f"{'run':62} {'median us':>10} {'best 10% us':>12}")
        for name, r in rows:
            print(f"{name:62} {r['median_ns'] / 1000:10.1f} {r['best10_ns'] / 1000:12.1f}")
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
