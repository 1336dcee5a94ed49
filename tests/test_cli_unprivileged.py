"""ubpf-run as an unprivileged user tracing its own child: no root, no BPF privileges."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from cli_util import NOBODY, REPO, run_cli, unprivileged_python_reason

HELLO_PRINTK = ["add(1, 2)", "add returned 3", "add(10, 20)", "add returned 30", "add(-5, 3)",
                "add returned -2", "add(100000, 23)", "add returned 100023", "add(7, -7)", "add returned 0"]


def test_unprivileged_user_traces_own_child(corpus_build):
    reason = unprivileged_python_reason()
    if reason:
        pytest.skip(reason)
    tmp = Path(tempfile.mkdtemp(prefix="ubpf-nobody-"))  # pytest's tmp_path is private to root
    tmp.chmod(0o777)
    out = tmp / "out.jsonl"
    p = run_cli(str(corpus_build / "hello_auto.bpf.o"), "--format", "json", "-o", str(out), "--", "./hello",
                cwd=corpus_build, user=NOBODY)
    assert p.returncode == 0, p.stderr
    assert p.stdout == "sum=100054\n"
    events = [json.loads(line) for line in out.read_text().splitlines()]
    assert [e["message"] for e in events if e["event"] == "printk"] == HELLO_PRINTK
    # and that user really has no BPF: the kernel refuses it a map
    check = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", sys.executable,
                            "-c", "from ubpf_py.kernel.syscall import kernel_bpf_skip_reason as r; print(r())"],
                           capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert check.returncode == 0, check.stderr
    assert check.stdout.strip() != "None", "the unprivileged user can use bpf(): the test proves nothing"
