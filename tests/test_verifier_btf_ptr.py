"""Direct loads through ``bpf_get_current_task_btf()`` (the kernel's PTR_TO_BTF_ID).

The kernel verifies ``task->pid`` as a load from a typed kernel pointer: constant offset
inside a member of the struct's BTF, read only, pointer members giving further typed
pointers.  Every case here is checked against the running kernel (loaded as a kprobe
program, as ubpf-py models uprobes): same verdict, same final error line.
"""

from __future__ import annotations

import pytest
from kernel_verdict import kernel_skip_reason, kernel_verdict
from test_verifier import MAPS, prog

from ubpf_py.obj.btf import KIND_STRUCT, load_kernel_btf
from ubpf_py.verifier import verify_program

BTF = load_kernel_btf()
pytestmark = pytest.mark.skipif(BTF is None, reason="needs the kernel's BTF (/sys/kernel/btf/vmlinux)")


def _off(struct: str, field: str) -> int:
    _m, bit = BTF.member(BTF.find(struct, KIND_STRUCT), field)
    return bit // 8


def _cases() -> list[tuple[str, str, str | None]]:
    if BTF is None:
        return []
    task = BTF.type(BTF.find("task_struct", KIND_STRUCT))
    pid, parent, mm, comm = (_off("task_struct", f) for f in ("pid", "real_parent", "mm", "comm"))
    tgid = _off("task_struct", "tgid")
    return [
        ("pid_tgid", f"call 158\nldxw %r1, [%r0+{pid}]\nldxw %r0, [%r0+{tgid}]\nadd %r0, %r1\nexit", None),
        ("parent_tgid", f"call 158\nldxdw %r1, [%r0+{parent}]\nldxw %r0, [%r1+{tgid}]\nexit", None),
        ("comm_bytes", f"call 158\nldxh %r0, [%r0+{comm + 6}]\nexit", None),
        ("const_add_then_load", f"call 158\nadd %r0, {pid}\nldxw %r0, [%r0+0]\nexit", None),
        ("negative", "call 158\nldxw %r0, [%r0-8]\nexit", "R0 is ptr_task_struct invalid negative access: off=-8"),
        ("beyond_struct", f"call 158\nldxdw %r0, [%r0+{task.size}]\nexit",
         f"access beyond struct task_struct at off {task.size} size 8"),
        ("half_pointer", f"call 158\nldxw %r0, [%r0+{parent}]\nexit",
         f"cannot access ptr member real_parent with moff {parent} in struct task_struct with off {parent} size 4"),
        ("variable_offset", "call 158\nmov %r6, %r0\ncall 7\nand %r0, 8\nadd %r6, %r0\nldxw %r0, [%r6+0]\nexit",
         "R6 is ptr_task_struct invalid variable offset: off=0, var_off=(0x0; 0x8)"),
        ("store_imm", f"call 158\nstw [%r0+{pid}], 1\nmov %r0, 0\nexit", "only read is supported"),
        ("store_reg", f"call 158\nmov %r1, 1\nstxw [%r0+{pid}], %r1\nmov %r0, 0\nexit", "only read is supported"),
        ("store_through_loaded", f"call 158\nldxdw %r1, [%r0+{mm}]\nstdw [%r1+0], 0\nmov %r0, 0\nexit",
         "only read is supported"),
        # a trusted pointer is never NULL: the NULL side (an invalid stack write) is dead
        ("trusted_not_null", "call 158\njeq %r0, 0, +2\nmov %r0, 0\nexit\nstdw [%r10+8], 0\nmov %r0, 0\nexit", None),
        # a pointer loaded from a field may be NULL: both sides are walked
        ("loaded_may_be_null", f"call 158\nldxdw %r1, [%r0+{mm}]\njeq %r1, 0, +2\nmov %r0, 0\nexit\n"
         "stdw [%r10+8], 0\nmov %r0, 0\nexit", "invalid write to stack R10 off=8 size=8"),
        ("probe_read_src", f"call 158\nmov %r3, %r0\nadd %r3, {pid}\nmov %r1, %r10\nadd %r1, -8\nmov %r2, 4\n"
         "call 113\nmov %r0, 0\nexit", None),
        ("return_pointer", "call 158\nexit", None),
        ("spill_and_fill", f"call 158\nstxdw [%r10-8], %r0\nldxdw %r1, [%r10-8]\nldxw %r0, [%r1+{pid}]\nexit", None),
        ("narrow_fill", "call 158\nstxdw [%r10-8], %r0\nldxw %r1, [%r10-8]\nmov %r0, 0\nexit",
         "invalid size of register fill"),
        ("into_map_value", "call 158\nmov %r6, %r0\nstw [%r10-4], 0\nlddw %r1, 0xfa00000001\nmov %r2, %r10\n"
         "add %r2, -4\ncall 1\njeq %r0, 0, +1\nstxdw [%r0+0], %r6\nmov %r0, 0\nexit", None),
        # a trusted task is readable memory for helpers (the kernel walks the BTF for the size)...
        ("helper_reads_comm", f"call 158\nmov %r2, %r0\nadd %r2, {comm}\nlddw %r1, 0xfa00000002\nmov %r3, 16\n"
         "mov %r4, 0\ncall 130\nmov %r0, 0\nexit", None),
        ("helper_reads_past_comm", f"call 158\nmov %r2, %r0\nadd %r2, {comm}\nlddw %r1, 0xfa00000002\n"
         "mov %r3, 17\nmov %r4, 0\ncall 130\nmov %r0, 0\nexit",
         f"access beyond the end of member comm (mend:{comm + 16}) in struct task_struct with off {comm} size 17"),
        # ... but never written by one
        ("helper_writes_task", f"call 158\nmov %r1, %r0\nadd %r1, {pid}\nmov %r2, 4\nmov %r3, 0\ncall 113\n"
         "mov %r0, 0\nexit", "bpf_probe_read_kernel() may write into memory pointed by R1 type=trusted_ptr_"),
        ("arith_32bit", "call 158\nadd32 %r0, 8\nmov %r0, 0\nexit", "R0 32-bit pointer arithmetic prohibited"),
        ("task_btf_is_not_a_scalar", "call 158\nmul %r0, 2\nexit",
         "R0 pointer arithmetic with *= operator prohibited"),
    ]


