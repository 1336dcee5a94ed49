"""Mutation testing: break the code on purpose and check that the tests notice.

Run (slow; not in CI: the default 80 mutants take about an hour on a shared 2-core machine,
``--per-group 6`` about 25 minutes; the restore group costs most, its tests start processes):
  python3 benchmarks/mutation_score.py                      # 16 mutants per module group, seed 1
  python3 benchmarks/mutation_score.py --per-group 20 --seed 7 --groups verifier maps
  python3 benchmarks/mutation_score.py --only ubpf_py/maps/hash.py#41   # rerun one mutant
  python3 benchmarks/mutation_score.py --list               # show the sample, run nothing

Each mutant changes one thing in one module (a comparison flipped or made
inclusive, + and - swapped, ``and``/``or`` swapped, an integer constant moved by
one, a boolean return negated, a ``raise`` dropped), in a copy of the repository
(the working tree is never touched), then runs the tests relevant to that module
(``-x -q -p no:cacheprovider``, a timeout): a failing or hanging run kills the
mutant.  Why per-module test subsets: a mutant of the map code is judged by the
map tests, so one run costs seconds, and a kill is attributed to a test that
exercises the module (the first failing test is printed).  The sample is drawn
per group (``--per-group``) so a small module like probe/restore.py gets as many
mutants as the large verifier.  A mutant is named ``path#index`` (its place
among the file's candidate sites in ``ast.walk`` order) so it can be rerun with
``--only`` after a test is added.

The groups' tests are first run unmutated; a failing baseline stops the run (a
broken environment would otherwise count as kills).  ``--jobs`` runs mutants in
parallel copies; keep it at 1 on a shared machine.

Survivors are listed with their place; each must be judged by hand: equivalent
(no behaviour can change) or a test gap (add a test, preferably kernel-checked).
The last measured scores and the judged survivors are in benchmarks/README.md
("Mutation score").
"""

from __future__ import annotations

import argparse
import ast
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_VERIFIER_TESTS = ["tests/test_verifier_rules.py", "tests/test_verifier_precision.py",
                   "tests/test_verifier_domain_exhaustive.py", "tests/test_verifier.py",
                   "tests/test_verifier_dead_code.py", "tests/test_verifier_corpus.py", "tests/test_may_goto.py",
                   "tests/test_verifier_kernel_diff.py"]
