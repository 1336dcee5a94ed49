"""Every section form libbpf accepts loads; auto-attach where libbpf would, --attach for
the rest; loader actions from the command line (--map-size, --no-autoload); warnings
print as one line.  Counts are compared with the kernel (``--backend kernel``)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from bpf_build import compile_bpf
from cli_util import assert_one_line_error, run_cli

from ubpf_py.kernel.syscall import kernel_bpf_skip_reason
from ubpf_py.live.loader_opts import apply_loader_options
from ubpf_py.obj.elf import load_object

TARGET = r"""
#include <sys/sdt.h>
__attribute__((noinline)) int work(int x) { __asm__ volatile(""); return x * 2; }
__attribute__((noinline)) int worry(int x) { __asm__ volatile(""); return x + 1; }
int main(void) {
	int s = 0;
	for (int i = 0; i < 3; i++) {
		s += work(i) + worry(i);
		DTRACE_PROBE1(sfx, tick, i);
	}
	return s == 12 ? 0 : 1;
}
"""

FORMS = r"""
#include <stdbool.h>
#include <linux/bpf.h>
#include <linux/ptrace.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/usdt.bpf.h>
__u64 bare, label, ret_sum, sleepy, multi, usdt_bare, usdt_auto, off, off_ret, optional;
struct { __uint(type, BPF_MAP_TYPE_HASH); __uint(max_entries, 4); __type(key, __u32); __type(value, __u64); }
    sized SEC(".maps");
