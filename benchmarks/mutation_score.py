"""Mutation testing: break the code on purpose and check that the tests notice.

Built on cosmic-ray (``pip install -e '.[mutation]'``); slow, not in CI.  From the repository root:
  python3 benchmarks/mutation_score.py --per-group 6 --seed 5         # 30 mutants, about 30 min
  python3 benchmarks/mutation_score.py --groups verifier maps --per-group 20 --seed 7
  python3 benchmarks/mutation_score.py --only 'ubpf_py/maps/hash.py:core/NumberReplacer#4'
  python3 benchmarks/mutation_score.py --per-group 6 --seed 5 --list  # show the sample, run nothing

cosmic-ray generates the mutants (``cosmic-ray init``), applies one at a time and runs the tests
(``cosmic-ray exec``).  This script adds, thinly:
- per-group sessions: verifier/, maps/, helpers/, vm/ (with vm/jit/) and probe/restore.py each get
  their own session whose test command runs only the group's tests (fast files first, ``-x``), plus
  ``tests/test_mutation_kills_<group>.py`` (tests written for survivors); a module with extra
  relevant tests (``EXTRA_TESTS``) gets its own session.  A mutant of the map code is judged by the
  map tests, so one run costs seconds and a kill is attributed to a test of the module.
- a seeded random sample of ``--per-group`` work items per group: cosmic-ray creates all of them at
  ``init``; the others are marked skipped in its work-db so ``exec`` runs only the sample.  Mutants
  inside type annotations are skipped too (never evaluated under ``from __future__ import
  annotations``: equivalent by construction).
- a throw-away copy of the repository: cosmic-ray mutates files in place; the working tree is
  never touched.
- the unmutated tests of each group must pass first (a broken environment is not a kill); the
  timeout is 3x that baseline + 60 s (a hang is a kill).
- a pytest usage error (exit 4 or 5) is not a kill: it is reported as an error.
Mutants are named ``path:operator#occurrence`` (cosmic-ray's identity of a work item; it changes
when code is added above it).  ``--keep DIR`` keeps the session databases for ``cr-report``.
Survivors are printed with their diff; each must be judged by hand: equivalent (no behaviour can
change) or a test gap (add a test, kernel-checked where a kernel can answer).  The last measured
scores and judged survivors are in benchmarks/README.md ("Mutation score").
"""

from __future__ import annotations

