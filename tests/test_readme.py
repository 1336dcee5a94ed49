"""The README quick start, run as a new user would: the command exactly as written.

It runs inside a fresh virtual environment (with the machine's packages
visible) so that its ``pip install .`` does not replace the editable install
the other tests use.  apt-get needs root; elsewhere the test skips.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from cli_util import REPO


def readme_commands() -> list[str]:
    """The two set-up commands: the fenced one-line blocks of the Quick start section."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [b.strip() for b in re.findall(r"```\n(.*?)\n```", section, re.S)]


def test_readme_has_the_two_commands():
    cmds = readme_commands()
    assert len(cmds) == 2 and all("\n" not in c for c in cmds), cmds
    assert cmds[1] == "bash tests/run.sh"
    assert (REPO / ".ci" / "run").read_text().strip().endswith("exec bash tests/run.sh")


@pytest.mark.slow
def test_readme_main_command_traces_the_example(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("the quick start installs packages with apt-get: needs root")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    env = dict(os.environ, PATH=f"{venv / 'bin'}:{os.environ['PATH']}", PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("PYTHONPATH", None)
    p = subprocess.run(["bash", "-c", readme_commands()[0]], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (venv / "bin" / "ubpf-run").exists(), "ubpf-run was not installed into the venv"
    out = p.stdout
    assert "size_hist:" in out and "|@" in out, out[-3000:]      # the histogram is drawn
    calls = int(re.search(r"^calls = (\d+)$", out, re.M).group(1))
    assert calls > 10, out[-2000:]
    assert "ubpf-run: error" not in p.stderr, p.stderr[-2000:]