#: a 1.5 s bound on a signal's effect fails under the load of a mutation run on a shared machine (not because
#: of the mutant); the restore checks it also makes are in test_probe_detach.py
_DESELECT_TIMED = "--deselect=tests/test_session_lifetime.py::test_signal_ends_session_fast_and_restores"
#: group -> (module globs, tests relevant to every module of the group), fast files first (-x stops early)
GROUPS: dict[str, tuple[list[str], list[str]]] = {
    "verifier": (["ubpf_py/verifier/*.py"], _VERIFIER_TESTS),
    "maps": (["ubpf_py/maps/*.py"],
             ["tests/test_maps.py", "tests/test_maps_kernel.py", "tests/test_hash_index_agree.py",
              "tests/test_map_limits.py", "tests/test_helpers.py", "tests/test_intarget_maps.py",
              "tests/test_intarget_runtime.py", "tests/test_intarget_diff.py", "tests/test_output.py",
              "tests/test_fastpath.py"]),
    "helpers": (["ubpf_py/helpers/*.py"],
                ["tests/test_helpers.py", "tests/test_printk.py", "tests/test_kernel_syscall.py",
                 "tests/test_intarget_runtime.py", "tests/test_intarget_diff.py", "tests/test_fastpath.py",
                 "tests/test_backend_parity.py", "tests/test_hit_facts.py", "tests/test_task_helpers.py"]),
    "vm": (["ubpf_py/vm/*.py", "ubpf_py/vm/jit/*.py"],
           ["tests/test_interpreter.py", "tests/test_jit.py", "tests/test_kernel_alu_diff.py",
            "tests/test_may_goto.py", "tests/test_maps.py", "tests/test_helpers.py", "tests/test_conformance.py",
            "tests/test_fastpath.py"]),
    "restore": (["ubpf_py/probe/restore.py"],
                ["tests/test_probe_detach.py", "tests/test_usdt.py", "tests/test_session_lifetime.py", _DESELECT_TIMED,
                 "tests/test_target_edges.py", "tests/test_probe_engine.py"]),
}
#: modules whose behaviour is also checked by tests outside their group (a helper prototype is a verifier rule)
EXTRA_TESTS: dict[str, list[str]] = {
    "ubpf_py/helpers/protos.py": ["tests/test_verifier_rules.py", "tests/test_verifier.py",
                                  "tests/test_verifier_corpus.py"],
    "ubpf_py/helpers/names.py": ["tests/test_verifier_rules.py", "tests/test_verifier_corpus.py"],
    "ubpf_py/verifier/globalfuncs.py": ["tests/test_verifier_globals.py", "tests/test_loader.py"],
    "ubpf_py/verifier/calls.py": ["tests/test_verifier_globals.py"],
    "ubpf_py/verifier/mapfields.py": ["tests/test_verifier_map_fields.py", "tests/test_loader.py"],
    "ubpf_py/vm/jit/target.py": ["tests/test_jit_target.py"],
    "ubpf_py/vm/jit/native_hit.py": ["tests/test_native_hits.py"],
    "ubpf_py/vm/jit/cache.py": ["tests/test_jit_target.py"],
}

_CMP_SWAP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
             ast.NotEq: ast.Eq}
_BIN_SWAP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.BitAnd: ast.BitOr, ast.BitOr: ast.BitAnd,
             ast.LShift: ast.RShift, ast.RShift: ast.LShift}
_FAILED = re.compile(r"^(?:FAILED|ERROR) (\S+)", re.M)


@dataclass
class Site:
    path: str
    line: int
    kind: str
    index: int  # n-th candidate in the file (ast.walk order)
    group: str = ""

    @property
    def name(self) -> str:
        return f"{self.path}#{self.index}"


def _annotation_nodes(tree: ast.AST) -> set[int]:
    """Nodes inside type annotations: never evaluated (``from __future__ import annotations``),
    so a mutant there is equivalent by construction and is not generated."""
    roots = []
    for node in ast.walk(tree):
        if isinstance(node, ast.arg | ast.AnnAssign) and node.annotation is not None:
            roots.append(node.annotation)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.returns is not None:
            roots.append(node.returns)
    return {id(n) for r in roots for n in ast.walk(r)}


def _candidates(tree: ast.AST) -> list[tuple[str, ast.AST]]:
    out = []
    skip = _annotation_nodes(tree)
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Compare) and type(node.ops[0]) in _CMP_SWAP:
            out.append(("compare", node))
        elif isinstance(node, ast.BinOp) and type(node.op) in _BIN_SWAP:
            out.append(("binop", node))
        elif isinstance(node, ast.BoolOp):
            out.append(("boolop", node))
        elif isinstance(node, ast.Constant) and type(node.value) is int and not isinstance(node.value, bool):
            out.append(("const", node))
        elif isinstance(node, ast.Return) and isinstance(node.value, ast.Constant) and \
                isinstance(node.value.value, bool):
            out.append(("return", node))
        elif isinstance(node, ast.Raise):
            out.append(("raise", node))
    return out


def sites(paths: list[Path], group: str = "") -> list[Site]:
    out = []
    for p in paths:
        tree = ast.parse(p.read_text())
        for i, (kind, node) in enumerate(_candidates(tree)):
            out.append(Site(str(p.relative_to(ROOT)), getattr(node, "lineno", 0), kind, i, group))
    return out


