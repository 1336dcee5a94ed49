"""USDT objects from both libbpf header generations: the spec layout comes from the
object's BTF (libbpf 1.0-1.6: 16-byte arg specs, 208-byte spec; 1.7+: bitfields,
24-byte arg specs, 304-byte spec, scaled-index operands).  Values are compared with
the kernel running the same object (``--backend kernel``)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from bpf_build import BPF_CFLAGS
from cli_util import assert_one_line_error, run_cli
from paths import REALWORLD

from ubpf_py.kernel.syscall import kernel_bpf_skip_reason
from ubpf_py.obj.elf import load_object
from ubpf_py.probe.usdt import encode_usdt_spec
from ubpf_py.probe.usdt_layout import LEGACY_LAYOUT, layout_from_btf

TARGET = r"""
#include <sys/sdt.h>
long arr[4] = {10, 20, 30, 40};
int main(void) {
	for (int i = 0; i < 3; i++) {
		DTRACE_PROBE3(libc, setjmp, &arr[i], i - 5, 0x1234L * i);
		/* a scaled-index operand (sdt.h emits these for array elements at -O2) */
		__asm__ volatile(
			"lea arr(%%rip), %%r9\n\tmov %0, %%rax\n"
			"990: nop\n"
			".pushsection .note.stapsdt,\"?\",\"note\"\n"
			".balign 4\n"
			".4byte 992f-991f, 994f-993f, 3\n"
			"991: .asciz \"stapsdt\"\n"
			"992: .balign 4\n"
			"993: .8byte 990b\n"
			".8byte _.stapsdt.base\n"
			".8byte 0\n"
			".asciz \"demo\"\n"
			".asciz \"sib\"\n"
			".asciz \"-8@8(%%r9,%%rax,8) -4@$-9\"\n"
			"994: .balign 4\n"
			".popsection\n" :: "r"((long)i) : "r9", "rax");
	}
	return 0;
}
"""

PROG = r"""
#include <stdbool.h>
#include <linux/bpf.h>
#include <linux/ptrace.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/usdt.bpf.h>
long sum1, sum2, sum3, sib_sum, konst, cookie_sum;
SEC("usdt/./t:libc:setjmp") int BPF_USDT(three, long *p, int i, long v)
{
	long x = 0;
	bpf_probe_read_user(&x, 8, p);
	sum1 += x; sum2 += i; sum3 += v; cookie_sum += bpf_usdt_cookie(ctx);
	return 0;
}
SEC("usdt") int BPF_USDT(sib, long v, int k) { sib_sum += v; konst += k; return 0; }
char LICENSE[] SEC("license") = "GPL";
"""

WANT = {"sum1": 60, "sum2": -12, "sum3": 0x1234 * 3, "cookie_sum": 15}
WANT_SIB = {"sib_sum": 90, "konst": -27}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("usdthdr")
    clang = shutil.which("clang")
    if clang is None or shutil.which("gcc") is None:
        pytest.skip("clang and gcc are needed")
    (d / "t.c").write_text(TARGET)
    r = subprocess.run(["gcc", "-O1", "-o", str(d / "t"), str(d / "t.c")], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot build an sdt.h target (systemtap-sdt-dev missing?): {r.stderr[:200]}")
    (d / "include" / "bpf").mkdir(parents=True)
    for h in (REALWORLD / "libbpf").glob("*.h"):  # the current headers, used from a tmp include dir
        shutil.copy(h, d / "include" / "bpf")
    (d / "u.bpf.c").write_text(PROG)
    for gen, inc in (("cur", d / "include"), ("sys", Path("/usr/include"))):
        subprocess.run([clang, *BPF_CFLAGS[:-1], "-g", f"-I{inc}", "-idirafter", "/usr/include/x86_64-linux-gnu",
                        "-c", str(d / "u.bpf.c"), "-o", str(d / f"u.{gen}.o")], check=True, capture_output=True)
    return d


def _values(stdout: str) -> dict[str, int]:
    return {n: int(v) for n, _, v in (ln.partition(" = ") for ln in stdout.splitlines()) if _ and v.lstrip("-").isdigit()}


def test_layouts_from_btf(built: Path) -> None:
    cur = layout_from_btf(load_object(built / "u.cur.o").btf)
    sys_ = layout_from_btf(load_object(built / "u.sys.o").btf)
    assert (cur.size, cur.arg_stride, cur.cookie_off, cur.cnt_off, cur.has_sib) == (304, 24, 288, 296, True)
    assert cur.arg_fields["arg_type"] == (64, 8) and cur.arg_fields["reg_off"] == (112, 16)
    assert sys_ == LEGACY_LAYOUT
    # the same argument spec, two encodings; the legacy one cannot hold a scaled index
    raw = encode_usdt_spec("-8@8(%r9,%rax,8) -4@$-9", 7, cur)
    assert len(raw) == 304 and raw[8] == 3 and int.from_bytes(raw[10:12], "little") == 80 | (3 << 12)
    assert int.from_bytes(raw[14:16], "little") == 64 and raw[288:296] == (7).to_bytes(8, "little")
    assert raw[296] == 2 and len(encode_usdt_spec("8@%rdi", 0, sys_)) == 208


@pytest.mark.parametrize("gen", ["cur", "sys"])
@pytest.mark.parametrize("backend", ["userspace", "kernel"])
def test_usdt_values_both_generations(built: Path, gen: str, backend: str) -> None:
    if backend == "kernel" and (reason := kernel_bpf_skip_reason()):
        pytest.skip(reason)
    attach = ["--attach", "three=./t:libc:setjmp@5"]
    if gen == "cur":
        attach += ["--attach", "sib=./t:demo:sib@7"]
    p = run_cli(f"u.{gen}.o", "--backend", backend, *attach, "--", "./t", cwd=built)
    assert p.returncode == 0, p.stderr
    want = WANT | (WANT_SIB if gen == "cur" else {})
    assert {k: v for k, v in _values(p.stdout).items() if k in want} == want


def test_scaled_index_needs_new_headers(built: Path) -> None:
    p = run_cli("u.sys.o", "--attach", "sib=./t:demo:sib", "--", "./t", cwd=built)
    assert_one_line_error(p, "scaled-index", "libbpf 1.7")
