"""Stack limits over the call graph on compiled programs, against the running kernel.

The kernel's check_max_stack_depth: every frame of a call chain counts toward 512 bytes (the CI
kernel, 6.18, gives kprobe programs no private per-subprogram stacks), and the callers of a
subprogram that tail calls must use less than 256 bytes together (a tail call keeps them).
Each program is compiled with BTF, as libbpf loads it; the kernel's verdict comes from the
corpus's reference loader (``kernel_oracle --verify``).
"""

from __future__ import annotations

import json
import subprocess

import pytest
from bpf_build import compile_bpf
from kernel_verdict import kernel_skip_reason

from ubpf_py.verifier import verify_program

_HEAD = """
#include <linux/bpf.h>
#include <linux/ptrace.h>
#include <bpf/bpf_helpers.h>
char LICENSE[] SEC("license") = "GPL";
struct { __uint(type, BPF_MAP_TYPE_PROG_ARRAY); __uint(max_entries, 4); __type(key, __u32); __type(value, __u32); } jt SEC(".maps");
#define USE_STACK(n) __asm__ volatile("r2 = 0\\n\\t*(u64 *)(r10 - " #n ") = r2" ::: "r2")
"""

#: name -> (program body after _HEAD, the kernel's error line or None for an accept)
CASES = {
    "tail_call_under_272_bytes": ("""
static __noinline int sub(struct pt_regs *ctx) { bpf_tail_call(ctx, &jt, 0); return 1; }
SEC("uprobe") int prog(struct pt_regs *ctx) { USE_STACK(264); return sub(ctx); }
""", "tail_calls are not allowed when call stack of previous frames is 272 bytes. Too large"),
    "tail_call_under_240_bytes": ("""
static __noinline int sub(struct pt_regs *ctx) { bpf_tail_call(ctx, &jt, 0); return 1; }
SEC("uprobe") int prog(struct pt_regs *ctx) { USE_STACK(240); return sub(ctx); }
""", None),
    "two_frames_of_400": ("""
static __noinline int inner(int x) { USE_STACK(400); return x + 1; }
SEC("uprobe") int prog(struct pt_regs *ctx) { USE_STACK(400); return inner(ctx->rdi); }
""", "combined stack size of 2 calls is 800. Too large"),
    "frames_of_504_and_8": ("""
static __noinline int inner(int x) { USE_STACK(8); return x + 1; }
SEC("uprobe") int prog(struct pt_regs *ctx) { USE_STACK(504); return inner(ctx->rdi); }
""", "combined stack size of 2 calls is 528. Too large"),
    "frames_of_256_and_256": ("""
static __noinline int inner(int x) { USE_STACK(256); return x + 1; }
SEC("uprobe") int prog(struct pt_regs *ctx) { USE_STACK(256); return inner(ctx->rdi); }
""", None),
}


@pytest.fixture(scope="module")
def objects(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("stacklimits")
    return {name: compile_bpf(_HEAD + body, d, name) for name, (body, _err) in CASES.items()}


@pytest.mark.parametrize("name", sorted(CASES))
def test_stack_limits_match_the_kernel(objects, corpus_build, name: str) -> None:
    from ubpf_py.obj.elf import load_object

    want = CASES[name][1]
    spec = load_object(str(objects[name]))
    r = verify_program(spec.programs["prog"], spec.maps, mode="warn", btf=spec.btf)
    assert r.ok == (want is None), r.log
    if want:
        assert r.error == want, r.log
    if (reason := kernel_skip_reason()) is not None:
        pytest.skip(reason)
    out = subprocess.run([str(corpus_build / "kernel_oracle"), "--verify", str(objects[name])],
                         capture_output=True, text=True, timeout=60)
    doc = json.loads(out.stdout)
    assert (doc["verdict"], doc.get("error") or None) == ("accept" if want is None else "reject", want), doc
