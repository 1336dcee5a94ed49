"""Interpreter throughput in BPF instructions per second (goal: >= 3 million/s).

Run: python3 benchmarks/interp_speed.py
Three kernels: a tight ALU loop, a branchy loop (signed/unsigned compares) and a
stack memory loop (store + load per iteration).  Instruction counts are exact:
each kernel's loop body length times its iteration count, plus the prologue.
"""

from __future__ import annotations

import time

from ubpf_py.isa.asm import assemble
from ubpf_py.vm.env import ExecEnv, HitContext
from ubpf_py.vm.interpreter import Interpreter
from ubpf_py.vm.memory import MemoryMap

N = 200_000

KERNELS = {
    # 2 + 5 per iteration + 1
    "alu loop": (f"""
        mov %r0, 0
        mov %r1, 0
    loop:
        add %r0, %r1
        xor %r0, 0x55
        lsh %r0, 1
        add %r1, 1
        jlt %r1, {N}, loop
        exit
    """, lambda n: 2 + 5 * n + 1),
    # 2 + 7 per iteration (one of two 2-insn arms) + 1
    "branchy loop": (f"""
        mov %r0, 0
        mov %r1, 0
    loop:
        mov %r2, %r1
        and %r2, 3
        jsgt %r2, 1, big
        add %r0, 1
        ja next
    big:
        sub %r0, 1
    next:
        add %r1, 1
        jlt %r1, {N}, loop
        exit
    """, None),
    # 2 + 5 per iteration + 1
    "stack memory loop": (f"""
        mov %r0, 0
        mov %r1, 0
    loop:
        stxdw [%r10-8], %r1
        ldxdw %r2, [%r10-8]
        add %r0, %r2
        add %r1, 1
        jlt %r1, {N}, loop
        exit
    """, lambda n: 2 + 5 * n + 1),
}


def branchy_count(n: int) -> int:
    taken = sum(1 for i in range(n) if (i & 3) > 1)   # "big" arm: 5 + 1 + 2
    return 2 + taken * 6 + (n - taken) * 7 + 1


def main() -> None:
    print(f"{'kernel':<20} {'insns':>10} {'seconds':>9} {'M insn/s':>9}")
    for name, (text, count_fn) in KERNELS.items():
        env = ExecEnv(memory=MemoryMap(), hit=HitContext())
        prog = Interpreter(assemble(text), env)
        count = count_fn(N) if count_fn else branchy_count(N)
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            prog.run(0)
            best = min(best, time.perf_counter() - t0)
        print(f"{name:<20} {count:>10} {best:>9.3f} {count / best / 1e6:>9.2f}")
    # call overhead from Python for a trivial program
    env = ExecEnv(memory=MemoryMap(), hit=HitContext())
    prog = Interpreter(assemble("mov %r0, 1\nexit"), env)
    reps = 100_000
    t0 = time.perf_counter()
    for _ in range(reps):
        prog.run(0)
    print(f"run() overhead for a 2-instruction program: {(time.perf_counter() - t0) / reps * 1e6:.2f} us")


if __name__ == "__main__":
    main()
