"""Mutation testing: break the code on purpose and check that the tests notice.

Built on cosmic-ray (``pip install -e '.[mutation]'``); slow, by hand, not in CI.  From the repository root:
  python3 benchmarks/mutation_score.py --per-group 8 --seed 5         # 40 mutants, 35-60 min
  python3 benchmarks/mutation_score.py --groups verifier maps --per-group 20 --seed 7
  python3 benchmarks/mutation_score.py --only 'ubpf_py/maps/hash.py:core/NumberReplacer#4'  # rerun one
  python3 benchmarks/mutation_score.py --per-group 8 --seed 5 --list  # show the sample, run nothing

cosmic-ray makes the mutants (``cosmic-ray init``), applies each and runs the tests (``exec``).
This script adds, thinly: one session per group (verifier/, maps/, helpers/, vm/ with vm/jit/,
probe/restore.py) whose test command runs only that group's tests (fast files first, ``-x``) plus
``tests/test_mutation_kills_<group>.py``, so a run costs seconds and a kill names a test of the
module (a module with ``EXTRA_TESTS`` gets its own session); a seeded random sample of
``--per-group`` work items per group (the rest, and mutants inside never-evaluated annotations,
are marked skipped in cosmic-ray's work-db, so ``exec`` runs only the sample); a throw-away copy
of the repository (cosmic-ray mutates in place: the working tree is never touched); the
unmutated tests must pass first (timeout 3x that baseline + 60 s; a hang is a kill); a pytest
usage error is reported, not counted as a kill.  Mutants are named ``path:operator#occurrence``
(changes when code is added above).  ``--keep DIR`` keeps the session databases (``cr-report``).
Each printed survivor is judged by hand: equivalent, or a test gap to close (kernel-checked where
a kernel can answer); the scores and judgements are in benchmarks/README.md ("Mutation score").
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
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _t(names: str) -> list[str]:
    return [f"tests/test_{n}.py" for n in names.split()]


#: 1.5 s bounds on a signal's effect fail under the load of a mutation run on a shared machine (not because
#: of the mutant); the restore checks they also make are in test_probe_detach.py
_DESELECT_TIMED = [f"--deselect=tests/test_session_lifetime.py::test_{t}" for t in (
    "signal_ends_session_fast_and_restores", "terminal_ctrl_c_reaches_both")]
#: group -> (cosmic-ray module-path, tests relevant to every module of the group), fast files first (-x stops early)
GROUPS: dict[str, tuple[str, list[str]]] = {
    "verifier": ("ubpf_py/verifier", _t("verifier_rules verifier_precision verifier_domain_exhaustive verifier "
                                        "verifier_dead_code verifier_corpus may_goto verifier_kernel_diff")),
    "maps": ("ubpf_py/maps", _t("maps maps_kernel hash_index_agree map_limits helpers intarget_maps "
                                "intarget_runtime intarget_diff output fastpath")),
    "helpers": ("ubpf_py/helpers", _t("helpers printk kernel_syscall intarget_runtime intarget_diff fastpath "
                                      "backend_parity hit_facts task_helpers")),
    "vm": ("ubpf_py/vm", _t("interpreter jit kernel_alu_diff may_goto maps helpers conformance fastpath")),
    "restore": ("ubpf_py/probe/restore.py", [*_t("probe_detach usdt session_lifetime"), *_DESELECT_TIMED,
                                             *_t("target_edges probe_engine")]),
}
#: modules whose behaviour is also checked by tests outside their group (a helper prototype is a verifier rule)
EXTRA_TESTS: dict[str, list[str]] = {
    "ubpf_py/helpers/protos.py": _t("verifier_rules verifier verifier_corpus"),
    "ubpf_py/helpers/names.py": _t("verifier_rules verifier_corpus"),
    "ubpf_py/verifier/globalfuncs.py": _t("verifier_globals loader"),
    "ubpf_py/verifier/calls.py": _t("verifier_globals"),
    "ubpf_py/verifier/mapfields.py": _t("verifier_map_fields loader"),
    "ubpf_py/vm/jit/target.py": _t("jit_target"),
    "ubpf_py/vm/jit/native_hit.py": _t("native_hits"),
    "ubpf_py/vm/jit/cache.py": _t("jit_target"),
}
_USAGE_ERROR = "mutation_score: pytest usage error"
_FAILED = re.compile(r"^(?:FAILED|ERROR) (.+?)(?: - .*)?$", re.M)


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
    # cosmic-ray is imported where used: this file is also the sessions' test command (--pytest)
    from cosmic_ray.config import serialize_config
    command = shlex.join([sys.executable, "benchmarks/mutation_score.py", "--pytest", *s.tests])
    return serialize_config({"module-path": list(s.modules), "excluded-modules": list(s.excluded),
                             "test-command": command, "timeout": timeout, "distributor": {"name": "local"}})


def _annotations(path: Path) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Where the type annotations are (every module here has ``from __future__ import annotations``)."""
    tree = ast.parse(path.read_text())
    roots = [n.annotation for n in ast.walk(tree) if isinstance(n, ast.arg | ast.AnnAssign) and n.annotation]
    roots += [n.returns for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.returns]
    return [((r.lineno, r.col_offset), (r.end_lineno or 0, r.end_col_offset or 0)) for r in roots]


