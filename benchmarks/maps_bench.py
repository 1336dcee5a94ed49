"""Map operation cost: ubpf-py helpers (JIT and interpreter) against the kernel, in one run.

Each operation is measured with the same BPF program on every engine: a bounded
loop of N iterations that calls one helper per iteration (hash/array lookup,
update, delete; ringbuf output of 16 bytes).  The kernel runs it with
BPF_PROG_TEST_RUN (socket filter, ``repeat`` runs, it reports the mean run time);
our engines run it from Python and we time ``run()``.  ns/op = run time / N, so the
loop's own instructions are included on both sides.  "delete" is measured as an
update+delete pair minus the update time (a delete needs something to delete); with the
JIT's native fast paths that "update" is an in-place update of an existing key while the
pair's update is an insertion (Python), so the jit "delete" row over-states delete itself.

    python3 benchmarks/maps_bench.py [--n 1000] [--repeat 200] [--no-kernel] [--no-interp] [--no-jit-py]

Columns: "jit" (native helper fast paths, vm/jit/fastpath.py), "jit-py" (the same
JIT code with every helper called through its Python trampoline: fast paths
disabled by wrapping the helpers -- what the JIT cost before the fast paths),
"interp" and "kernel".  Prints a markdown table.  Kernel columns need root and kernel BPF.
"""

from __future__ import annotations

import argparse
import os
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ubpf_py.helpers import build_helper_table
from ubpf_py.isa import opcodes as op
from ubpf_py.isa.instruction import Instruction
from ubpf_py.maps import consts as C
from ubpf_py.maps import create_map
from ubpf_py.obj.spec import MapSpec
from ubpf_py.vm.env import ExecEnv, HitContext
from ubpf_py.vm.memory import HostBuffer, MemoryMap, Region

KEYS = 1024            # distinct keys the loops cycle through (power of two)
RINGBUF_SIZE = 32 << 20

MapRef = Callable[[int], list[Instruction]]   # emits "lddw dst, <map>"


def _s32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v & 0x80000000 else v


def lddw(dst: int, value: int, src: int = 0) -> list[Instruction]:
    return [Instruction(op.LDDW, dst, src, 0, _s32(value), _s32(value >> 32)),
            Instruction(0, 0, 0, 0, _s32(value >> 32))]


def alu(code: int, dst: int, imm: int = 0, src: int | None = None) -> Instruction:
    if src is None:
        return Instruction(op.BPF_ALU64 | code | op.BPF_K, dst, 0, 0, imm)
    return Instruction(op.BPF_ALU64 | code | op.BPF_X, dst, src, 0, 0)


def stx(size: int, dst: int, src: int, off: int) -> Instruction:
    return Instruction(op.BPF_STX | op.BPF_MEM | size, dst, src, off, 0)


def call(helper: int) -> Instruction:
    return Instruction(op.BPF_JMP | op.BPF_CALL, 0, 0, 0, helper)


def loop_program(kind: str, n: int, map_ref: MapRef) -> list[Instruction]:
    """r6 counts 0..n-1; each iteration calls one (or two) helpers on key r6 % KEYS."""
    body: list[Instruction] = [
        alu(op.BPF_MOV, 7, src=6), alu(op.BPF_AND, 7, KEYS - 1),
        stx(op.BPF_W, 10, 7, -4), stx(op.BPF_DW, 10, 6, -16), stx(op.BPF_DW, 10, 6, -24),
    ]

    def key_args(helper: int, with_value: bool) -> list[Instruction]:
        out = [*map_ref(1), alu(op.BPF_MOV, 2, src=10), alu(op.BPF_ADD, 2, -4)]
        if with_value:
            out += [alu(op.BPF_MOV, 3, src=10), alu(op.BPF_ADD, 3, -16), alu(op.BPF_MOV, 4, 0)]
        return [*out, call(helper)]

    if kind == "lookup":
        body += key_args(1, False)
    elif kind == "update":
        body += key_args(2, True)
    elif kind == "update+delete":
        body += key_args(2, True) + key_args(3, False)
    elif kind == "output":
        body += [*map_ref(1), alu(op.BPF_MOV, 2, src=10), alu(op.BPF_ADD, 2, -24), alu(op.BPF_MOV, 3, 16), alu(op.BPF_MOV, 4, 0), call(130)]
    else:
        raise ValueError(kind)
    body.append(alu(op.BPF_ADD, 6, 1))
    # if r6 < n goto start-of-body
    back = -(len(body) + 1)
    body.append(Instruction(op.BPF_JMP | op.BPF_JLT | op.BPF_K, 6, 0, back, n))
    return [alu(op.BPF_MOV, 6, 0), *body, alu(op.BPF_MOV, 0, 0), Instruction(op.BPF_JMP | op.BPF_EXIT)]


CASES = [("hash", "lookup"), ("hash", "update"), ("hash", "update+delete"),
         ("array", "lookup"), ("array", "update"), ("ringbuf", "output")]


def _spec(kind: str) -> MapSpec:
    if kind == "hash":
        return MapSpec("bench_hash", C.HASH, 4, 8, KEYS)
    if kind == "array":
        return MapSpec("bench_array", C.ARRAY, 4, 8, KEYS)
    return MapSpec("bench_rb", C.RINGBUF, 0, 0, RINGBUF_SIZE)


def _prefill(m, kind: str) -> None:
    if kind in ("hash", "array"):
        for i in range(KEYS):
            m.update(struct.pack("<I", i), struct.pack("<Q", i), 0)


