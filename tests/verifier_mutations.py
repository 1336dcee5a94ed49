"""Mutants of the corpus programs for the verifier's differential campaign.

Each mutation makes one small change a buggy compiler or a careless author
could make: a different memory offset or access size, a dropped NULL check, a
widened bound, a swapped register, a deleted instruction, a changed constant.
Every mutant is verified by ubpf-py and loaded by the kernel (BPF_PROG_TYPE_KPROBE);
``run_campaign`` counts where the two agree.

Run the full campaign (root, kernel BPF):  python3 tests/verifier_mutations.py [N] [SEED]
"""

from __future__ import annotations

import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernel_verdict import kernel_error_line

from ubpf_py.isa import opcodes as op
from ubpf_py.isa.instruction import Instruction
from ubpf_py.obj.spec import ObjectSpec, ProgramSpec

MUTATORS = ("offset", "drop_null_check", "widen_bound", "swap_reg", "delete", "size", "const",
            "flip_cond", "jump_target", "helper")
_FLIP = {op.BPF_JEQ: op.BPF_JNE, op.BPF_JNE: op.BPF_JEQ, op.BPF_JGT: op.BPF_JGE, op.BPF_JGE: op.BPF_JGT,
         op.BPF_JLT: op.BPF_JLE, op.BPF_JLE: op.BPF_JLT, op.BPF_JSGT: op.BPF_JSLT, op.BPF_JSLT: op.BPF_JSGT,
         op.BPF_JSGE: op.BPF_JSLE, op.BPF_JSLE: op.BPF_JSGE, op.BPF_JSET: op.BPF_JEQ}
_HELPERS = (1, 2, 3, 5, 6, 7, 14, 16, 25, 27, 112, 114, 130, 131, 132, 133, 181)


@dataclass
class Mutant:
    obj: str
    program: str
    kind: str
    where: int
    detail: str
    spec: ProgramSpec


@dataclass
class Outcome:
    mutant: Mutant
    ours: bool
    kernel: bool
    our_error: str = ""
    kernel_error: str = ""


@dataclass
class CampaignResult:
    outcomes: list[Outcome] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def agree(self) -> int:
        return sum(o.ours == o.kernel for o in self.outcomes)

    @property
    def rate(self) -> float:
        return self.agree / len(self.outcomes) if self.outcomes else 1.0

    def by_class(self) -> Counter:
        c: Counter = Counter()
        for o in self.outcomes:
            c[(o.mutant.kind, "agree" if o.ours == o.kernel else
               ("we_accept_kernel_rejects" if o.ours else "we_reject_kernel_accepts"))] += 1
        return c


def _is_jump(ins: Instruction) -> bool:
    c = ins.opcode & 0x07
    o = ins.opcode & 0xF0
    return c in (op.BPF_JMP, op.BPF_JMP32) and o not in (op.BPF_CALL, op.BPF_EXIT)


def _second_slots(insns: list[Instruction]) -> set[int]:
    return {i + 1 for i, ins in enumerate(insns) if ins.opcode == op.LDDW}


def delete_insn(spec: ProgramSpec, idx: int) -> ProgramSpec:
    """Remove one slot, fixing every jump/call/func-pointer offset that crosses it."""
    insns = spec.instructions
    out: list[Instruction] = []
    for i, ins in enumerate(insns):
        if i == idx:
            continue
        if _is_jump(ins) or (ins.opcode == op.BPF_JMP | op.BPF_CALL and ins.src == op.BPF_PSEUDO_CALL) or \
                (ins.opcode == op.LDDW and ins.src == op.BPF_PSEUDO_FUNC):
            is32ja = ins.opcode == op.BPF_JMP32 | op.BPF_JA
            uses_imm = is32ja or ins.opcode in (op.BPF_JMP | op.BPF_CALL, op.LDDW)
            rel = ins.imm if uses_imm else ins.off
            tgt = i + rel + 1
            ni = i - (1 if i > idx else 0)
            nt = tgt - (1 if tgt > idx else 0)
            nrel = nt - ni - 1
            ins = ins.replace(imm=nrel) if uses_imm else ins.replace(off=nrel)
        out.append(ins)

    def shift(k: int) -> int:
        return k - 1 if k > idx else k

    return replace(spec, instructions=out,
                   functions={shift(k): v for k, v in spec.functions.items()},
                   func_info={shift(k): v for k, v in spec.func_info.items()},
                   line_info=[replace(li, insn_index=shift(li.insn_index)) for li in spec.line_info])