import argparse
import ast
import os
import random
import re
import shlex
import shutil
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
#: group -> (cosmic-ray module-path, tests relevant to every module of the group), fast files first (-x stops early)
GROUPS: dict[str, tuple[str, list[str]]] = {
    "verifier": ("ubpf_py/verifier", _VERIFIER_TESTS),
    "maps": ("ubpf_py/maps",
             ["tests/test_maps.py", "tests/test_maps_kernel.py", "tests/test_hash_index_agree.py",
              "tests/test_map_limits.py", "tests/test_helpers.py", "tests/test_intarget_maps.py",
              "tests/test_intarget_runtime.py", "tests/test_intarget_diff.py", "tests/test_output.py",
              "tests/test_fastpath.py"]),
    "helpers": ("ubpf_py/helpers",
                ["tests/test_helpers.py", "tests/test_printk.py", "tests/test_kernel_syscall.py",
                 "tests/test_intarget_runtime.py", "tests/test_intarget_diff.py", "tests/test_fastpath.py",
                 "tests/test_backend_parity.py", "tests/test_hit_facts.py", "tests/test_task_helpers.py"]),
    "vm": ("ubpf_py/vm",
           ["tests/test_interpreter.py", "tests/test_jit.py", "tests/test_kernel_alu_diff.py",
            "tests/test_may_goto.py", "tests/test_maps.py", "tests/test_helpers.py", "tests/test_conformance.py",
            "tests/test_fastpath.py"]),
    "restore": ("ubpf_py/probe/restore.py",
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
_USAGE_ERROR = "mutation_score: pytest usage error"
_FAILED = re.compile(r"^(?:FAILED|ERROR) (\S+)", re.M)


@dataclass(frozen=True)
class Session:
    """One cosmic-ray session: the modules it mutates and the tests that judge them."""
    group: str
    index: int
    modules: tuple[str, ...]
    excluded: tuple[str, ...]
    tests: tuple[str, ...]


def sessions(group: str) -> list[Session]:
    path, tests = GROUPS[group]
    kills = f"tests/test_mutation_kills_{group}.py"
    base = [kills, *tests] if (ROOT / kills).exists() else list(tests)
    extras = [m for m in EXTRA_TESTS if Path(m).is_relative_to(path)]
    out = [Session(group, 0, (path,), tuple(extras), tuple(base))]
    for k, m in enumerate(extras, 1):
        out.append(Session(group, k, (m,), (), (*base, *(t for t in EXTRA_TESTS[m] if t not in base))))
    return out


def _config(s: Session, timeout: float) -> str:
    from cosmic_ray.config import serialize_config
    command = shlex.join([sys.executable, "benchmarks/mutation_score.py", "--pytest", *s.tests])
    return serialize_config({"module-path": list(s.modules), "excluded-modules": list(s.excluded),
                             "test-command": command, "timeout": timeout, "distributor": {"name": "local"}})


def _annotations(path: Path) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    tree = ast.parse(path.read_text())
    if not any(isinstance(n, ast.ImportFrom) and n.module == "__future__" and n.names[0].name == "annotations"
               for n in tree.body):
        return []
    roots = [n.annotation for n in ast.walk(tree) if isinstance(n, ast.arg | ast.AnnAssign) and n.annotation]
    roots += [n.returns for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.returns]
    return [((r.lineno, r.col_offset), (r.end_lineno or 0, r.end_col_offset or 0)) for r in roots]


def name(mutation) -> str:
    return f"{mutation.module_path}:{mutation.operator_name}#{mutation.occurrence}"


def _env(copy: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(copy), PYTHONDONTWRITEBYTECODE="1")
    # the tests find the shared corpus and builds next to *their* repository: point them at the
    # original's, or every test needing them would skip in the copy (and kill nothing)
    env.setdefault("UBPF_SHARED", str(ROOT.parent / "shared"))
    for var, dirname in (("UBPF_CORPUS_BUILD", ".corpus-build"), ("UBPF_REALWORLD_BUILD", ".realworld-build")):
        if (ROOT / dirname).is_dir():
            env.setdefault(var, str(ROOT / dirname))
    return env


def _cosmic_ray(copy: Path, *args: str) -> None:
    subprocess.run([shutil.which("cosmic-ray") or "cosmic-ray", *args], cwd=copy, env=_env(copy), check=True)


def init_and_sample(copy: Path, tmp: Path, groups: list[str], per_group: int, seed: int,
                    only: list[str]) -> dict[Session, list]:
    """Create every session's work items, then mark all but the sample skipped; -> chosen items per session."""
    from cosmic_ray.work_db import use_db
    from cosmic_ray.work_item import WorkerOutcome, WorkResult
    chosen: dict[Session, list] = {}
    for g in groups:
        items = []
        for s in sessions(g):
            (tmp / f"{g}{s.index}.toml").write_text(_config(s, 60))
            _cosmic_ray(copy, "init", str(tmp / f"{g}{s.index}.toml"), str(tmp / f"{g}{s.index}.sqlite"))
            with use_db(str(tmp / f"{g}{s.index}.sqlite")) as db:
                items += [(s, item) for item in db.work_items]
        spans = {p: _annotations(copy / p) for p in {str(i.mutations[0].module_path) for _, i in items}}
        items = sorted(((s, i) for s, i in items if not any(
            a <= i.mutations[0].start_pos < b for a, b in spans[str(i.mutations[0].module_path)])),
            key=lambda si: (str(si[1].mutations[0].module_path), si[1].mutations[0].operator_name,
                            si[1].mutations[0].occurrence))
        picked = [si for si in items if name(si[1].mutations[0]) in only] if only else \
            random.Random(f"{seed}-{g}").sample(items, min(per_group, len(items)))
        for s in sessions(g):
            keep = {i.job_id for t, i in picked if t == s}
            with use_db(str(tmp / f"{g}{s.index}.sqlite")) as db:
                db.set_multiple_results([i.job_id for i in db.work_items if i.job_id not in keep],
                                        WorkResult(output="not sampled", worker_outcome=WorkerOutcome.SKIPPED))
            if keep:
                chosen[s] = [i for t, i in picked if t == s]
    missing = set(only) - {name(i.mutations[0]) for items in chosen.values() for i in items}
    if missing:
        raise SystemExit(f"mutation_score: error: no mutant {', '.join(sorted(missing))}; use --list to see names")
    return chosen


def baseline(copy: Path, tests: list[str]) -> float:
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "benchmarks/mutation_score.py", "--pytest", *tests], cwd=copy,
                       env=_env(copy), capture_output=True, text=True, timeout=1800)
    if p.returncode:
        m = _FAILED.search(p.stdout)
        raise SystemExit(f"mutation_score: error: the unmutated tests fail ({m.group(1) if m else p.stdout[-300:]}); "
                         "fix the environment first")
    return time.monotonic() - t0


