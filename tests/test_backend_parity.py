"""The same command on both backends gives the same output: the target keeps ubpf-run's
stdin, ``/proc/self/exe`` names the target (not a launcher), printk text and decoded
records are equal in JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from bpf_build import build_target_and_program
from cli_util import REPO

from ubpf_py.kernel.syscall import kernel_bpf_skip_reason

TARGET = r"""
#include <stdio.h>
#include <string.h>
__attribute__((noinline)) int got(const char *line, int n) { __asm__ volatile("" :: "r"(line)); return n; }
int main(void) {
	char buf[64];
	while (fgets(buf, sizeof(buf), stdin)) got(buf, (int)strlen(buf));
	return 0;
}
"""

PROG = r"""
#include <linux/bpf.h>
#include <linux/ptrace.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
struct line { int n; char text[16]; };
struct { __uint(type, BPF_MAP_TYPE_RINGBUF); __uint(max_entries, 4096); } rb SEC(".maps");
SEC("uprobe//proc/self/exe:got") int BPF_KPROBE(got, const char *line, int n)
{
	struct line *l = bpf_ringbuf_reserve(&rb, sizeof(*l), 0);
	if (!l) return 0;
	l->n = n;
	bpf_probe_read_user_str(l->text, sizeof(l->text), line);
	bpf_ringbuf_submit(l, 0);
	bpf_printk("line of %d bytes\n", n);
	return 0;
}
char LICENSE[] SEC("license") = "GPL";
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_target_and_program(tmp_path_factory.mktemp("parity"), ("reader", TARGET), ("parity", PROG))


def _events(d: Path, backend: str) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.run([sys.executable, "-m", "ubpf_py.cli", "parity.bpf.o", "--backend", backend, "-f", "json",
                        "--", "./reader"], cwd=d, input="hello\nworld!\n", capture_output=True, text=True,
                       timeout=60, env=env)
    assert p.returncode == 0, p.stderr
    out = []
    for ev in map(json.loads, p.stdout.splitlines()):
        if ev["event"] == "printk":
            out.append({"printk": ev["message"]})
        elif ev["event"] == "record":
            out.append({"record": ev["fields"]})
        elif ev["event"] == "attached":
            out.append({"attached": ev["target"]})
    return out


def test_same_events_on_both_backends(built: Path) -> None:
    ours = _events(built, "userspace")
    assert {"printk": "line of 6 bytes"} in ours and {"record": {"n": 7, "text": "world!\n"}} in ours
    reason = kernel_bpf_skip_reason()
    if reason:
        pytest.skip(reason)
    kernel = _events(built, "kernel")
    # the kernel's trace_pipe and ring buffer are read separately: compare each stream in order
    for kind in ("attached", "printk", "record"):
        assert [e for e in kernel if kind in e] == [e for e in ours if kind in e], kind