def mutate(spec: ProgramSpec, kind: str, rng: random.Random) -> tuple[ProgramSpec, int, str] | None:
    insns = spec.instructions
    second = _second_slots(insns)
    idxs = [i for i in range(len(insns)) if i not in second]
    rng.shuffle(idxs)
    for i in idxs:
        ins = insns[i]
        code = ins.opcode
        cls = code & 0x07
        new: Instruction | None = None
        if kind == "offset" and cls in (op.BPF_LDX, op.BPF_ST, op.BPF_STX):
            d = rng.choice((-16, -8, -4, -1, 1, 4, 8, 16, 64, 200, -600))
            new = ins.replace(off=max(-32768, min(32767, ins.off + d)))
        elif kind == "offset" and cls == op.BPF_ALU64 and code & 0xF0 == op.BPF_ADD and not code & op.BPF_X:
            new = ins.replace(imm=ins.imm + rng.choice((-8, 8, 16, -600, 600)))
        elif kind == "drop_null_check" and cls == op.BPF_JMP and not code & op.BPF_X and ins.imm == 0 \
                and code & 0xF0 in (op.BPF_JEQ, op.BPF_JNE):
            if code & 0xF0 == op.BPF_JEQ:
                new = Instruction(op.BPF_JMP | op.BPF_JA, off=0)
            else:
                new = Instruction(op.BPF_JMP | op.BPF_JA, off=ins.off)
        elif kind == "widen_bound" and cls in (op.BPF_JMP, op.BPF_JMP32) and not code & op.BPF_X \
                and code & 0xF0 in (op.BPF_JGT, op.BPF_JGE, op.BPF_JLT, op.BPF_JLE, op.BPF_JSGT,
                                    op.BPF_JSGE, op.BPF_JSLT, op.BPF_JSLE):
            new = ins.replace(imm=ins.imm * 2 + rng.choice((1, 8, 100)))
        elif kind == "widen_bound" and cls in (op.BPF_ALU, op.BPF_ALU64) and code & 0xF0 == op.BPF_AND \
                and not code & op.BPF_X:
            new = ins.replace(imm=(ins.imm << 1) | 1)
        elif kind == "swap_reg" and code not in (op.LDDW, op.BPF_JMP | op.BPF_EXIT, op.BPF_JMP | op.BPF_CALL):
            r = rng.randrange(0, 10)
            if code & op.BPF_X or cls in (op.BPF_LDX, op.BPF_STX):
                new = ins.replace(src=r if rng.random() < 0.5 else ins.src,
                                  dst=r if rng.random() >= 0.5 else ins.dst)
            else:
                new = ins.replace(dst=r)
            if new == ins:
                new = None
        elif kind == "size" and cls in (op.BPF_LDX, op.BPF_ST, op.BPF_STX) and code & 0xE0 == op.BPF_MEM:
            sz = rng.choice([s for s in (op.BPF_B, op.BPF_H, op.BPF_W, op.BPF_DW) if s != code & 0x18])
            new = ins.replace(opcode=(code & ~0x18) | sz)
        elif kind == "const" and cls in (op.BPF_ALU, op.BPF_ALU64) and code & 0xF0 == op.BPF_MOV \
                and not code & op.BPF_X:
            new = ins.replace(imm=rng.choice((0, 1, -1, 8, 64, 4096, 1 << 20, ins.imm + 1, -ins.imm)))
            if new == ins:
                new = None
        elif kind == "flip_cond" and _is_jump(ins) and code & 0xF0 in _FLIP:
            new = ins.replace(opcode=(code & ~0xF0) | _FLIP[code & 0xF0])
        elif kind == "jump_target" and _is_jump(ins) and code != op.BPF_JMP32 | op.BPF_JA:
            new = ins.replace(off=ins.off + rng.choice((-3, -2, -1, 1, 2, 3)))
        elif kind == "helper" and code == op.BPF_JMP | op.BPF_CALL and ins.src == 0:
            new = ins.replace(imm=rng.choice([h for h in _HELPERS if h != ins.imm]))
        elif kind == "delete" and i + 1 < len(insns) and code != op.LDDW:
            return delete_insn(spec, i), i, "deleted"
        if new is not None:
            out = list(insns)
            out[i] = new
            return replace(spec, instructions=out), i, f"{ins} -> {new}"
    return None


