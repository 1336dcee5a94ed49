"""``ubpf-run --check`` (a verifier lint needing no privileges) and ``ubpf-run --list``."""

from __future__ import annotations

import json

import pytest
from cli_util import NOBODY, run_cli, unprivileged_python_reason
from kernel_verdict import invalid_case_here
from paths import CORPUS

INVALID = json.loads((CORPUS / "invalid" / "manifest.json").read_text())["programs"]


def test_check_accepts_every_corpus_object(corpus_build):
    objs = sorted(corpus_build.glob("*.bpf.o"))
    assert len(objs) >= 15
    for obj in objs:
        p = run_cli("--check", str(obj))
        assert p.returncode == 0, (obj.name, p.stdout, p.stderr)
        lines = [ln for ln in p.stdout.splitlines() if ln.strip()]
        assert lines and all(": OK" in ln for ln in lines), (obj.name, p.stdout)


@pytest.mark.parametrize("entry", INVALID, ids=[e["name"] for e in INVALID])
def test_check_matches_kernel_verdicts(entry, corpus_build):
    entry = invalid_case_here(corpus_build, entry)
    p = run_cli("--check", str(corpus_build / "invalid" / f"{entry['name']}.o"))
    assert "Traceback" not in p.stderr
    if entry["verdict"] == "accept":
        assert p.returncode == 0, p.stdout + p.stderr
    else:
        assert p.returncode == 3, p.stdout + p.stderr
        verdict = p.stdout.splitlines()[0]
        assert "REJECTED" in verdict and entry["kernel_error"] in p.stdout, p.stdout


def test_check_needs_no_privileges(corpus_build):
    reason = unprivileged_python_reason()
    if reason:
        pytest.skip(reason)
    p = run_cli("--check", str(corpus_build / "calls.bpf.o"), user=NOBODY)
    assert p.returncode == 0 and p.stdout.count(": OK") == 3, p.stdout + p.stderr


def test_list_functions_and_usdt(corpus_build):
    p = run_cli("--list", "uprobe:./hello:a*", cwd=corpus_build)
    assert p.returncode == 0, p.stderr
    assert any(line.endswith(":add") for line in p.stdout.splitlines()), p.stdout
    p = run_cli("--list", "usdt:./usdt:*", cwd=corpus_build)
    assert p.returncode == 0, p.stderr
    assert any("corpus:tick" in line for line in p.stdout.splitlines()), p.stdout
    p = run_cli("--list", "uprobe:./rust_args:rust_args::*", cwd=corpus_build)
    assert p.returncode == 0 and "rust_args::hello" in p.stdout, p.stdout + p.stderr


def test_list_prints_the_probe_type_asked_for(corpus_build):
    """``--list 'uretprobe:...'`` lists return probes (as bpftrace -l does), never uprobe: lines;
    USDT notes are not return-probe-able and are left out."""
    ret = run_cli("--list", "uretprobe:./hello:a*", cwd=corpus_build)
    ent = run_cli("--list", "uprobe:./hello:a*", cwd=corpus_build)
    assert ret.returncode == 0 and ent.returncode == 0, ret.stderr + ent.stderr
    lines = ret.stdout.splitlines()
    assert lines and all(line.startswith("uretprobe:") for line in lines), ret.stdout
    assert [line.replace("uretprobe:", "uprobe:", 1) for line in lines] == ent.stdout.splitlines()
    usdt = run_cli("--list", "uretprobe:./usdt:*", cwd=corpus_build)
    assert usdt.returncode == 0 and "corpus:tick" not in usdt.stdout, usdt.stdout