def bench_ours(engine: str, mkind: str, op_kind: str, n: int, repeat: int) -> float:
    env = ExecEnv(MemoryMap(), HitContext())
    m = create_map(_spec(mkind))
    env.maps_by_addr[m.handle_addr] = m
    for r in m.regions():
        env.memory.add(r)
    ctx = HostBuffer(168)
    env.memory.add(Region.of(ctx, "ctx"))
    env.helpers = build_helper_table(env)
    if engine == "jit-py":   # plain wrappers lack the standard-helper marker: no fast paths
        env.helpers = {hid: (lambda f: lambda a, b, c, d, e: f(a, b, c, d, e))(fn)
                       for hid, fn in env.helpers.items()}
    if op_kind != "update+delete":
        _prefill(m, mkind)
    insns = loop_program(op_kind, n, lambda dst: lddw(dst, m.handle_addr))
    if engine in ("jit", "jit-py"):
        from ubpf_py.vm.jit import JitProgram
        prog = JitProgram(insns, env)
    else:
        from ubpf_py.vm.interpreter import Interpreter
        prog = Interpreter(insns, env)
    prog.run(ctx.addr)  # warm up (compilation caches, first-touch)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter_ns()
        for _ in range(repeat):
            prog.run(ctx.addr)
        best = min(best, (time.perf_counter_ns() - t0) / repeat / n)
    return best


def bench_kernel(mkind: str, op_kind: str, n: int, repeat: int) -> float:
    from ubpf_py.kernel.maps import KernelMap
    from ubpf_py.kernel.prog import SOCKET_FILTER, prog_load, prog_test_run
    s = _spec(mkind)
    km = KernelMap.create(s.type, s.key_size, s.value_size, s.max_entries, name=s.name)
    try:
        if op_kind != "update+delete":
            _prefill(km, mkind)
        insns = loop_program(op_kind, n, lambda dst: lddw(dst, km.fd, op.BPF_PSEUDO_MAP_FD))
        fd = prog_load(insns, SOCKET_FILTER, prog_name="maps_bench")
        try:
            prog_test_run(fd, bytes(64), repeat=1)
            best = float("inf")
            for _ in range(3):
                res = prog_test_run(fd, bytes(64), repeat=repeat)
                best = min(best, res.duration_ns / n)
            return best
        finally:
            os.close(fd)
    finally:
        km.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000, help="helper calls per program run")
    ap.add_argument("--repeat", type=int, default=100, help="program runs per measurement")
    ap.add_argument("--no-kernel", action="store_true")
    ap.add_argument("--no-interp", action="store_true")
    ap.add_argument("--no-jit-py", action="store_true", help="skip the JIT-with-Python-helpers column")
    args = ap.parse_args(argv)
    n, rep = args.n, args.repeat
    if n * rep * 3 * 24 > RINGBUF_SIZE:
        rep = max(1, RINGBUF_SIZE // (n * 3 * 24 * 2))   # never fill the ring: no consumer runs

    kernel_reason = None
    if not args.no_kernel:
        from ubpf_py.kernel.syscall import kernel_bpf_skip_reason
        kernel_reason = kernel_bpf_skip_reason()
    try:
        import ubpf_py.vm.jit  # noqa: F401
        have_jit = True
    except ImportError:
        have_jit = False

    results: dict[tuple[str, str], dict[str, float]] = {}
    for mkind, kind in CASES:
        row: dict[str, float] = {}
        if have_jit:
            row["jit"] = bench_ours("jit", mkind, kind, n, rep)
            if not args.no_jit_py:
                row["jit-py"] = bench_ours("jit-py", mkind, kind, n, max(1, rep // 10))
        if not args.no_interp:
            row["interp"] = bench_ours("interp", mkind, kind, n, max(1, rep // 10))
        if not args.no_kernel and kernel_reason is None:
            row["kernel"] = bench_kernel(mkind, kind, n, rep)
        results[(mkind, kind)] = row

    # delete = (update+delete) - update
    for mkind in ("hash",):
        pair, upd = results[(mkind, "update+delete")], results[(mkind, "update")]
        results[(mkind, "delete")] = {k: pair[k] - upd[k] for k in pair if k in upd}

    cols = [c for c in ("jit", "jit-py", "interp", "kernel") if any(c in r for r in results.values())]
    print(f"ns per helper call (loop of {n} calls per run; JIT {'yes' if have_jit else 'unavailable'}; "
          f"kernel: {kernel_reason or ('skipped' if args.no_kernel else 'BPF_PROG_TEST_RUN')})\n")
    head = "| map | operation | " + " | ".join(f"{c} ns/op" for c in cols)
    if "jit" in cols and "kernel" in cols:
        head += " | jit / kernel"
    print(head + " |")
    print("|" + "---|" * (head.count("|")))
    order = [("hash", "lookup"), ("hash", "update"), ("hash", "delete"), ("hash", "update+delete"),
             ("array", "lookup"), ("array", "update"), ("ringbuf", "output")]
    for key in order:
        row = results[key]
        cells = [f"{row[c]:.0f}" if c in row else "-" for c in cols]
        line = f"| {key[0]} | {key[1]} | " + " | ".join(cells)
        if "jit" in cols and "kernel" in cols:
            line += f" | {row['jit'] / row['kernel']:.1f}x" if row.get("kernel") else " | -"
        print(line + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