def run_pytest(tests: list[str]) -> int:
    """The sessions' test command: pytest, with a usage error marked so it is not counted as a kill."""
    rc = subprocess.call([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                         stderr=subprocess.STDOUT)
    if rc in (4, 5):
        print(_USAGE_ERROR, flush=True)
    return rc


def main() -> int:
    if sys.argv[1:2] == ["--pytest"]:
        return run_pytest(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", nargs="*", default=list(GROUPS), choices=list(GROUPS))
    ap.add_argument("--per-group", type=int, default=16, help="mutants drawn per group (default 16)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--only", nargs="*", default=[], help="mutant names path:operator#occurrence to rerun")
    ap.add_argument("--jobs", type=int, default=1, help="sessions run in parallel copies (default 1: shared machine)")
    ap.add_argument("--list", action="store_true", help="print the sample and stop")
    ap.add_argument("--keep", type=Path, help="copy the session databases here (for cr-report)")
    args = ap.parse_args()
    if shutil.which("cosmic-ray") is None:
        raise SystemExit("mutation_score: error: cosmic-ray is not installed; pip install -e '.[mutation]'")
    groups = sorted({g for n in args.only for g, (p, _) in GROUPS.items() if Path(n.split(":")[0]).is_relative_to(p)},
                    key=list(GROUPS).index) if args.only else args.groups
    with tempfile.TemporaryDirectory(prefix="mutation-") as tmpdir:
        tmp = Path(tmpdir)
        copies = [tmp / f"repo{n}" for n in range(max(1, args.jobs))]
        for c in copies:
            shutil.copytree(ROOT, c, ignore=shutil.ignore_patterns(".git", "__pycache__", ".corpus-build",
                                                                   ".realworld-build", ".ruff_cache"))
        chosen = init_and_sample(copies[0], tmp, groups, args.per_group, args.seed, args.only)
        if args.list:
            for s, items in chosen.items():
                for i in items:
                    m = i.mutations[0]
                    print(f"{s.group:9} {name(m):70} line {m.start_pos[0]:4} {m.definition_name}")
            return 0
        timeouts = {}
        for g in dict.fromkeys(s.group for s in chosen):
            tests = list(dict.fromkeys(t for s in chosen if s.group == g for t in s.tests))
            secs = baseline(copies[0], tests)
            timeouts[g] = 3 * secs + 60
            print(f"baseline {g}: {sum(t.endswith('.py') for t in tests)} test files pass in {secs:.0f}s", flush=True)
        free = list(copies)

        def execute(s: Session) -> Session:
            copy = free.pop()
            try:
                (tmp / f"{s.group}{s.index}.toml").write_text(_config(s, timeouts[s.group]))
                _cosmic_ray(copy, "exec", str(tmp / f"{s.group}{s.index}.toml"), str(tmp / f"{s.group}{s.index}.sqlite"))
            finally:
                free.append(copy)
            return s

        with ThreadPoolExecutor(max_workers=len(copies)) as pool:
            done = list(pool.map(execute, chosen))
        return report(tmp, done, groups, args.keep)


def report(tmp: Path, done: list[Session], groups: list[str], keep: Path | None) -> int:
    from cosmic_ray.work_db import use_db
    from cosmic_ray.work_item import TestOutcome, WorkerOutcome
    rows, broken = [], []
    for s in done:
        with use_db(str(tmp / f"{s.group}{s.index}.sqlite")) as db:
            for item, r in db.completed_work_items:
                if r.worker_outcome == WorkerOutcome.SKIPPED:
                    continue
                out = r.output or ""
                if _USAGE_ERROR in out or r.test_outcome in (None, TestOutcome.INCOMPETENT):
                    broken.append((item, out))
                    continue
                m = _FAILED.search(out)
                why = "timeout" if out == "timeout" else m.group(1) if m else out.strip()[-100:]
                rows.append((s.group, item, r.test_outcome == TestOutcome.KILLED, why, r.diff or ""))
        if keep:
            keep.mkdir(parents=True, exist_ok=True)
            shutil.copy(tmp / f"{s.group}{s.index}.sqlite", keep)
    for _, item, killed, why, _ in rows:
        m = item.mutations[0]
        print(f"{name(m):70} line {m.start_pos[0]:4} {f'killed by {why}' if killed else 'SURVIVED'}")
    print("\ngroup      killed/total")
    for g in groups:
        rs = [k for grp, _, k, _, _ in rows if grp == g]
        if rs:
            print(f"{g:10} {sum(rs):3}/{len(rs)}")
    dead = sum(k for _, _, k, _, _ in rows)
    print(f"all        {dead}/{len(rows)} ({dead / max(1, len(rows)):.0%})\n"
          "survivors (judge each: equivalent or a test gap):")
    for _, item, killed, _, diff in rows:
        if not killed:
            print(f"  {name(item.mutations[0])} (line {item.mutations[0].start_pos[0]})")
            print("".join(f"      {line}\n" for line in diff.splitlines() if line[:1] in "+-" and line[:3] not in
                          ("+++", "---")), end="")
    for item, out in broken:
        print(f"mutation_score: error: {name(item.mutations[0])} did not run: {out.strip()[-300:]}", file=sys.stderr)
    return 2 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