CASES = _cases()


@pytest.mark.parametrize("name,text,error", CASES, ids=[c[0] for c in CASES])
def test_verdict_and_message_equal_the_kernels(name: str, text: str, error: str | None) -> None:
    r = verify_program(prog(text), MAPS, mode="warn")
    assert r.ok == (error is None), (r.error, r.log)
    if error:
        assert r.error == error
    if (reason := kernel_skip_reason()) is not None:
        pytest.skip(reason)
    ok, line, _log = kernel_verdict(prog(text), MAPS)
    assert ok == (error is None), line
    if error:
        assert line == error


def test_loads_through_a_null_pointer_become_zero_moves() -> None:
    """task->mm has no userspace source: it is NULL here, so the load through it is replaced by
    ``r0 = 0`` (the kernel's faulting PROBE_MEM load) and both loads are named in a note."""
    mm = _off("task_struct", "mm")
    count = _off("mm_struct", "map_count")
    r = verify_program(prog(f"call 158\nldxdw %r1, [%r0+{mm}]\nldxw %r0, [%r1+{count}]\nexit"), MAPS, mode="warn")
    assert r.ok, r.log
    assert set(r.rewrites) == {2}
    assert (r.rewrites[2].opcode, r.rewrites[2].dst, r.rewrites[2].imm) == (0xB7, 0, 0)
    assert [n.split(" reads ")[1].split(" directly")[0] for n in r.notes] == ["task_struct.mm", "mm_struct.map_count"]


def test_fields_with_values_are_not_noted() -> None:
    pid, parent = _off("task_struct", "pid"), _off("task_struct", "real_parent")
    tgid = _off("task_struct", "tgid")
    r = verify_program(prog(f"call 158\nldxw %r2, [%r0+{pid}]\nldxdw %r1, [%r0+{parent}]\n"
                            f"ldxw %r0, [%r1+{tgid}]\nexit"), MAPS, mode="warn")
    assert r.ok and not r.notes and not r.rewrites, (r.log, r.notes)


# -- compiled C: what real tools write (filelife's BPF_CORE_READ(task, fs, pwd.mnt), direct loads) --

C_SOURCE = r"""
#include <vmlinux.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>

SEC("uprobe") int filelife_cwd(void *ctx)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task_btf();
	return BPF_CORE_READ(task, fs, pwd.mnt) != 0;
}
SEC("uprobe") int direct_ids(void *ctx)
{
	struct task_struct *t = bpf_get_current_task_btf();
	return t->pid + t->tgid + t->real_parent->tgid + t->group_leader->pid;
}
SEC("uprobe") int cred_uid(void *ctx)
{
	struct task_struct *t = bpf_get_current_task_btf();
	const struct cred *c = t->cred;
	return c ? c->uid.val : 0;
}
SEC("uprobe") int write_pid(void *ctx)
{
	struct task_struct *t = bpf_get_current_task_btf();
	t->pid = 1;
	return 0;
}
SEC("uprobe") int comm_word(void *ctx)
{
	struct task_struct *t = bpf_get_current_task_btf();
	return *(__u32 *)&t->comm[4];
}
char LICENSE[] SEC("license") = "GPL";
"""
C_EXPECTED = {"filelife_cwd": None, "direct_ids": None, "cred_uid": None, "comm_word": None,
              "write_pid": "only read is supported"}