SEC("uprobe") int bare_entry(struct pt_regs *ctx) { __sync_fetch_and_add(&bare, 1); return 0; }
SEC("uprobe/work") int label_entry(struct pt_regs *ctx) { __sync_fetch_and_add(&label, 1); return 0; }
SEC("uretprobe/./sfx:work") int auto_ret(struct pt_regs *ctx)
{ __sync_fetch_and_add(&ret_sum, (int)PT_REGS_RC(ctx)); return 0; }
SEC("uprobe.s/./sfx:work") int sleep_entry(struct pt_regs *ctx) { __sync_fetch_and_add(&sleepy, 1); return 0; }
SEC("uprobe.multi/./sfx:wor*") int multi_entry(struct pt_regs *ctx)
{
	__u32 k = multi; __u64 one = 1;   /* 6 distinct keys: 4 fit as declared, all fit when resized */
	bpf_map_update_elem(&sized, &k, &one, BPF_ANY);
	multi = k + 1; return 0;
}
SEC("usdt") int BPF_USDT(bare_usdt, int i) { __sync_fetch_and_add(&usdt_bare, i + 10); return 0; }
SEC("usdt/./sfx:sfx:tick") int BPF_USDT(auto_usdt, int i) { __sync_fetch_and_add(&usdt_auto, i + 100); return 0; }
SEC("uprobe/./sfx:work+0") int off_entry(struct pt_regs *ctx) { __sync_fetch_and_add(&off, 1); return 0; }
SEC("uretprobe/./sfx:work+4") int bad_ret(struct pt_regs *ctx) { __sync_fetch_and_add(&off_ret, 1); return 0; }
SEC("?uprobe/./sfx:worry") int opt_entry(struct pt_regs *ctx) { __sync_fetch_and_add(&optional, 1); return 0; }
char LICENSE[] SEC("license") = "GPL";
"""

#: what the kernel counts for one run of TARGET with MANUAL attachments (3 loop iterations)
EXPECTED = {"bare": 3, "label": 3, "ret_sum": 6, "sleepy": 3, "multi": 6, "usdt_bare": 33,
            "usdt_auto": 303, "off": 3, "off_ret": 0, "optional": 0}
MANUAL = ["--no-autoload", "bad_ret", "--attach", "bare_entry=./sfx:work", "--attach", "label_entry=./sfx",
          "--attach", "bare_usdt=./sfx:sfx:tick"]


@pytest.fixture(scope="module")
def forms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("forms")
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the target")
    (d / "sfx.c").write_text(TARGET)
    r = subprocess.run(["gcc", "-O1", "-o", str(d / "sfx"), str(d / "sfx.c")], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot build an sdt.h target (systemtap-sdt-dev missing?): {r.stderr[:200]}")
    compile_bpf(FORMS, d, "forms")
    return d


def _globals(stdout: str) -> dict[str, int]:
    out = {}
    for line in stdout.splitlines():
        name, sep, value = line.partition(" = ")
        if sep and name in EXPECTED:
            out[name] = int(value)
    return {k: out.get(k, 0) for k in EXPECTED}  # zero globals are not printed


def test_every_form_loads_and_checks(forms: Path) -> None:
    spec = load_object(forms / "forms.bpf.o")
    assert set(spec.programs) == {"bare_entry", "label_entry", "auto_ret", "sleep_entry", "multi_entry",
                                  "bare_usdt", "auto_usdt", "off_entry", "bad_ret", "opt_entry"}
    assert spec.programs["label_entry"].attach_label == "work"
    assert "uretprobes do not support" in spec.programs["bad_ret"].attach_error
    p = run_cli("--check", str(forms / "forms.bpf.o"))
    assert p.returncode == 0, p.stderr
    assert sorted(ln.split(":")[0] for ln in p.stdout.splitlines()) == sorted(spec.programs)


def test_unattachable_section_is_a_one_line_error(forms: Path) -> None:
    p = run_cli(str(forms / "forms.bpf.o"), "--", "./sfx", cwd=forms)
    assert_one_line_error(p, "label_entry cannot be auto-attached", "--attach label_entry=BINARY ")


@pytest.mark.parametrize("engine", ["jit", "interp"])
def test_forms_count_like_the_kernel(forms: Path, engine: str) -> None:
    p = run_cli(str(forms / "forms.bpf.o"), "--engine", engine, *MANUAL, "--", "./sfx", cwd=forms)
    assert p.returncode == 0, p.stderr
    assert _globals(p.stdout) == EXPECTED
    assert "attached multi_entry to uprobe ./sfx:worry+0" in p.stderr


def test_forms_kernel_oracle(forms: Path) -> None:
    reason = kernel_bpf_skip_reason()
    if reason:
        pytest.skip(reason)
    p = run_cli(str(forms / "forms.bpf.o"), "--backend", "kernel", *MANUAL, "--", "./sfx", cwd=forms)
    assert p.returncode == 0, p.stderr
    assert _globals(p.stdout) == EXPECTED
    for size, n in ((None, 4), ("64", 6)):
        extra = ["--map-size", f"sized.max_entries={size}"] if size else []
        for backend in ("kernel", "userspace"):
            p = run_cli(str(forms / "forms.bpf.o"), "--backend", backend, *MANUAL, *extra, "-f", "json",
                        "--", "./sfx", cwd=forms)
            sized = [json.loads(ln) for ln in p.stdout.splitlines() if '"name":"sized"' in ln]
            assert [len(m["entries"]) for m in sized] == [n], (backend, size, p.stderr)


def test_optional_program_attaches_when_asked(forms: Path) -> None:
    p = run_cli(str(forms / "forms.bpf.o"), *MANUAL, "--attach", "opt_entry=./sfx:worry", "--", "./sfx", cwd=forms)
    assert p.returncode == 0, p.stderr
    assert _globals(p.stdout)["optional"] == 3


def test_map_size_and_autoload_options(forms: Path) -> None:
    spec = load_object(forms / "forms.bpf.o")
    apply_loader_options(spec, ["sized.max_entries=64,value_size=16", "sized.key_size=8"], ["bad_ret"])
    m = spec.map_by_name("sized")
    assert (m.max_entries, m.value_size, m.key_size, m.value_type_id) == (64, 16, 8, 0)
    assert "bad_ret" not in spec.programs and "opt_entry" not in spec.programs  # SEC("?...") stays off
    # a resize the program relies on: 4 entries hold at most 4 of the 64 keys, 64 hold them all
    p = run_cli(str(forms / "forms.bpf.o"), *MANUAL, "--map-size", "sized.max_entries=64", "-f", "json",
                "--", "./sfx", cwd=forms)
    assert p.returncode == 0, p.stderr
    sized = [json.loads(ln) for ln in p.stdout.splitlines() if '"name":"sized"' in ln]
    assert [(m["max_entries"], len(m["entries"])) for m in sized] == [(64, 6)]
    for bad, words in ((["--map-size", "nope.max_entries=2"], ["no map 'nope'", "sized"]),
                       (["--map-size", "sized.flags=2"], ["unknown field 'flags'"]),
                       (["--map-size", "sized.max_entries=0"], ["between 1"]),
                       (["--resize", "forms.bss.max_entries=2"], ["global variables"]),
                       (["--no-autoload", "bare_entry"], ["both --attach and --no-autoload"]),
                       (["--no-autoload", "zzz"], ["no program 'zzz'"])):
        p = run_cli(str(forms / "forms.bpf.o"), *MANUAL, *bad, "--", "./sfx", cwd=forms)
        assert_one_line_error(p, *words)


def test_warnings_are_one_line(tmp_path: Path) -> None:
    obj = compile_bpf(r'''
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
SEC("fentry/do_unlinkat") int f(void *ctx) { return 0; }
SEC("uprobe") int u(void *ctx) { return 0; }
char LICENSE[] SEC("license") = "GPL";
''', tmp_path, "warn")
    p = run_cli("--check", str(obj))
    assert p.returncode == 0, p.stderr
    assert p.stderr.splitlines() == [f"ubpf-run: warning: {obj}: skipping section 'fentry/do_unlinkat': "
                                     "program type tracing (section 'fentry/do_unlinkat') is not a uprobe type"]
