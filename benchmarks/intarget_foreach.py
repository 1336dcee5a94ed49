"""ns added per probed call by a bpf_for_each_map_elem walk of a 16-element array, in the
target (``ubpf-run --mode intarget``) and in the kernel (``--backend kernel``, root).

Two programs on the same function (``f_push`` of the uprobe_overhead target, pinned to one
CPU, tracer on another): ``count`` (one counter) and ``foreach`` (the same counter after the
walk), so ``foreach - count`` is the walk's cost on each side.  Each cell is the median of 5
baseline/probed pairs (1 with ``--quick``; benchmarks/uprobe_overhead/runs.py), the engines'
rounds interleaved.  A third table gives
the program body alone, run in this process by the same C loop the helper benchmark uses
(no trampoline): what the walk costs the target code.

Usage: ``python3 -m benchmarks.intarget_foreach [--quick]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))

from benchmarks.uprobe_overhead import runs  # noqa: E402

SRC = HERE / "intarget_foreach.bpf.c"


def _build(tmp: Path) -> tuple[Path, Path]:
    target, _ = runs.build(tmp)
    obj = tmp / "foreach.bpf.o"
    clang = shutil.which("clang") or shutil.which("clang-14") or "clang"
    subprocess.run([clang, "-O2", "-g", "-target", "bpf", "-D__TARGET_ARCH_x86", "-I/usr/include/x86_64-linux-gnu",
                    "-c", str(SRC), "-o", str(obj)], check=True)
    return target, obj


def probed(n: int, repeat: int) -> list[tuple[str, str, float | str]]:
    """(program, engine, median ns added per call, or the error) for count and foreach; the
    engines' rounds are interleaved so a change in the machine's load hits both alike."""
    from ubpf_py.kernel.syscall import kernel_bpf_skip_reason
    from ubpf_py.obj.elf import load_object

    tmp = Path(tempfile.mkdtemp(prefix="ubpf-foreach-bench-"))
    target, obj = _build(tmp)
    cpus = sorted(os.sched_getaffinity(0))
    tcpu, rcpu = cpus[0], cpus[-1]
    engines = ["intarget"] + ([] if kernel_bpf_skip_reason() else ["kernel"])
    spec = load_object(str(obj))
    out: list[tuple[str, str, float | str]] = []
    for prog in ("count", "foreach"):
        job = runs.Job(runs.Row("f_push", prog, "uprobe"), n, target_cpu=tcpu, tracer_cpu=rcpu)
        samples: dict[str, list[float]] = {e: [] for e in engines}
        errors: dict[str, str] = {}
        for _ in range(repeat):
            for engine in engines:
                if engine in errors:
                    continue
                cell = (runs.kernel_run(spec, target, job, tmp) if engine == "kernel"
                        else runs.ubpf_run(engine, obj, target, job, tmp))
                if cell.ok:
                    samples[engine].append(cell.overhead_ns)
                else:
                    errors[engine] = f"failed: {cell.error}"
        for engine in engines:
            out.append((prog, engine, errors.get(engine) or statistics.median(samples[engine])))
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def body(n: int) -> list[tuple[str, float]]:
    """ns per run of each program's target code alone, in this process."""
    from intarget_fixture import driver, make_frame

    from ubpf_py.intarget import runtime_obj
    from ubpf_py.intarget.arena import SharedArena
    from ubpf_py.intarget.selfload import load_here
    from ubpf_py.live.collection import Collection
    from ubpf_py.obj.elf import load_object
    from ubpf_py.vm.jit.target import compile_for_target

    class _Factory:
        def mktemp(self, name: str) -> Path:
            return Path(tempfile.mkdtemp(prefix=name))

    lib = driver(_Factory())
    tmp = Path(tempfile.mkdtemp(prefix="ubpf-foreach-body-"))
    _target, obj = _build(tmp)
    arena = SharedArena(16 << 20)
    coll = Collection.load(load_object(str(obj)), arena=arena)
    f = make_frame(arena)
    out = []
    for prog in ("count", "foreach"):
        code = compile_for_target(coll.program(f"{prog}_entry").instructions, prog, coll.env.maps_by_addr)
        img = load_here([("runtime", runtime_obj.object_bytes()), ("prog", code.obj)])
        entry = img.addr(code.entry)
        lib.bench(entry, f.regs_addr, f.addr, 0, 0, 0, f.addr, n // 10)
        best = min(lib.bench(entry, f.regs_addr, f.addr, 0, 0, 0, f.addr, n) for _ in range(5))
        out.append((prog, best))
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer calls and repetitions")
    a = ap.parse_args()
    rows = probed(20_000 if a.quick else 200_000, 1 if a.quick else 5)
    print("| program | engine | ns added per call |\n| --- | --- | ---: |")
    for prog, engine, ns in rows:
        print(f"| {prog} | {engine} | {ns if isinstance(ns, str) else f'{ns:.1f}'} |")
    got = {(p, e): ns for p, e, ns in rows if not isinstance(ns, str)}
    for engine in ("intarget", "kernel"):
        if (("foreach", engine) in got) and (("count", engine) in got):
            print(f"\nfor_each over 16 elements, {engine}: "
                  f"{got['foreach', engine] - got['count', engine]:.1f} ns per hit")
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    print("\n| program body in the target code (no trampoline) | ns per run |\n| --- | ---: |")
    for prog, ns in body(20_000 if a.quick else 1_000_000):
        print(f"| {prog} | {ns:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
