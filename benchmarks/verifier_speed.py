"""Verifier speed: ubpf-py's verifier against the kernel's, program by program.

Run:
  python3 benchmarks/verifier_speed.py                      # the corpus (goal: < 1 s a program)
  python3 benchmarks/verifier_speed.py DIR [DIR ...]        # every *.o in DIRs, e.g. libbpf-tools
                                                            # built by ../shared/realworld/build.sh
  python3 benchmarks/verifier_speed.py --reject-1m          # time to reject 'r0 += 1; goto -1'

For every program it prints the best-of-N wall time of our verifier and, when run
as root with kernel BPF, the kernel verifier's own "verification time" (log level
BPF_LOG_STATS) for the same program loaded as a kprobe program, the instructions
each processed and both verdicts, side by side; then the totals and their ratio
(goal: ours within 5x the kernel's, processed instructions no more than the
kernel's).  Exit status 1 if a corpus program takes a second or more, or the
1M-instruction rejection takes 5 s or more.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ubpf_py.obj.elf import load_object
from ubpf_py.verifier import hidden_functions, verify_program

BUILD = Path(os.environ.get("UBPF_CORPUS_BUILD", Path(__file__).resolve().parents[1] / ".corpus-build"))
GOAL_SECONDS = 1.0
GOAL_1M_SECONDS = 5.0
BPF_LOG_STATS = 4


def _kernel_available() -> bool:
    if os.geteuid() != 0:
        return False
    from ubpf_py.kernel.syscall import kernel_bpf_skip_reason

    return kernel_bpf_skip_reason() is None


def _kernel_stats(coll: object, spec: object, pspec: object) -> tuple[bool, float, int]:
    """(accepted, verification seconds, processed insns) from the kernel's BPF_LOG_STATS log."""
    from ubpf_py.isa.instruction import encode
    from ubpf_py.kernel.loader import _func_info, relocate_for_kernel
    from ubpf_py.kernel.maps import kernel_object_name
    from ubpf_py.kernel.prog import KPROBE
    from ubpf_py.kernel.syscall import BPF_PROG_LOAD, ProgLoadAttr, bpf_rc

    insns = relocate_for_kernel(pspec.instructions, [m.fd for m in coll.map_list], pspec.name)
    code = encode(insns)
    keep = []

    def buf(data: bytes) -> int:
        b = ctypes.create_string_buffer(data, len(data))
        keep.append(b)
        return ctypes.addressof(b)

    fi = _func_info(pspec) if coll.btf_fd >= 0 else None
    log = ctypes.create_string_buffer(1 << 20)
    attr = ProgLoadAttr(prog_type=KPROBE, insn_cnt=len(code) // 8, insns=buf(code), license=buf(b"GPL\0"),
                        log_level=BPF_LOG_STATS, log_size=len(log), log_buf=ctypes.addressof(log),
                        kern_version=spec.kern_version, prog_name=kernel_object_name(pspec.name),
                        prog_flags=(1 << 4) if pspec.sleepable else 0,
                        prog_btf_fd=max(coll.btf_fd, 0), func_info_rec_size=8 if fi else 0,
                        func_info=buf(fi) if fi else 0, func_info_cnt=len(fi) // 8 if fi else 0)
    rc = bpf_rc(BPF_PROG_LOAD, attr)
    if rc >= 0:
        os.close(rc)
    text = log.value.decode(errors="replace")
    t = re.search(r"verification time (\d+) usec", text)
    p = re.search(r"processed (\d+) insns", text)
    return rc >= 0, (int(t.group(1)) / 1e6 if t else float("nan")), (int(p.group(1)) if p else -1)


def _ours(prog: object, obj: object, path: Path, repeat: int) -> tuple[float, object]:
    best, rep = float("inf"), None
    hidden = hidden_functions(str(path))
    for _ in range(repeat):
        t0 = time.perf_counter()
        rep = verify_program(prog, obj.maps, mode="warn", btf=obj.btf, hidden=hidden, time_budget=120)
        best = min(best, time.perf_counter() - t0)
    return best, rep


def compare(paths: list[Path], repeat: int) -> int:
    from ubpf_py.errors import UbpfError

    kernel = _kernel_available()
    rows = []
    for path in paths:
        try:
            obj = load_object(str(path))
        except UbpfError as e:
            print(f"skip {path.name}: {e}")
            continue
        coll = None
        if kernel:
            from ubpf_py.kernel.loader import load_collection
            try:
                coll = load_collection(obj, programs=[])
            except UbpfError as e:
                print(f"{path.name}: kernel maps: {e}")
        try:
            for prog in obj.programs.values():
                if kernel and prog.core_relocs:
                    # both verifiers see the program relocated against the running kernel
                    from ubpf_py.kernel.loader import _apply_core
                    try:
                        prog = dataclasses.replace(prog, instructions=_apply_core(obj, prog))
                    except UbpfError as e:
                        print(f"skip {path.name}:{prog.name}: {e}")
                        continue
                secs, rep = _ours(prog, obj, path, repeat)
                kok, ksecs, kins = _kernel_stats(coll, obj, prog) if coll is not None else (None, float("nan"), -1)
                rows.append((path.name, prog.name, secs, rep.processed, rep.ok, ksecs, kins, kok))
        finally:
            if coll is not None:
                coll.close()
    print(f"{'ours ms':>9} {'kern ms':>9} {'x':>6} {'ours insns':>10} {'kern insns':>10}  verdicts  program")
    for obj, name, secs, ins, ok, ksecs, kins, kok in rows:
        ratio = secs / ksecs if ksecs and ksecs == ksecs else float("nan")
        kv = "-" if kok is None else ("ok" if kok else "rej")
        print(f"{secs * 1000:9.2f} {ksecs * 1000:9.2f} {ratio:6.1f} {ins:10} {kins:10}  "
              f"{'ok' if ok else 'rej':>3}/{kv:<4}  {obj}:{name}")
    both = [r for r in rows if r[5] == r[5] and r[7] is not None]
    if both:
        ours = sum(r[2] for r in both)
        kern = sum(r[5] for r in both)
        more = [r for r in both if r[4] and r[3] > r[6] >= 0]
        disagree = [r for r in both if r[4] != r[7]]
        print(f"\n{len(both)} programs: ours {ours:.3f} s, kernel {kern:.3f} s, ratio {ours / kern:.1f}x; "
              f"processed more than the kernel: {len(more)}; verdicts differ: {len(disagree)}")
        for r in more:
            print(f"  more insns: {r[0]}:{r[1]} ours {r[3]} kernel {r[6]}")
        for r in disagree:
            print(f"  verdict differs: {r[0]}:{r[1]} ours {'ok' if r[4] else 'reject'}")
    elif rows:
        print(f"\n{len(rows)} programs: ours {sum(r[2] for r in rows):.3f} s (no kernel column: needs root)")
    return 0


def reject_1m() -> int:
    from ubpf_py.isa.asm import assemble
    from ubpf_py.obj.spec import ProgramSpec

    prog = ProgramSpec("loop", "uprobe", "uprobe", assemble("mov %r0, 0\nadd %r0, 1\nja -2"))
    t0 = time.perf_counter()
    rep = verify_program(prog, [], mode="warn", time_budget=120)
    secs = time.perf_counter() - t0
    print(f"'r0 += 1; goto -1': {rep.error} in {secs:.2f} s (goal < {GOAL_1M_SECONDS} s)")
    return 0 if secs < GOAL_1M_SECONDS and "too large" in rep.error else 1


def corpus(repeat: int) -> int:
    rows = []
    paths = sorted(BUILD.glob("*.bpf.o")) + sorted((BUILD / "invalid").glob("*.o"))
    for path in paths:
        obj = load_object(str(path))
        for prog in obj.programs.values():
            best, rep = _ours(prog, obj, path, repeat)
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="*", type=Path, help="directories of BPF objects to compare with the kernel")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--reject-1m", action="store_true", help="time the 1M-instruction rejection")
    args = ap.parse_args()
    if args.reject_1m:
        return reject_1m()
    if args.dirs:
        paths = sorted(p for d in args.dirs for p in d.glob("*.o"))
        return compare(paths, args.repeat)
    return corpus(args.repeat)


if __name__ == "__main__":
    sys.exit(main())
