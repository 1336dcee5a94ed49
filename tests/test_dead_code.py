"""No dead code in ubpf_py/: vulture finds no definition that nothing uses.

"Used" means referenced anywhere in the package, the tests or the benchmarks (a helper
only tests call is still reached); only findings inside ubpf_py/ count.  Names that
vulture cannot see being used (protocol methods, ctypes fields, keep-alive references,
public API, complete kernel tables) are listed with their reason in
tests/vulture_allowlist.py.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ALLOWLIST = ROOT / "tests" / "vulture_allowlist.py"
MIN_CONFIDENCE = 60

pytest.importorskip("vulture", reason="vulture is in the test extra: pip install -e .[test]")


def _allowed_names() -> list[str]:
    tree = ast.parse(ALLOWLIST.read_text())
    return [n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
            and isinstance(n.value, ast.Name) and n.value.id == "_"]


def test_no_unused_definitions_in_package():
    # tests/ holds the allow-list, so it is scanned as part of tests/
    cmd = [sys.executable, "-m", "vulture", "ubpf_py", "tests", "benchmarks",
           "--min-confidence", str(MIN_CONFIDENCE)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    if out.returncode not in (0, 3):   # 3: vulture found unused code
        pytest.fail(f"vulture failed ({out.returncode}): {out.stderr.strip()}")
    found = [line for line in out.stdout.splitlines() if line.startswith("ubpf_py/")]
    assert not found, ("unused code in ubpf_py/ (delete it, or add the name to "
                       "tests/vulture_allowlist.py with the reason it is not dead):\n" + "\n".join(found))


def test_allowlist_has_no_stale_entries():
    """An allow-listed name that ubpf_py/ no longer defines would hide a future dead one."""
    text = "\n".join(p.read_text() for p in (ROOT / "ubpf_py").rglob("*.py"))
    names = _allowed_names()
    assert len(names) == len(set(names)), "duplicate allow-list entries"
    stale = [n for n in names if not re.search(rf"\b{re.escape(n)}\b", text)]
    assert not stale, f"allow-list names no longer in ubpf_py/: {stale} (remove them)"