def generate(objects: dict[str, ObjectSpec], count: int, seed: int) -> list[Mutant]:
    rng = random.Random(seed)
    progs = [(name, p) for name, o in sorted(objects.items()) for p in o.programs.values()]
    out: list[Mutant] = []
    tries = 0
    while len(out) < count and tries < count * 20:
        tries += 1
        oname, p = rng.choice(progs)
        kind = rng.choice(MUTATORS)
        m = mutate(p, kind, rng)
        if m is None:
            continue
        spec, where, detail = m
        out.append(Mutant(oname, p.name, kind, where, detail, spec))
    return out


def load_corpus(build: Path) -> dict[str, ObjectSpec]:
    from ubpf_py.obj.elf import load_object

    return {p.name: load_object(str(p)) for p in sorted(build.glob("*.bpf.o"))}


def run_campaign(build: Path, count: int, seed: int, verbose: bool = False,
                 time_budget: float = 5.0) -> CampaignResult:
    """Verify every mutant with ubpf-py and with the kernel (needs root)."""
    from ubpf_py.errors import KernelBackendError
    from ubpf_py.kernel.loader import _func_info, load_collection, relocate_for_kernel
    from ubpf_py.kernel.prog import KPROBE, prog_load
    from ubpf_py.verifier import hidden_functions, verify_program

    objects = load_corpus(build)
    mutants = generate(objects, count, seed)
    colls = {}
    res = CampaignResult()
    t0 = time.perf_counter()
    import os
    try:
        for m in mutants:
            obj = objects[m.obj]
            if m.obj not in colls:
                colls[m.obj] = load_collection(obj)
            coll = colls[m.obj]
            rep = verify_program(m.spec, obj.maps, mode="warn", btf=obj.btf, time_budget=time_budget,
                                 hidden=hidden_functions(obj.path))
            kerr = ""
            try:
                insns = relocate_for_kernel(m.spec.instructions, [k.fd for k in coll.map_list])
                fi = _func_info(m.spec) if coll.btf_fd >= 0 else None
                kw = {"btf_fd": coll.btf_fd, "func_info": fi} if fi else {}
                fd = prog_load(insns, KPROBE, "GPL", prog_name=m.program, **kw)
                os.close(fd)
                kok = True
            except KernelBackendError as e:
                kok = False
                kerr = kernel_error_line(e.log) or str(e)
            o = Outcome(m, rep.ok, kok, rep.error, kerr)
            res.outcomes.append(o)
            if verbose and o.ours != o.kernel:
                print(f"DISAGREE {m.obj}:{m.program} {m.kind}@{m.where} {m.detail}\n"
                      f"   ours={'accept' if o.ours else 'reject: ' + o.our_error}\n"
                      f"   kernel={'accept' if o.kernel else 'reject: ' + o.kernel_error}")
    finally:
        for c in colls.values():
            c.close()
    res.seconds = time.perf_counter() - t0
    return res


@dataclass
class SoundnessResult:
    runs: int = 0
    programs: int = 0
    faults: list[tuple[Mutant, str]] = field(default_factory=list)
    #: runs that stopped for reasons that are not memory faults (helper errors, missing features)
    other: Counter = field(default_factory=Counter)