class _Mutate(ast.NodeTransformer):
    def __init__(self, target: ast.AST) -> None:
        self.target = target

    def generic_visit(self, node: ast.AST) -> ast.AST:
        node = super().generic_visit(node)
        if node is not self.target:
            return node
        if isinstance(node, ast.Compare):
            node.ops[0] = _CMP_SWAP[type(node.ops[0])]()
        elif isinstance(node, ast.BinOp):
            node.op = _BIN_SWAP[type(node.op)]()
        elif isinstance(node, ast.BoolOp):
            node.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        elif isinstance(node, ast.Constant):
            node.value = node.value + 1
        elif isinstance(node, ast.Return):
            node.value = ast.Constant(not node.value.value)
        elif isinstance(node, ast.Raise):
            return ast.Pass()
        return node


def mutant_source(source: str, site: Site) -> str:
    """``source`` (the module as it was when the sample was drawn) with ``site`` mutated."""
    tree = ast.parse(source)
    target = _candidates(tree)[site.index][1]
    tree = _Mutate(target).visit(tree)
    ast.fix_missing_locations(tree)
    return ast.unparse(tree)


def group_of(path: str) -> str:
    for name, (globs, _) in GROUPS.items():
        if any(Path(path).match(g) and Path(path).parent == Path(g).parent for g in globs):
            return name
    raise SystemExit(f"mutation_score: error: {path} is in no group ({', '.join(GROUPS)}); "
                     "pass a module of one of them")


def tests_for(site: Site, root: Path = ROOT) -> list[str]:
    """The group's tests, the module's extra ones and the group's mutation-kill tests (if ``root``,
    the copy the tests run in, has them)."""
    base = GROUPS[site.group][1]
    kills = f"tests/test_mutation_kills_{site.group}.py"
    if (root / kills).exists():
        base = [kills, *base]
    return base + [t for t in EXTRA_TESTS.get(site.path, []) if t not in base]


def run(copy: Path, tests: list[str], timeout: float) -> tuple[bool, str, float]:
    """(killed, first failing test or 'timeout', seconds).  The run is its own session so a hang is
    ended with everything it started, by that session's id."""
    env = dict(os.environ, PYTHONPATH=str(copy), PYTHONDONTWRITEBYTECODE="1")
    # the tests find the shared corpus and builds next to *their* repository: point them at the
    # original's, or every test needing them would skip in the copy (and kill nothing)
    env.setdefault("UBPF_SHARED", str(ROOT.parent / "shared"))
    for var, name in (("UBPF_CORPUS_BUILD", ".corpus-build"), ("UBPF_REALWORLD_BUILD", ".realworld-build")):
        if (ROOT / name).is_dir():
            env.setdefault(var, str(ROOT / name))
    t0 = time.monotonic()
    p = subprocess.Popen([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                         cwd=copy, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        return True, "timeout", time.monotonic() - t0
    text = out.decode(errors="replace")
    if p.returncode in (4, 5):   # pytest's usage error / nothing collected: the run is broken, not the mutant
        raise SystemExit(f"mutation_score: error: pytest could not run {' '.join(tests)}: "
                         f"{text.strip().splitlines()[-1:]}")
    m = _FAILED.search(text)
    why = m.group(1) if m else (text.strip().splitlines() or ["?"])[-1][:100]
    return p.returncode != 0, why, time.monotonic() - t0


def _drop_pyc(target: Path) -> None:
    """A stale compiled copy of the previous mutant must not be imported (same size, same second)."""
    for pyc in (target.parent / "__pycache__").glob(f"{target.stem}.*.pyc"):
        pyc.unlink()


def _make_copy(tmp: Path, n: int) -> Path:
    copy = tmp / f"repo{n}"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".git", "__pycache__", ".corpus-build", ".ruff_cache"))
    return copy


