"""CO-RE on userspace types: relocated against the traced binary's own types (DWARF here,
.BTF when present), beyond what libbpf can do with the kernel's BTF; where no type
information exists the load fails naming the relocation, as libbpf's "failed to resolve
CO-RE relocation"."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from bpf_build import compile_bpf
from cli_util import assert_one_line_error, run_cli

from ubpf_py.obj.core_targets import binary_btf

TARGET = r"""
struct req { int kind; char pad[20]; long len; struct { short a, b; } inner; };
__attribute__((noinline)) long serve(struct req *r) { __asm__ volatile("" :: "r"(r) : "memory"); return r->len + r->inner.b; }
int main(void) {
	struct req r = {1, {0}, 4242, {7, 9}};
	for (int i = 0; i < 2; i++) { r.len += i; serve(&r); }
	return 0;
}
"""

# the program's idea of struct req is older: only the fields it reads, at other offsets
PROG = r"""
#include <linux/bpf.h>
#include <linux/ptrace.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
struct req { long len; struct { short a, b; } inner; long added_later; } __attribute__((preserve_access_index));
long total, b_sum, later = -1;
SEC("uprobe") int BPF_KPROBE(serve, struct req *r)
{
	total += BPF_CORE_READ_USER(r, len);
	b_sum += BPF_CORE_READ_USER(r, inner.b);
	/* a field this target does not have: the guarded read is poisoned and never reached */
	if (bpf_core_field_exists(r->added_later))
		later = BPF_CORE_READ_USER(r, added_later);
	return 0;
}
char LICENSE[] SEC("license") = "GPL";
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the target")
    d = tmp_path_factory.mktemp("coreuser")
    (d / "srv.c").write_text(TARGET)
    subprocess.run(["gcc", "-O1", "-g", "-o", str(d / "srv"), str(d / "srv.c")], check=True)
    subprocess.run(["gcc", "-O1", "-o", str(d / "srv_nodebug"), str(d / "srv.c")], check=True)
    compile_bpf(PROG, d, "core")
    return d


def test_target_dwarf_gives_the_layout(built: Path) -> None:
    btf = binary_btf(str(built / "srv"))
    assert btf is not None
    tid = btf.find("req")
    assert btf.size_of(tid) == 40 and btf.member(tid, "len")[1] == 24 * 8
    assert binary_btf(str(built / "srv_nodebug")) is None


@pytest.mark.parametrize("engine", ["jit", "interp"])
def test_fields_read_at_the_targets_offsets(built: Path, engine: str) -> None:
    p = run_cli("core.bpf.o", "--engine", engine, "--attach", "serve=./srv:serve", "--", "./srv", cwd=built)
    assert p.returncode == 0, p.stderr
    assert "total = 8485" in p.stdout and "b_sum = 18" in p.stdout and "later = -1" in p.stdout


@pytest.mark.parametrize("backend", ["userspace", "kernel"])
def test_no_type_information_fails_naming_the_relocation(built: Path, backend: str) -> None:
    if backend == "kernel":
        from ubpf_py.kernel.syscall import kernel_bpf_skip_reason

        if reason := kernel_bpf_skip_reason():
            pytest.skip(reason)
    p = run_cli("core.bpf.o", "--backend", backend, "--attach", "serve=./srv_nodebug:serve", "--", "./srv_nodebug",
                cwd=built)
    assert_one_line_error(p, "failed to resolve CO-RE relocation", "struct req", "len")


def test_unguarded_missing_field_fails_like_libbpf(built: Path) -> None:
    src = (built / "core.bpf.c").read_text().replace("if (bpf_core_field_exists(r->added_later))", "")
    compile_bpf(src, built, "core_unguarded")
    p = run_cli("core_unguarded.bpf.o", "--attach", "serve=./srv:serve", "--", "./srv", cwd=built)
    assert_one_line_error(p, "failed to resolve CO-RE relocation", "added_later")
