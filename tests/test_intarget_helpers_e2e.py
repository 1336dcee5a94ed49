"""Helpers that used to send a probe to the ptrace path, now run in the target, end to end:
the same object and target under ``--mode auto`` (which must report the in-target path for
every probe), ``--mode ptrace`` and (root) ``--backend kernel`` give the same maps at exit.

* bpf_for_each_map_elem on ARRAY, PERCPU_ARRAY, HASH, PERCPU_HASH, LRU_HASH, LRU_PERCPU_HASH
  (tests/targets/foreach: sums through callbacks, stops, deletes from a callback, bad flags).
* map-in-map: ARRAY_OF_MAPS / HASH_OF_MAPS lookups giving inner maps (or NULL) used by the
  following map helpers and by for_each (tests/targets/mapinmap).  The outer maps' dumps hold
  map ids, which differ between ubpf-py and the kernel: those two are compared without them.
* bpf_snprintf of the target's strings, numbers and a stack address, into a large and a small
  buffer (tests/targets/snprintf).
* LPM trie lookups, inserts (full trie: -ENOSPC, prefixlen 33: -EINVAL) and deletes from a
  program (tests/targets/lpm).
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from bpf_build import compile_bpf
from cli_util import REPO
from intarget_fixture import needs_runtime

from ubpf_py.kernel.syscall import kernel_bpf_skip_reason

SRC = Path(__file__).resolve().parent / "targets"
pytestmark = [needs_runtime,
              pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is needed to build the targets")]
RUNS = ("auto", "ptrace", "kernel")


def ubpf_run(obj: Path, attach: dict[str, str], argv: list[str], run: str) -> dict:
    """``ubpf-run OBJ -a prog=BIN:FUNC ... -f json -- argv`` -> {"paths": {prog: (path, reason)},
    "maps": {name: sorted decoded entries}}; ``run`` is a --mode or "kernel"."""
    how = ["--backend", "kernel"] if run == "kernel" else ["--mode", run]
    args = ["--no-auto"]
    for prog, site in attach.items():
        args += ["-a", f"{prog}={site}"]
    p = subprocess.run([sys.executable, "-m", "ubpf_py.cli", str(obj), *args, *how, "-f", "json", "--", *argv],
                       capture_output=True, text=True, timeout=180, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert p.returncode == 0, f"{run}: rc={p.returncode} {p.stderr[-2000:]}"
    events = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    return {"paths": {e["program"]: (e["path"], e["path_reason"]) for e in events if e["event"] == "attached"},
            "maps": {e["name"]: sorted(json.dumps(x) for x in e["decoded"]) for e in events if e["event"] == "map"}}


def three_ways(obj: Path, attach: dict[str, str], argv: list[str]) -> dict[str, dict]:
    """The same run in the target (auto), on the ptrace path and (root) in the kernel, side by side."""
    runs = [r for r in RUNS if r != "kernel" or not kernel_bpf_skip_reason()]
    with cf.ThreadPoolExecutor(len(runs)) as pool:
        futs = {r: pool.submit(ubpf_run, obj, attach, argv, r) for r in runs}
        return {r: f.result() for r, f in futs.items()}


def check(results: dict[str, dict], programs: list[str], ids: tuple[str, ...] = ()) -> None:
    """Paths as expected, the same maps everywhere (``ids``: maps holding ids, not compared with
    the kernel)."""
    assert results["auto"]["paths"] == {p: ("in-target", "") for p in programs}, results["auto"]["paths"]
    assert results["ptrace"]["paths"] == {p: ("ptrace", "--mode ptrace") for p in programs}
    assert results["auto"]["maps"] == results["ptrace"]["maps"]
    if "kernel" not in results:
        pytest.skip(f"kernel comparison: {kernel_bpf_skip_reason()}")
    ours, kernel = ({k: v for k, v in results[r]["maps"].items() if k not in ids} for r in ("auto", "kernel"))
    assert ours == kernel


def _build(tmp_path_factory, sub: str, target_c: str, prog_c: str) -> tuple[Path, Path]:
    """(object, target executable) built from tests/targets/SUB/PROG_C and TARGET_C."""
    d = tmp_path_factory.mktemp(f"{sub}-e2e")
    exe = d / Path(target_c).stem
    subprocess.run(["gcc", "-O2", "-o", str(exe), str(SRC / sub / target_c)], check=True)
    return compile_bpf((SRC / sub / prog_c).read_text(), d, prog_c.removesuffix(".bpf.c")), exe


@pytest.fixture(scope="module")
def foreach(tmp_path_factory) -> tuple[Path, Path]:
    return _build(tmp_path_factory, "foreach", "walker.c", "foreach.bpf.c")


def test_for_each_map_elem_in_target_ptrace_and_kernel(foreach) -> None:
    obj, exe = foreach
    cpu = min(os.sched_getaffinity(0))
    progs = ["fill", "walk", "prune"]
    results = three_ways(obj, {p: f"{exe}:{p}" for p in progs}, [str(exe), str(cpu)])
    out = json.loads(results["auto"]["maps"]["out"][0])[1]
    assert all(n > 0 for n in out["visited"]) and out["pruned"] > 0 and out["bad_flags"] > 0
    check(results, progs)


@pytest.fixture(scope="module")
def mapinmap(tmp_path_factory) -> tuple[Path, Path]:
    return _build(tmp_path_factory, "mapinmap", "mim.c", "mim.bpf.c")


def test_map_in_map_in_target_ptrace_and_kernel(mapinmap) -> None:
    obj, exe = mapinmap
    results = three_ways(obj, {"bump": f"{exe}:bump"}, [str(exe)])
    stats = json.loads(results["auto"]["maps"]["stats"][0])[1]
    assert min(stats["array_hits"], stats["array_misses"], stats["hash_hits"], stats["hash_misses"]) > 0
    assert stats["inserts"] > 0 and stats["walked"] == 4 * stats["array_hits"]
    check(results, ["bump"], ids=("outer_a", "outer_h"))


@pytest.fixture(scope="module")
def lpm(tmp_path_factory) -> tuple[Path, Path]:
    return _build(tmp_path_factory, "lpm", "router.c", "lpm.bpf.c")


def test_lpm_trie_in_target_ptrace_and_kernel(lpm) -> None:
    obj, exe = lpm
    results = three_ways(obj, {"route": f"{exe}:route"}, [str(exe)])
    maps = results["auto"]["maps"]
    assert len(maps["routes"]) > 5 and len(maps["matches"]) > 5
    assert json.loads(maps["results"][0])[1] < 0          # some inserts were refused
    check(results, ["route"])


@pytest.fixture(scope="module")
def snprintf(tmp_path_factory) -> tuple[Path, Path]:
    return _build(tmp_path_factory, "snprintf", "say.c", "fmt.bpf.c")


def test_snprintf_in_target_ptrace_and_kernel(snprintf) -> None:
    obj, exe = snprintf
    results = three_ways(obj, {"say": f"{exe}:say"}, [str(exe)])
    lines = [json.loads(x)[1] for x in results["auto"]["maps"]["lines"]]
    assert len(lines) == 40 and any(line["ret"] > 96 for line in lines)     # some were cut short
    assert all(line["ret_small"] >= 9 and len(line["small"]) == 7 for line in lines)
    check(results, ["say"])
