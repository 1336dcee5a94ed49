"""Bad input never produces a traceback, a crashed target or a patched target.

One test per kind of bad input: each checks a single ``ubpf-run: error:`` line
that names the problem, a non-zero exit code, and (where there is a target)
that the target is alive and its code unchanged.
"""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest
from cli_util import NOBODY, assert_one_line_error, run_cli, text_bytes, unprivileged_python_reason


@pytest.fixture()
def sleeper():
    """A running process to attach to (its text is compared before/after)."""
    p = subprocess.Popen(["sleep", "60"])
    time.sleep(0.1)
    yield p
    p.kill()
    p.wait()


def test_not_an_elf(tmp_path):
    f = tmp_path / "prog.o"
    f.write_text("this is not an object file\n")
    p = run_cli(str(f), "--", "true")
    assert_one_line_error(p, "prog.o", "ELF")
    assert p.returncode == 2


def test_missing_object_file(tmp_path):
    p = run_cli(str(tmp_path / "nope.o"), "--", "true")
    assert_one_line_error(p, "nope.o")


def test_not_a_bpf_elf():
    p = run_cli(shutil.which("true"), "--", "true")
    assert_one_line_error(p, "BPF")
    assert p.returncode == 2


def test_truncated_object(tmp_path, corpus_build):
    data = (corpus_build / "hello.bpf.o").read_bytes()
    f = tmp_path / "trunc.o"
    f.write_bytes(data[: len(data) // 3])
    p = run_cli(str(f), "--", "true")
    assert_one_line_error(p, "trunc.o")
    assert p.returncode == 2


def test_unknown_helper(corpus_build):
    p = run_cli(str(corpus_build / "invalid" / "unknown_helper.o"), "--attach",
                f"{_only_program(corpus_build / 'invalid' / 'unknown_helper.o')}=./hello:add",
                "--", "./hello", cwd=corpus_build)
    assert_one_line_error(p, "helper", "10000")


def test_rejected_program(corpus_build):
    obj = corpus_build / "invalid" / "map_null_deref.o"
    p = run_cli(str(obj), "--attach", f"{_only_program(obj)}=./hello:add", "--", "./hello", cwd=corpus_build)
    assert_one_line_error(p, "map_value_or_null")
    assert p.returncode == 3


def test_missing_symbol_leaves_running_target_untouched(corpus_build, sleeper):
    before = text_bytes(sleeper.pid, "sleep")
    p = run_cli(str(corpus_build / "hello.bpf.o"), "--no-auto", "--attach",
                "add_entry=/proc/self/exe:no_such_function", "--pid", str(sleeper.pid), cwd=corpus_build)
    assert_one_line_error(p, "no_such_function")
    assert p.returncode == 4
    assert sleeper.poll() is None, "target died"
    assert text_bytes(sleeper.pid, "sleep") == before
    assert _tracer_pid(sleeper.pid) == 0, "target left traced"


def test_missing_symbol_in_launched_command(corpus_build):
    p = run_cli(str(corpus_build / "hello.bpf.o"), "--no-auto", "--attach", "add_entry=./hello:no_such_fn",
                "--", "./hello", cwd=corpus_build)
    assert_one_line_error(p, "no_such_fn")
    assert "sum=" not in p.stdout


def test_dead_pid(corpus_build):
    p = run_cli(str(corpus_build / "hello_auto.bpf.o"), "--pid", "999999999", cwd=corpus_build)
    assert_one_line_error(p, "999999999")
    assert p.returncode == 4


def test_permission_denied(corpus_build, sleeper):
    reason = unprivileged_python_reason()
    if reason:
        pytest.skip(reason)
    before = text_bytes(sleeper.pid, "sleep")
    p = run_cli(str(corpus_build / "hello_auto.bpf.o"), "--pid", str(sleeper.pid), cwd=corpus_build,
                user=NOBODY)
    assert_one_line_error(p, str(sleeper.pid))
    assert p.returncode == 4
    assert any(w in p.stderr.lower() for w in ("permission", "not permitted", "denied"))
    assert sleeper.poll() is None
    assert text_bytes(sleeper.pid, "sleep") == before


@pytest.mark.parametrize("bad", ["add_entry", "add_entry=", "add_entry=./hello", "nosuchprog=./hello:add",
                                 "add_entry=./hello:add+zz", "add_entry=./hello:add@cookie"])
def test_bad_attach_syntax(corpus_build, bad):
    p = run_cli(str(corpus_build / "hello.bpf.o"), "--attach", bad, "--", "./hello", cwd=corpus_build)
    assert_one_line_error(p, "--attach")
    assert p.returncode == 64


def test_bad_set_syntax(corpus_build):
    p = run_cli(str(corpus_build / "funclat.bpf.o"), "--set", "targ_tgid", "--", "./funclat", cwd=corpus_build)
    assert_one_line_error(p, "--set")
    assert p.returncode == 64


def test_set_unknown_global(corpus_build):
    p = run_cli(str(corpus_build / "funclat.bpf.o"), "--set", "no_such_var=1", "--attach",
                "work_entry=./funclat:work", "--", "./funclat", cwd=corpus_build)
    assert_one_line_error(p, "no_such_var")


def test_nothing_to_trace(corpus_build):
    p = run_cli(str(corpus_build / "hello.bpf.o"))
    assert_one_line_error(p, "--pid")
    assert p.returncode == 64


def _only_program(obj) -> str:
    from ubpf_py.obj.elf import load_object

    spec = load_object(obj)
    assert len(spec.programs) == 1
    return next(iter(spec.programs))


def _tracer_pid(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("TracerPid:"):
                return int(line.split()[1])
    return 0
