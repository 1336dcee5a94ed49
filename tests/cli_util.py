"""Helpers for tests that run the ``ubpf-run`` command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: str | Path | None = None, timeout: float = 60,
            user: str | None = None, taskset: str | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m ubpf_py.cli ARGS`` (optionally as another user via setpriv, and/or
    pinned to the CPUs in ``taskset``)."""
    argv = [sys.executable, "-m", "ubpf_py.cli", *args]
    if user is not None:
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *argv]
    if taskset is not None:
        argv = ["taskset", "-c", taskset, *argv]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


NOBODY = "65534"


def unprivileged_python_reason() -> str | None:
    """Why this Python cannot run ubpf-run as uid 65534 here (None when it can)."""
    if os.geteuid() != 0:
        return "needs root to start a process as another user"
    probe = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                            sys.executable, "-c", "import numpy, llvmlite, elftools, ubpf_py"],
                           capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    if probe.returncode != 0:
        return (f"the interpreter {sys.executable} or its packages are not readable by uid {NOBODY} "
                f"(tests/run.sh makes them so in CI): {probe.stderr.strip().splitlines()[-1:]}")
    return None


def assert_one_line_error(p: subprocess.CompletedProcess, *words: str) -> str:
    """A non-zero exit, exactly one stderr line ``ubpf-run: error: ...`` containing ``words``."""
    assert p.returncode != 0, f"expected failure, got 0; stdout={p.stdout!r}"
    assert "Traceback" not in p.stderr, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ubpf-run: error: ")]
    assert len(errors) == 1, p.stderr
    for w in words:
        assert w.lower() in errors[0].lower(), (w, errors[0])
    return errors[0]


def text_bytes(pid: int, path_suffix: str) -> bytes:
    """The executable mapping of a file in a process, read through /proc/PID/mem."""
    out = b""
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb") as mem:
        for line in maps:
            parts = line.split()
            if len(parts) >= 6 and "x" in parts[1] and parts[5].endswith(path_suffix):
                start, end = (int(x, 16) for x in parts[0].split("-"))
                mem.seek(start)
                out += mem.read(end - start)
    return out