@pytest.fixture(scope="module")
def c_obj(tmp_path_factory: pytest.TempPathFactory):
    import shutil
    import subprocess

    from bpf_build import BPF_CFLAGS
    from paths import build_realworld

    if shutil.which("clang") is None or shutil.which("bpftool") is None:
        pytest.skip("clang and bpftool (vmlinux.h) are needed")
    inc = build_realworld() / "include"
    d = tmp_path_factory.mktemp("btfptr")
    (d / "p.bpf.c").write_text(C_SOURCE)
    subprocess.run(["clang", *BPF_CFLAGS[:-1], "-g", f"-I{inc}", "-idirafter", "/usr/include/x86_64-linux-gnu",
                    "-c", str(d / "p.bpf.c"), "-o", str(d / "p.bpf.o")], check=True, capture_output=True)
    return d / "p.bpf.o"


@pytest.mark.parametrize("name", sorted(C_EXPECTED))
def test_compiled_programs_agree_with_the_kernel(c_obj, name: str) -> None:
    import dataclasses

    from ubpf_py.obj import core
    from ubpf_py.obj.elf import load_object

    spec = load_object(str(c_obj))
    p = spec.programs[name]
    p = dataclasses.replace(p, instructions=core.apply_core_relocs(p, spec.btf, strict=False))
    r = verify_program(p, spec.maps, mode="warn")
    want = C_EXPECTED[name]
    assert r.ok == (want is None), r.error
    if want:
        assert r.error == want
    if (reason := kernel_skip_reason()) is not None:
        pytest.skip(reason)
    ok, line, _log = kernel_verdict(p, spec.maps)
    assert ok == (want is None), line
    if want:
        assert line == want


def test_filelife_check_verdicts_equal_the_kernels() -> None:
    """libbpf-tools' filelife (bpf_get_current_task_btf + BPF_CORE_READ) under ``--check``: every
    program's verdict equals the kernel's.  filelife is not in ../shared/realworld; point
    UBPF_LIBBPF_TOOLS at a directory of libbpf-tools objects built against this kernel."""
    import os
    from pathlib import Path

    from cli_util import run_cli
    from test_realworld_tools import _kernel_verdict

    obj = Path(os.environ.get("UBPF_LIBBPF_TOOLS", "/nonexistent")) / "filelife.bpf.o"
    if not obj.exists():
        pytest.skip("set UBPF_LIBBPF_TOOLS to a directory holding a built filelife.bpf.o")
    p = run_cli("--check", str(obj), timeout=300)
    ours = {ln.split(":")[0]: ": OK" in ln for ln in p.stdout.splitlines() if " insns" in ln or ": REJECTED" in ln}
    assert ours.get("vfs_create") is True, p.stdout    # calls bpf_get_current_task_btf
    if (reason := kernel_skip_reason()) is not None:
        pytest.skip(reason)
    assert {n: _kernel_verdict(obj, n, []) for n in ours} == ours


def test_random_field_loads_agree_with_the_kernel() -> None:
    """Loads of random size at random offsets of task_struct and of the structs its pointer
    members lead to (unions, arrays, bitfields, nested and anonymous structs, holes, the end):
    ubpf-py's verdict and final message equal the kernel's for every one."""
    import random

    if (reason := kernel_skip_reason()) is not None:
        pytest.skip(reason)
    task = BTF.find("task_struct", KIND_STRUCT)
    tsize = BTF.type(task).size
    via = [(_off("task_struct", f), BTF.find(s, KIND_STRUCT)) for f, s in
           (("mm", "mm_struct"), ("fs", "fs_struct"), ("signal", "signal_struct"), ("real_parent", "task_struct"),
            ("cred", "cred"), ("files", "files_struct"))]
    rng = random.Random(7)
    differ = []
    for _ in range(150):
        size = rng.choice([1, 2, 4, 8])
        sfx = {1: "b", 2: "h", 4: "w", 8: "dw"}[size]
        if rng.random() < 0.5:
            text = f"call 158\nldx{sfx} %r0, [%r0+{rng.randrange(tsize + 16)}]\nmov %r0, 0\nexit"
        else:
            poff, sid = rng.choice(via)
            off = rng.randrange(BTF.type(sid).size + 8)
            text = f"call 158\nldxdw %r1, [%r0+{poff}]\nldx{sfx} %r0, [%r1+{off}]\nmov %r0, 0\nexit"
        r = verify_program(prog(text), MAPS, mode="warn")
        ok, line, _log = kernel_verdict(prog(text), MAPS)
        if r.ok != ok or (not ok and r.error != line):
            differ.append((text, r.error, line))
    assert not differ, differ[:5]