def choose(groups: list[str], per_group: int, seed: int, only: list[str]) -> tuple[list[Site], dict[str, int]]:
    totals: dict[str, int] = {}
    by_group: dict[str, list[Site]] = {}
    for g in groups:
        paths = sorted({p.resolve() for glob in GROUPS[g][0] for p in ROOT.glob(glob)})
        by_group[g] = sites(paths, g)
        totals[g] = len(by_group[g])
    if only:
        picked = []
        for name in only:
            path, _, idx = name.partition("#")
            g = group_of(path)
            all_sites = by_group.get(g) or sites([(ROOT / path).resolve()], g)
            match = [s for s in all_sites if s.path == path and s.index == int(idx)]
            if not match:
                raise SystemExit(f"mutation_score: error: no mutant {name}; use --list to see names")
            picked += match
        return picked, totals
    rng = random.Random(seed)
    return [s for g in groups for s in rng.sample(by_group[g], min(per_group, len(by_group[g])))], totals


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", nargs="*", default=list(GROUPS), choices=list(GROUPS))
    ap.add_argument("--per-group", type=int, default=16, help="mutants drawn per group (default 16)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--only", nargs="*", default=[], help="mutant names path#index to rerun")
    ap.add_argument("--jobs", type=int, default=1, help="parallel copies (default 1: the machine is shared)")
    ap.add_argument("--list", action="store_true", help="print the sample and stop")
    args = ap.parse_args()
    chosen, totals = choose(args.groups, args.per_group, args.seed, args.only)
    if args.list:
        for s in chosen:
            print(f"{s.group:9} {s.name:45} line {s.line} {s.kind}")
        return 0
    results: list[tuple[Site, bool, str]] = []
    with tempfile.TemporaryDirectory(prefix="mutation-") as tmpdir:
        tmp = Path(tmpdir)
        copies = [_make_copy(tmp, n) for n in range(max(1, args.jobs))]
        timeouts = {}
        for g in sorted({s.group for s in chosen}):
            tests = sorted({t for s in chosen if s.group == g for t in tests_for(s, copies[0])})
            killed, why, secs = run(copies[0], tests, 1800)
            if killed:
                print(f"mutation_score: error: the unmutated tests of group {g} fail ({why}); fix the "
                      "environment first", file=sys.stderr)
                return 2
            timeouts[g] = 3 * secs + 60
            print(f"baseline {g}: {sum(t.endswith('.py') for t in tests)} test files pass in {secs:.0f}s", flush=True)
        free = list(copies)

        def one(site: Site) -> tuple[Site, bool, str, float]:
            copy = free.pop()
            target = copy / site.path
            original = target.read_text()
            try:
                target.write_text(mutant_source(original, site))   # the copy's text: the tree may change
                _drop_pyc(target)
                killed, why, secs = run(copy, tests_for(site, copy), timeouts[site.group])
            finally:
                target.write_text(original)
                _drop_pyc(target)
                free.append(copy)
            return site, killed, why, secs

        with ThreadPoolExecutor(max_workers=len(copies)) as pool:
            for k, (site, killed, why, secs) in enumerate(pool.map(one, chosen), 1):
                state = f"killed   by {why}" if killed else "SURVIVED"
                print(f"[{k}/{len(chosen)}] {site.name:45} line {site.line:4} {site.kind:8} {secs:5.0f}s {state}",
                      flush=True)
                results.append((site, killed, why))
    print("\ngroup      killed/total  (sites)")
    for g in args.groups:
        rs = [r for r in results if r[0].group == g]
        if rs:
            print(f"{g:10} {sum(k for _, k, _ in rs):3}/{len(rs):<3}        ({totals.get(g, '?')})")
    n = len(results)
    dead = sum(k for _, k, _ in results)
    print(f"all        {dead}/{n} ({dead / max(1, n):.0%})\nsurvivors (judge each: equivalent or a test gap):")
    for s, killed, _ in results:
        if not killed:
            print(f"  {s.name:45} line {s.line:4} {s.kind}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