def name(item) -> str:
    m = item.mutations[0]
    return f"{m.module_path}:{m.operator_name}#{m.occurrence}"


def _file(tmp: Path, s: Session, ext: str) -> str:
    return str(tmp / f"{s.group}{s.index}.{ext}")


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
        items, todo = [], sessions(g)
        if only:   # mutate just the named files (the occurrence numbering is per file): a faster init
            named = {n.split(":")[0] for n in only}
            todo = [replace(s, modules=fs, excluded=()) for s in todo if (fs := tuple(sorted(
                f for f in named if Path(f).is_relative_to(s.modules[0]) and f not in s.excluded)))]
        for s in todo:
            Path(_file(tmp, s, "toml")).write_text(_config(s, 60))
            _cosmic_ray(copy, "init", _file(tmp, s, "toml"), _file(tmp, s, "sqlite"))
            with use_db(_file(tmp, s, "sqlite")) as db:
                items += [(s, item) for item in db.work_items]
        spans = {p: _annotations(copy / p) for p in {str(i.mutations[0].module_path) for _, i in items}}
        items = sorted(((s, i) for s, i in items if not any(
            a <= i.mutations[0].start_pos < b for a, b in spans[str(i.mutations[0].module_path)])),
            key=lambda si: (str(si[1].mutations[0].module_path), si[1].mutations[0].operator_name,
                            si[1].mutations[0].occurrence))
        picked = [si for si in items if name(si[1]) in only] if only else \
            random.Random(f"{seed}-{g}").sample(items, min(per_group, len(items)))
        for s in todo:
            keep = {i.job_id for t, i in picked if t == s}
            with use_db(_file(tmp, s, "sqlite")) as db:
                db.set_multiple_results([i.job_id for i in db.work_items if i.job_id not in keep],
                                        WorkResult(output="not sampled", worker_outcome=WorkerOutcome.SKIPPED))
            if keep:
                chosen[s] = [i for t, i in picked if t == s]
    missing = set(only) - {name(i) for items in chosen.values() for i in items}
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
            print("".join(f"{s.group:9} {name(i):70} line {i.mutations[0].start_pos[0]:4} "
                          f"{i.mutations[0].definition_name}\n" for s, items in chosen.items() for i in items), end="")
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
                Path(_file(tmp, s, "toml")).write_text(_config(s, timeouts[s.group]))
                _cosmic_ray(copy, "exec", _file(tmp, s, "toml"), _file(tmp, s, "sqlite"))
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
        with use_db(_file(tmp, s, "sqlite")) as db:
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
            shutil.copy(_file(tmp, s, "sqlite"), keep)
    for _, item, killed, why, _ in rows:
        print(f"{name(item):70} line {item.mutations[0].start_pos[0]:4} {f'killed by {why}' if killed else 'SURVIVED'}")
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
            print(f"  {name(item)} (line {item.mutations[0].start_pos[0]})")
            print("".join(f"      {line}\n" for line in diff.splitlines() if line[:1] in "+-" and line[:3] not in
                          ("+++", "---")), end="")
    for item, out in broken:
        print(f"mutation_score: error: {name(item)} did not run: {out.strip()[-300:]}", file=sys.stderr)
    return 2 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
