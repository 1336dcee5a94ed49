"""ubpf-run while the target runs, and for machines: ``--interval`` (text and JSON records,
``--clear``), ``--metrics`` scraped over HTTP, a JSON stdout that parses line by line while
the target prints, histograms found by BTF type (``--hist`` to force), C sources compiled
on the fly, and ``ubpf-run dump``."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from cli_util import REPO, run_cli

pytestmark = pytest.mark.skipif(shutil.which("clang") is None, reason="clang builds the examples")

ALLOCS = str(REPO / "ubpf_py" / "examples" / "allocs.bpf.c")
MALLOCSIZE = str(REPO / "ubpf_py" / "examples" / "mallocsize.bpf.c")
ATTACH = ["-a", "malloc_entry=libc.so.6:malloc"]
#: the same mallocs on every run (see test_api.TARGET), repeated with pauses so intervals pass
ROUNDS = "import time\nfor i in range({n}):\n    b = [bytearray(k) for k in range(0, 300000, 3000)]\n    time.sleep({pause})"
#: the C stop loop (default) and the pure-Python loop wake up for interval work differently
LOOPS = [pytest.param({}, id="c-loop"), pytest.param({"UBPF_NATIVE": "0"}, id="python-loop")]


def _cli_env(extra: dict) -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO), **extra)


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]    # every line must parse


@pytest.mark.parametrize("env", LOOPS)
def test_interval_text_prints_every_period(env):
    """Six pauses of 0.3 s with -i 0.25: a header per print, histogram and counter each time,
    also while the target sleeps between rounds (no probe hits then)."""
    p = subprocess.run([sys.executable, "-m", "ubpf_py.cli", ALLOCS, *ATTACH, "-i", "0.25", "--",
                        "python3", "-c", ROUNDS.format(n=6, pause=0.3)],
                       capture_output=True, text=True, timeout=120, env=_cli_env(env))
    assert p.returncode == 0, p.stderr[-2000:]
    headers = re.findall(r"^\d\d:\d\d:\d\d$", p.stdout, re.M)
    assert len(headers) >= 4, p.stdout[-3000:]
    assert p.stdout.count("\n@sizes:\n") >= len(headers), p.stdout[-3000:]   # every print + exit
    assert re.search(r"^\[128K, 256K\)\s+\d+ \|@+", p.stdout, re.M)


def test_interval_json_clear_adds_up():
    """--clear: each interval record holds only what happened since the last one, so the records
    plus the final dump add up to the total of a run without --clear (the target's mallocs are the
    same on every run).  Exact with --mode ptrace, where the maps are read and cleared between
    program runs; programs running in the target (or the kernel) may add to a counter between its
    read and its clear, as with libbpf-tools."""
    target = ["python3", "-c", ROUNDS.format(n=5, pause=0.3)]
    p = run_cli(ALLOCS, *ATTACH, "--mode", "ptrace", "-f", "json", "-i", "0.2", "--clear", "--", *target,
                timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    events = _json_lines(p.stdout)
    intervals = [e for e in events if e["event"] == "interval"]
    assert len(intervals) >= 4
    assert all(isinstance(e["timestamp"], float) and e["time"].endswith("Z") for e in intervals)
    assert [e["timestamp"] for e in intervals] == sorted(e["timestamp"] for e in intervals)

    def python3_calls(maps: list[dict]) -> int:
        m = next(m for m in maps if m["name"] == "counts")
        return sum(v for k, v in m["decoded"] or [] if k["comm"] == "python3")

    final = [e for e in events if e["event"] == "map"]
    cleared_total = sum(python3_calls(e["maps"]) for e in intervals) + python3_calls(final)
    q = run_cli(ALLOCS, *ATTACH, "-f", "json", "--", *target, timeout=120)
    assert q.returncode == 0, q.stderr[-2000:]
    whole = python3_calls([e for e in _json_lines(q.stdout) if e["event"] == "map"])
    assert cleared_total == whole > 3000
    hist = next(e for e in _json_lines(q.stdout) if e.get("name") == "sizes")["hist"][0]
    assert hist["kind"] == "log2" and {"label": "[128K, 256K)", "min": 131072, "max": 262143} \
        .items() <= next(b for b in hist["buckets"] if b["min"] == 131072).items()


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        assert r.status == 200
        return r.read().decode()


@pytest.mark.parametrize("env", [*LOOPS, pytest.param({"backend": "kernel"}, id="kernel")])
def test_metrics_endpoint_scraped_while_target_runs(env):
    from prometheus_client.parser import text_string_to_metric_families

    from ubpf_py.kernel.syscall import kernel_bpf_skip_reason

    env = dict(env)
    backend = ["--backend", env.pop("backend")] if "backend" in env else []
    if backend and kernel_bpf_skip_reason():
        pytest.skip(kernel_bpf_skip_reason())
    argv = [sys.executable, "-m", "ubpf_py.cli", ALLOCS, *ATTACH, *backend, "--metrics", "127.0.0.1:0", "--",
            "python3", "-c", ROUNDS.format(n=1, pause=4)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_cli_env(env))
    try:
        url = None
        for line in proc.stderr:
            m = re.search(r"metrics at (http://\S+)", line)
            if m:
                url = m.group(1)
                break
        assert url, "no metrics address printed"
        deadline = time.monotonic() + 20
        while True:   # the target allocates at once, then sleeps: the tick refreshes the snapshot
            fams = {f.name: f for f in text_string_to_metric_families(_scrape(url))}
            counts = fams.get("ubpf_counts")
            big = fams.get("ubpf_big")
            # every bytearray allocated: the 78 of them >= min_size (64 KiB) are counted in `big`
            if counts and big and big.samples[0].value >= len(range(66000, 300000, 3000)):
                break
            assert time.monotonic() < deadline, sorted(fams)
            time.sleep(0.3)
        assert proc.poll() is None, "the target should still be running"
        sample = next(s for s in counts.samples if s.labels.get("comm") == "python3")
        assert counts.type == "counter" and sample.name == "ubpf_counts_total" and int(sample.labels["tgid"]) > 0
        hist = fams["ubpf_sizes"]
        assert hist.type == "histogram"
        buckets = [s for s in hist.samples if s.name == "ubpf_sizes_bucket"]
        les = [s.labels["le"] for s in buckets]
        assert les[-1] == "+Inf" and les[:3] == ["1.0", "3.0", "7.0"]        # 2**(i+1) - 1
        values = [s.value for s in buckets]
        assert values == sorted(values)                                        # cumulative
        count = next(s.value for s in hist.samples if s.name == "ubpf_sizes_count")
        total = next(s.value for s in hist.samples if s.name == "ubpf_sizes_sum")
        assert values[-1] == count >= sample.value
        # _sum: each slot's lower bound (half its le + 1) times its count -- at least half the true sum,
        # and the true sum is at least what the bytearrays alone asked for
        per_slot = [b - a for a, b in zip([0.0, *values[:-2]], values[:-1], strict=True)]
        lower = [0 if i == 0 else 1 << i for i in range(len(per_slot))]
        assert total == sum(c * lb for c, lb in zip(per_slot, lower, strict=True))
        assert total >= sum(range(3000, 300000, 3000)) / 2
        assert fams["ubpf_big"].type == "counter"
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == 0, proc.stderr.read()[-2000:]


def test_json_stdout_parses_while_the_target_prints():
    """The launched target's stdout goes to stderr under --format json without -o: every stdout
    line is JSON, and the target's lines are all on stderr."""
    target = ["python3", "-c", "import sys\nfor i in range(200): print('target line', i, flush=True)"]
    p = run_cli(MALLOCSIZE, "-f", "json", "--", *target, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    events = _json_lines(p.stdout)
    assert {"attached", "exit", "global"} <= {e["event"] for e in events}
    assert sum(line.startswith("target line") for line in p.stderr.splitlines()) == 200
    with_file = run_cli(MALLOCSIZE, "-f", "json", "-o", os.devnull, "--", *target, timeout=120)
    assert with_file.stdout.count("target line") == 200       # -o FILE: the target keeps stdout


def test_histograms_by_type_and_forced():
    """struct hist { slots[] } (array map) and __u64 size_hist[32] (global) are drawn from their
    BTF; --hist MAP:linear forces a linear drawing."""
    p = run_cli(ALLOCS, *ATTACH, "--", "python3", "-c", ROUNDS.format(n=1, pause=0), timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert re.search(r"^@sizes:\n\[\d+K?, \d+K?\)\s+\d+ \|", p.stdout, re.M), p.stdout
    q = run_cli(MALLOCSIZE, "--hist", "size_hist:linear", "--", "python3", "-c", "pass", timeout=120)
    assert q.returncode == 0, q.stderr[-2000:]
    assert re.search(r"^size_hist:\n(\[\d+, \d+\)\s+\d+ \|.*\n)+", q.stdout, re.M), q.stdout
    assert re.search(r"^\[5, 6\)\s+\d+ \|", q.stdout, re.M)
    bad = run_cli(MALLOCSIZE, "--hist", "size_hist:cubic", "--", "true")
    assert bad.returncode == 64 and "bad --hist" in bad.stderr


def test_source_compile_errors_and_missing_clang(tmp_path: Path):
    src = tmp_path / "broken.bpf.c"
    src.write_text("int f(void) { return undeclared_thing; }\n")
    p = run_cli(str(src), "--", "true")
    assert p.returncode == 2, p.stderr
    assert "broken.bpf.c:1:" in p.stderr and "undeclared_thing" in p.stderr      # clang's own words
    assert p.stderr.strip().splitlines()[-1].startswith("ubpf-run: error: ")
    env = dict(os.environ, PYTHONPATH=str(REPO), PATH=str(tmp_path))          # no clang on PATH
    q = subprocess.run([sys.executable, "-m", "ubpf_py.cli", MALLOCSIZE, "--", "/bin/true"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert q.returncode != 0 and "clang is not installed" in q.stderr and "Traceback" not in q.stderr


def test_source_with_vmlinux_h(tmp_path: Path):
    """A CO-RE source that includes vmlinux.h gets one generated from the running kernel's BTF."""
    if not Path("/sys/kernel/btf/vmlinux").exists() or shutil.which("bpftool") is None:
        pytest.skip("needs /sys/kernel/btf/vmlinux and bpftool")
    src = tmp_path / "core.bpf.c"
    src.write_text('#include "vmlinux.h"\n#include <bpf/bpf_helpers.h>\n#include <bpf/bpf_tracing.h>\n'
                   'char LICENSE[] SEC("license") = "GPL";\n__u64 calls = 0;\n'
                   'SEC("uprobe/libc.so.6:malloc")\nint BPF_KPROBE(on_malloc, size_t n)\n'
                   '{ struct task_struct *t = (void *)0; (void)t; __sync_fetch_and_add(&calls, 1); return 0; }\n')
    p = run_cli(str(src), "--", "python3", "-c", "pass", timeout=180)
    assert p.returncode == 0, p.stderr[-2000:]
    assert int(re.search(r"^calls = (\d+)$", p.stdout, re.M).group(1)) > 100


def test_dump_text_and_json_match_llvm_objdump(tmp_path: Path):
    obj = tmp_path / "mallocsize.bpf.o"
    subprocess.run(["clang", "-O2", "-g", "-target", "bpf", "-D__TARGET_ARCH_x86", "-I/usr/include/x86_64-linux-gnu",
                    "-c", MALLOCSIZE, "-o", str(obj)], check=True)
    p = run_cli("dump", str(obj))
    assert p.returncode == 0, p.stderr
    assert "program malloc_entry: uprobe  section uprobe/libc.so.6:malloc" in p.stdout
    assert "; __sync_fetch_and_add(&calls, 1);  [mallocsize.bpf.c:37]" in p.stdout
    assert re.search(r"^  [\w.]+bss\+256: __u64 calls \(8 bytes, global\) = 0$", p.stdout, re.M), p.stdout
    assert re.search(r"^  \[\d+\] STRUCT 'pt_regs' size=168$", p.stdout, re.M)
    alias = run_cli("--dump", str(obj), "--no-btf")
    assert alias.returncode == 0 and "program malloc_entry" in alias.stdout and "\nbtf:" not in alias.stdout
    j = run_cli("dump", "-j", str(obj))
    desc = json.loads(j.stdout)
    prog = desc["programs"][0]
    assert any(m["name"].endswith(".bss") and m["internal"] and m["value_size"] == 272 for m in desc["maps"])
    assert any(t["kind"] == "FUNC" and t["name"] == "malloc_entry" for t in desc["btf"])
    objdump = shutil.which("llvm-objdump")
    if objdump is None:
        return
    lines = subprocess.run([objdump, "-d", "--no-show-raw-insn", str(obj)], capture_output=True, text=True,
                           check=True).stdout
    theirs = {int(m.group(1)): re.sub(r" <\w+>$", "", m.group(2).strip())
              for m in re.finditer(r"^\s+(\d+):\s+(.*)$", lines, re.M)}
    ours = {row["pc"]: row["text"] for row in prog["insns"] if "map[" not in row["text"]}  # map names: ours
    assert len(ours) > 40 and {pc: theirs.get(pc) for pc in ours} == ours


def test_funclatency_example_counts_like_the_kernel():
    """The funclatency example (the side-by-side with libbpf-tools/bcc/bpftrace): every malloc()
    return of the target lands in one slot, as many as the kernel counts."""
    from ubpf_py.kernel.syscall import kernel_bpf_skip_reason

    src = str(REPO / "ubpf_py" / "examples" / "funclatency.bpf.c")
    argv = [src, "-a", "func_entry=libc.so.6:malloc", "-a", "func_exit=libc.so.6:malloc", "--set", "targ_tgid=$PID",
            "-f", "json", "--", "python3", "-c", ROUNDS.format(n=1, pause=0)]

    def total(p: subprocess.CompletedProcess) -> int:
        assert p.returncode == 0, p.stderr[-2000:]
        lat = next(e for e in _json_lines(p.stdout) if e.get("name") == "latency")
        assert lat["hist"][0]["kind"] == "log2"
        return sum(b["count"] for b in lat["hist"][0]["buckets"])

    ours = total(run_cli(*argv, timeout=120))
    assert ours > 3000
    if kernel_bpf_skip_reason() is None:
        # the kernel backend's pid is first the /bin/sh gate that execs python3: its few mallocs
        # before the exec are counted too (test_api compares exact counts per comm)
        assert ours <= total(run_cli("--backend", "kernel", *argv, timeout=120)) <= ours + 20