def run_soundness(objects: dict[str, ObjectSpec], mutants: list[Mutant], runs_per_program: int = 4,
                  seed: int = 0) -> SoundnessResult:
    """Run every mutant ubpf-py accepts under the checked interpreter with random pt_regs.

    A verified program must never trip the interpreter's memory checks (VMFault
    from a load/store): that would mean the verifier accepted an unsafe access.
    """
    import copy
    import signal

    from ubpf_py.errors import UbpfError, VMFault
    from ubpf_py.live.collection import Collection
    from ubpf_py.verifier import hidden_functions, verify_program

    rng = random.Random(seed)
    out = SoundnessResult()

    def alarm(_sig: int, _frm: object) -> None:
        raise TimeoutError("program ran too long")

    old = signal.signal(signal.SIGALRM, alarm)
    try:
        for m in mutants:
            base = objects[m.obj]
            if not verify_program(m.spec, base.maps, mode="warn", btf=base.btf, time_budget=5,
                                  hidden=hidden_functions(base.path)).ok:
                continue
            spec = copy.copy(base)
            spec.maps = [copy.copy(x) for x in base.maps]
            spec.programs = dict(base.programs)
            spec.programs[m.program] = m.spec
            try:
                coll = Collection.load(spec, engine="interp", verifier="off", programs=[m.program])
            except UbpfError as e:
                out.other[f"load: {type(e).__name__}"] += 1
                continue
            out.programs += 1
            prog = coll.program(m.program)
            ctx = coll.ctx_buffer
            for _ in range(runs_per_program):
                regs = [rng.choice((0, 1, 7, 64, 1 << 31, (1 << 64) - 1, rng.getrandbits(64)))
                        for _ in range(21)]
                ctx.view[:168] = b"".join(r.to_bytes(8, "little") for r in regs)
                out.runs += 1
                signal.alarm(5)
                try:
                    prog.run(ctx.addr)
                except VMFault as e:
                    out.faults.append((m, str(e)))
                    break
                except (UbpfError, TimeoutError) as e:
                    out.other[type(e).__name__] += 1
                finally:
                    signal.alarm(0)
    finally:
        signal.signal(signal.SIGALRM, old)
    return out


