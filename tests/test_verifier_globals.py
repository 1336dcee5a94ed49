"""Global functions are verified alone against their BTF signature, as the kernel does.

Each program calls one global function; the expected verdicts are the kernel's
(Linux 6.18, checked by ``test_global_functions_match_kernel`` when root).
Before, ubpf-py verified a global function with its caller's exact values and so
accepted bodies that dereference a pointer argument without a NULL check.
"""

from __future__ import annotations

import pytest
from bpf_build import compile_bpf
from kernel_verdict import kernel_skip_reason

from ubpf_py.obj.elf import load_object
from ubpf_py.verifier import verify_program

SOURCE = r"""
#include <linux/bpf.h>
#include <linux/ptrace.h>
#include <bpf/bpf_helpers.h>
#define __arg_ctx __attribute__((btf_decl_tag("arg:ctx")))
#define __arg_nonnull __attribute((btf_decl_tag("arg:nonnull")))
#define __arg_nullable __attribute((btf_decl_tag("arg:nullable")))
__noinline int g_mem(int *p) { return *p; }
__noinline int g_mem_ok(int *p) { return p ? *p : 0; }
__noinline int g_nonnull(int *p __arg_nonnull) { return *p; }
__noinline int g_ctx(void *ctx __arg_ctx) { return *(long *)(ctx + 160) & 1; }
__noinline int g_ctx_bad(void *ctx __arg_ctx) { return *(long *)(ctx + 168) & 1; }
__noinline int g_nullable(int *p __arg_nullable) { return 0; }
__noinline int g_void(void *p) { return 0; }
__noinline int g_big(struct pt_regs *ctx, long x) { return x > 3; }
SEC("uprobe") int unchecked_mem(void *ctx) { int x = 1; return g_mem(&x); }
SEC("uprobe") int checked_mem(void *ctx) { int x = 1; return g_mem_ok(&x); }
SEC("uprobe") int nonnull_ok(void *ctx) { int x = 1; return g_nonnull(&x); }
SEC("uprobe") int nonnull_small(void *ctx) { char c[2] = {}; asm volatile("" ::: "memory"); return g_nonnull((int *)&c[0]) + c[1]; }
SEC("uprobe") int ctx_ok(void *ctx) { return g_ctx(ctx); }
SEC("uprobe") int ctx_bad(void *ctx) { return g_ctx_bad(ctx); }
SEC("uprobe") int ctx_not_ctx(void *ctx) { int x = 0; return g_ctx(&x); }
SEC("uprobe") int nullable_tag(void *ctx) { int x = 0; return g_nullable(&x); }
SEC("uprobe") int void_ptr(void *ctx) { int x = 0; return g_void(&x); }
SEC("uprobe") int regs_and_scalar(struct pt_regs *ctx) { return g_big(ctx, ctx->rdi); }
SEC("uprobe") int scalar_as_ptr(struct pt_regs *ctx) { return g_big(ctx, (long)ctx); }
char LICENSE[] SEC("license") = "GPL";
"""

#: program -> None (accepted) or (kernel's error line, last line of the log)
EXPECTED = {
    "unchecked_mem": ("R1 invalid mem access 'mem_or_null'", None),
    "checked_mem": None,
    "nonnull_ok": None,
    "nonnull_small": ("invalid read from stack R1 off=-2 size=4", "Caller passes invalid args into func#1 ('g_nonnull')"),
    "ctx_ok": None,
    "ctx_bad": ("invalid bpf_context access off=168 size=8", None),
    "ctx_not_ctx": ("arg#0 expects pointer to ctx", "Caller passes invalid args into func#1 ('g_ctx')"),
    "regs_and_scalar": None,
    "scalar_as_ptr": ("R2 is not a scalar", "Caller passes invalid args into func#1 ('g_big')"),
}


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory):
    return load_object(str(compile_bpf(SOURCE, tmp_path_factory.mktemp("globals"), "globals")))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_global_function_signatures(spec, name: str) -> None:
    r = verify_program(spec.programs[name], spec.maps, mode="warn", btf=spec.btf)
    want = EXPECTED[name]
    if want is None:
        assert r.ok, r.log
        return
    assert not r.ok and r.error == want[0], r.log
    if want[1]:
        assert want[1] in r.log


@pytest.mark.kernel
def test_global_functions_match_kernel(spec) -> None:
    reason = kernel_skip_reason()
    if reason:
        pytest.skip(reason)
    from ubpf_py.errors import KernelBackendError
    from ubpf_py.kernel.loader import load_collection

    for name, want in EXPECTED.items():
        try:
            load_collection(spec, programs=[name]).close()
            assert want is None, f"{name}: kernel accepts"
        except KernelBackendError as e:
            assert want is not None, f"{name}: kernel rejects: {e}"
            assert want[0] in e.log and (want[1] is None or want[1] in e.log), e.log
