"""One exit code per kind of problem, as ``--help`` documents them, across ``--check``, runs
and ``--backend kernel`` (issue 12 item 5, issue 13 item 6).  Every documented code is run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from bpf_build import compile_bpf
from cli_util import NOBODY, assert_one_line_error, run_cli, unprivileged_python_reason

from ubpf_py import cli
from ubpf_py.kernel.syscall import kernel_bpf_skip_reason

HELPER = r"""
#include <linux/bpf.h>
#include <linux/ptrace.h>
#include <bpf/bpf_helpers.h>
static long (*bad_helper)(long) = (void *)9999;
SEC("uprobe")
int on_work(struct pt_regs *ctx) { return bad_helper(1); }
char LICENSE[] SEC("license") = "GPL";
"""

OK = r"""
#include <linux/bpf.h>
#include <linux/ptrace.h>
#include <bpf/bpf_helpers.h>
__u64 calls;
SEC("uprobe")
int on_work(struct pt_regs *ctx) { __sync_fetch_and_add(&calls, 1); return 0; }
char LICENSE[] SEC("license") = "GPL";
"""

RUNAWAY = r"""
#include <linux/bpf.h>
#include <linux/ptrace.h>
#include <bpf/bpf_helpers.h>
SEC("uprobe")
int on_work(struct pt_regs *ctx) { asm volatile("r0 = 0\n1: r0 += 1\n goto 1b\n" ::: "r0"); return 0; }
char LICENSE[] SEC("license") = "GPL";
"""

BIGMAP = r"""
#include <linux/bpf.h>
#include <linux/ptrace.h>
#include <bpf/bpf_helpers.h>
struct { __uint(type, BPF_MAP_TYPE_HASH); __uint(max_entries, 0xffffffff); __type(key, __u32);
         __type(value, __u64); } big SEC(".maps");
SEC("uprobe")
int on_work(struct pt_regs *ctx) { __u32 k = 1; __u64 v = 2; bpf_map_update_elem(&big, &k, &v, 0); return 0; }
char LICENSE[] SEC("license") = "GPL";
"""

NOPROG = r"""
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
SEC("tracepoint/syscalls/sys_enter_openat")
int tp(void *ctx) { return 0; }
char LICENSE[] SEC("license") = "GPL";
"""


@pytest.fixture(scope="module")
def objs(tmp_path_factory, corpus_build) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("exit_codes")
    out = {name: compile_bpf(src, d, name) for name, src in
           (("helper", HELPER), ("ok", OK), ("runaway", RUNAWAY), ("bigmap", BIGMAP), ("noprog", NOPROG))}
    junk = d / "junk.o"
    junk.write_text("not an object\n")
    out["junk"] = junk
    out["hello"] = corpus_build / "hello"
    return out


def documented_codes() -> set[int]:
    text = run_cli("--help").stdout
    return {int(m) for m in re.findall(r"^\s+(\d+)\s+\S", text.split("exit codes", 1)[1], re.M)}


TRUE = "/bin/true"
ATT = ["-a", f"on_work={TRUE}:main"]
#: (code, description, argv, needs the kernel backend); every documented code appears
CASES = [
    (0, "check ok", ["--check", "{ok}"], False),
    (1, "runaway program (runtime fault)", ["{runaway}", "--verifier", "off", "-a", "on_work={hello}:add",
                                           "--", "{hello}"], False),
    (2, "not an ELF (check)", ["--check", "{junk}"], False),
    (2, "not an ELF (run)", ["{junk}", "--", TRUE], False),
    (2, "no runnable program (check)", ["--check", "{noprog}"], False),
    (2, "no runnable program (run)", ["{noprog}", "--", TRUE], False),
    (3, "unknown helper (check)", ["--check", "{helper}"], False),
    (3, "unknown helper (run)", ["{helper}", *ATT, "--", TRUE], False),
    (3, "unknown helper (run, verifier off)", ["{helper}", "--verifier", "off", *ATT, "--", TRUE], False),
    (3, "unknown helper (kernel)", ["{helper}", "--backend", "kernel", *ATT, "--", TRUE], True),
    (4, "no such pid", ["{ok}", *ATT, "--pid", "999999999"], False),
    (4, "no such pid (kernel)", ["{ok}", "--backend", "kernel", *ATT, "--pid", "999999999"], True),
    (6, "map too big (check)", ["--check", "{bigmap}"], False),
    (6, "map too big (run)", ["{bigmap}", *ATT, "--", TRUE], False),
    (6, "map refused by the kernel", ["{bigmap}", "--backend", "kernel", *ATT, "--", TRUE], True),
    (64, "argparse error", ["{ok}", "--engine", "foo", "--", TRUE], False),
    (64, "no object", [], False),
    (64, "bad --max-insns", ["{ok}", "--max-insns", "x", "--", TRUE], False),
]


@pytest.mark.parametrize("code, what, argv, kernel", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_exit_code(objs, code, what, argv, kernel):
    if kernel and (reason := kernel_bpf_skip_reason()):
        pytest.skip(reason)
    p = run_cli(*[a.format(**{k: str(v) for k, v in objs.items()}) for a in argv], timeout=120)
    if code == 3 and "--check" in argv:
        assert "REJECTED" in p.stdout          # --check reports rejections as verdict lines
    elif code:
        assert_one_line_error(p)
    assert p.returncode == code, (what, p.stderr)


def test_kernel_backend_failure_is_5(objs):
    """Code 5: the kernel backend cannot use bpf() (an unprivileged user)."""
    reason = unprivileged_python_reason()
    if reason:
        pytest.skip(reason)
    p = run_cli(str(objs["ok"]), "--backend", "kernel", *ATT, "--", TRUE, user=NOBODY)
    assert_one_line_error(p, "kernel backend")
    assert p.returncode == 5


def test_internal_error_is_70_and_interrupt_130(monkeypatch, capsys):
    def boom(args):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(cli, "_dispatch", boom)
    assert cli.main(["--check", "x.o"]) == 70
    assert "internal error: RuntimeError: simulated bug" in capsys.readouterr().err

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_dispatch", interrupted)
    assert cli.main(["--check", "x.o"]) == 130


def test_every_documented_code_is_tested():
    tested = {c[0] for c in CASES} | {5, 70, 130}
    assert documented_codes() == tested


def test_skipped_section_is_one_warning_line(objs):
    p = run_cli("--check", str(objs["noprog"]))
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 2, p.stderr
    assert lines[0].startswith("ubpf-run: warning: ") and "skipping section" in lines[0]
    assert lines[1].startswith("ubpf-run: error: ") and "no runnable program" in lines[1]