def main(argv: list[str]) -> int:
    count = int(argv[1]) if len(argv) > 1 else 1000
    seed = int(argv[2]) if len(argv) > 2 else 1
    build = Path(__file__).resolve().parents[1] / ".corpus-build"
    res = run_campaign(build, count, seed, verbose=True)
    n = len(res.outcomes)
    print(f"\n{n} mutants, agreement {res.agree}/{n} = {res.rate:.1%} in {res.seconds:.1f}s")
    for (kind, verdict), k in sorted(res.by_class().items()):
        print(f"  {kind:16} {verdict:26} {k}")
    unsafe = [o for o in res.outcomes if o.ours and not o.kernel]
    print(f"we accept / kernel rejects: {len(unsafe)}")
    both = [o for o in res.outcomes if not o.ours and not o.kernel]
    same = [o for o in both if o.kernel_error and o.kernel_error in o.our_error]
    print(f"both reject: {len(both)}; our message contains the kernel's error line: {len(same)} "
          f"({len(same) / max(1, len(both)):.1%})")
    # the kinds of message mismatches, most common first
    diff = Counter((o.our_error.split(",")[0][:60], o.kernel_error.split(",")[0][:60])
                   for o in both if o not in same)
    for (a, b), k in diff.most_common(25):
        print(f"  {k:4}  ours: {a!r}  kernel: {b!r}")
    objects = load_corpus(build)
    t0 = time.perf_counter()
    snd = run_soundness(objects, [o.mutant for o in res.outcomes if o.ours])
    print(f"soundness: {snd.programs} accepted mutants run {snd.runs} times under the interpreter in "
          f"{time.perf_counter() - t0:.1f}s: {len(snd.faults)} memory faults; other stops {dict(snd.other)}")
    for m, why in snd.faults:
        print(f"  FAULT {m.obj}:{m.program} {m.kind}@{m.where} {m.detail}: {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))


# -- join-dependent programs ------------------------------------------------------------------
#
# Safety depends on one path's constant surviving a join: two paths give r6 different
# constants, they meet at a prune point, r6 travels (register copy, 32/64-bit spill and
# fill, a bounded loop) and ends up as a stack offset.  A verifier that loses precision
# when it prunes accepts the unsafe path because the safe one was seen first.

JOIN_OFFSETS = (-8, -16, -64, -512, -520, -608, -4, 0, 8)
JOIN_TRANSPORTS = ("none", "mov", "spill64", "spill32_fill32", "loop", "fill_via_pointer", "spill_via_pointer")
JOIN_USES = ("write", "read", "helper")


def join_program(a: int, b: int, transport: str, use: str, pad: int = 6) -> str:
    """Assembly of one join-dependent program (bpf_conformance syntax)."""
    lines = ["call 7", "mov %r7, %r0", "mov %r9, 0", "jset %r7, 1, alt", f"mov %r6, {a}"]
    # enough instructions since the last checkpoint (calls and exits count as jumps, as in the
    # kernel) that the path walked first leaves one at the join
    lines += ["add %r9, 1"] * pad
    lines += ["ja join", "alt:", f"mov %r6, {b}", "join:"]
    if transport == "mov":
        lines += ["mov %r8, %r6", "mov %r6, 0", "mov %r6, %r8"]
    elif transport == "spill64":
        lines += ["stxdw [%r10-24], %r6", "mov %r6, 0", "ldxdw %r6, [%r10-24]"]
    elif transport == "spill32_fill32":
        # a negative offset does not fit 32 bits: kept as a value, the fill zero-extends it
        lines += ["stxw [%r10-24], %r6", "mov %r6, 0", "ldxw %r6, [%r10-24]", "lsh %r6, 32", "arsh %r6, 32"]
    elif transport == "fill_via_pointer":
        # spilled with r10, filled through another stack pointer (a load the walk sees reach the stack)
        lines += ["stxdw [%r10-24], %r6", "mov %r6, 0", "mov %r2, %r10", "add %r2, -24", "ldxdw %r6, [%r2+0]"]
    elif transport == "spill_via_pointer":
        lines += ["mov %r2, %r10", "add %r2, -24", "stxdw [%r2+0], %r6", "mov %r6, 0", "ldxdw %r6, [%r10-24]"]
    elif transport == "loop":
        lines += ["mov %r8, 0", "loop:", "add %r8, 1", "jlt %r8, 3, loop"]
    lines += ["mov %r1, %r10", "add %r1, %r6"]
    if use == "write":
        lines += ["stdw [%r1+0], 0"]
    elif use == "read":
        lines += ["ldxdw %r2, [%r1+0]"]
    else:  # bpf_probe_read_kernel(r1, 8, NULL): the helper writes 8 bytes at the offset
        lines += ["mov %r2, 8", "mov %r3, 0", "call 113"]
    lines += ["mov %r0, 0", "exit"]
    return "\n".join(lines)


def join_programs(count: int, seed: int) -> list[tuple[str, str]]:
    """(description, assembly) of ``count`` join-dependent programs."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        a, b = rng.choice(JOIN_OFFSETS), rng.choice(JOIN_OFFSETS)
        t, u = rng.choice(JOIN_TRANSPORTS), rng.choice(JOIN_USES)
        out.append((f"a={a} b={b} {t} {u}", join_program(a, b, t, u, pad=rng.choice((0, 3, 6, 10)))))
    return out


def run_join_campaign(count: int, seed: int) -> CampaignResult:
    """Verify generated join-dependent programs with ubpf-py and the kernel (needs root)."""
    import os

    from ubpf_py.errors import KernelBackendError
    from ubpf_py.isa.asm import assemble
    from ubpf_py.kernel.prog import KPROBE, prog_load
    from ubpf_py.verifier import verify_program
    res = CampaignResult()
    t0 = time.perf_counter()
    for desc, text in join_programs(count, seed):
        spec = ProgramSpec("join", "uprobe", "uprobe", assemble(text))
        rep = verify_program(spec, [], mode="warn", time_budget=5)
        kerr = ""
        try:
            os.close(prog_load(spec.instructions, KPROBE, "GPL", prog_name="join"))
            kok = True
        except KernelBackendError as e:
            kok, kerr = False, kernel_error_line(e.log) or str(e)
        res.outcomes.append(Outcome(Mutant("join", "join", "join", 0, desc, spec), rep.ok, kok, rep.error, kerr))
    res.seconds = time.perf_counter() - t0
    return res
