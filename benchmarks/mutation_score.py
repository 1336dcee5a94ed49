"""Mutation testing: break the code on purpose and check that the tests notice.

Run (slow; not in CI):
  python3 benchmarks/mutation_score.py [--modules ubpf_py/verifier/*.py] [--count 40] [--seed 1]
                                       [--tests tests/test_verifier.py ...] [--timeout 300]

Each mutant changes one thing in one module (a comparison flipped or made
inclusive, + and - swapped, ``and``/``or`` swapped, an integer constant moved by
one, a boolean return negated, a ``raise`` dropped), in a copy of the repository,
then runs the tests (``-x``) against it: a failing run kills the mutant.  The
survivors are listed with their place so each can be judged (a real test gap, or
an equivalent mutant).  Default tests: the verifier's unit, rule, precision,
dead-code and global-function tests (kernel comparisons included when root).
"""

from __future__ import annotations

import argparse
import ast
import random
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TESTS = ["tests/test_verifier.py", "tests/test_verifier_rules.py", "tests/test_verifier_precision.py",
                 "tests/test_verifier_dead_code.py", "tests/test_verifier_globals.py"]
_CMP_SWAP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
             ast.NotEq: ast.Eq}
_BIN_SWAP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.BitAnd: ast.BitOr, ast.BitOr: ast.BitAnd,
             ast.LShift: ast.RShift, ast.RShift: ast.LShift}


@dataclass
class Site:
    path: str
    line: int
    kind: str
    index: int  # n-th candidate of this kind in the file (ast.walk order)


def _candidates(tree: ast.AST) -> list[tuple[str, ast.AST]]:
    out = []
    for node in ast.walk(tree):
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


def sites(paths: list[Path]) -> list[Site]:
    out = []
    for p in paths:
        tree = ast.parse(p.read_text())
        for i, (kind, node) in enumerate(_candidates(tree)):
            out.append(Site(str(p.relative_to(ROOT)), getattr(node, "lineno", 0), kind, i))
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


def mutant_source(path: Path, site: Site) -> str:
    tree = ast.parse(path.read_text())
    target = _candidates(tree)[site.index][1]
    tree = _Mutate(target).visit(tree)
    ast.fix_missing_locations(tree)
    return ast.unparse(tree)


def run(copy: Path, tests: list[str], timeout: int) -> bool:
    """True if the tests fail (mutant killed)."""
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                           cwd=copy, capture_output=True, timeout=timeout, env={"PYTHONPATH": str(copy),
                                                                                  "PATH": "/usr/bin:/bin"})
    except subprocess.TimeoutExpired:
        return True  # a hang is noticed too
    return r.returncode != 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modules", nargs="*", default=sorted(str(p) for p in (ROOT / "ubpf_py/verifier").glob("*.py")))
    ap.add_argument("--tests", nargs="*", default=DEFAULT_TESTS)
    ap.add_argument("--count", type=int, default=40)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout", type=int, default=300)
    args = ap.parse_args()
    paths = [Path(m).resolve() for m in args.modules]
    all_sites = sites(paths)
    rng = random.Random(args.seed)
    chosen = rng.sample(all_sites, min(args.count, len(all_sites)))
    survivors = []
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "repo"
        shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".git", "__pycache__", ".corpus-build"))
        for k, site in enumerate(chosen, 1):
            target = copy / site.path
            original = target.read_text()
            try:
                target.write_text(mutant_source(ROOT / site.path, site))
                killed = run(copy, args.tests, args.timeout)
            finally:
                target.write_text(original)
            print(f"[{k}/{len(chosen)}] {'killed  ' if killed else 'SURVIVED'} {site.path}:{site.line} {site.kind}",
                  flush=True)
            if not killed:
                survivors.append(site)
    n = len(chosen)
    print(f"\n{n - len(survivors)}/{n} mutants killed ({(n - len(survivors)) / max(1, n):.0%}) "
          f"of {len(all_sites)} sites; survivors:")
    for s in survivors:
        print(f"  {s.path}:{s.line} {s.kind}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
