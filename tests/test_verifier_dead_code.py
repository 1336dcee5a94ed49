"""Dead code as the kernel sees it: what only constants or frozen .rodata make unreachable
is neither verified nor a reason to refuse a program (issue 11, item 3).

The kernel does not walk branches its verifier decides, and replaces the code no path
reaches by traps before the program runs.  ubpf-py's verifier reports the reached
instructions and the loader replaces the rest the same way, so a helper the runtime
does not have, a kfunc call or a write to r10 in dead code does not stop a run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from bpf_build import compile_bpf
from kernel_verdict import kernel_skip_reason, kernel_verdict
from test_verifier import MAPS, prog

from ubpf_py.errors import HelperError
from ubpf_py.live.collection import Collection
from ubpf_py.obj.elf import load_object
from ubpf_py.obj.globals import set_global
from ubpf_py.verifier import DEAD_INSN, check_object, verify_program

SOURCE = r"""
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
extern void bpf_rcu_read_lock(void) __ksym;
extern void bpf_rcu_read_unlock(void) __ksym;
const volatile int use_numa = 0;

SEC("uprobe") int plain(void *ctx)
{
    if (use_numa)  /* false in .rodata: the kernel never visits the call */
        return bpf_get_numa_node_id() + 100;
    return 7;
}

SEC("uprobe") int with_kfunc(void *ctx)
{
    bpf_rcu_read_lock();
    bpf_rcu_read_unlock();
    return 0;
}
char LICENSE[] SEC("license") = "GPL";
"""

#: .rodata (map 3 of test_verifier.MAPS) holds 5 at offset 4: the write to r10 is dead
R10_IN_DEAD_CODE = ("lddw %r1, 0xfb00000003\nldxw %r2, [%r1+4]\nmov %r0, 0\njeq %r2, 5, +1\n"
                    "mov %r10, 0\nexit")


@pytest.fixture(scope="module")
def obj_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_bpf(SOURCE, tmp_path_factory.mktemp("deadcode"), "deadcode")


@pytest.mark.parametrize("engine", ["interp", "jit"])
def test_helper_behind_false_rodata_flag_runs(obj_path: Path, engine: str) -> None:
    spec = load_object(str(obj_path))
    coll = Collection.load(spec, engine=engine, programs=["plain"])
    loaded = coll.program("plain")
    assert loaded.run(coll.ctx_buffer.addr) == 7
    # the call to helper #42 is dead and was replaced by the kernel's trap instruction
    report = loaded.report
    dead = [i for i in range(len(loaded.instructions)) if i not in report.reachable]
    assert dead and all(loaded.instructions[i] == DEAD_INSN for i in dead)
    assert not any(ins.opcode == 0x85 and ins.imm == 42 for ins in loaded.instructions)


def test_helper_behind_true_flag_is_still_refused(obj_path: Path) -> None:
    spec = load_object(str(obj_path))
    set_global(spec, "use_numa", 1)
    with pytest.raises(HelperError, match="unknown helper #42"):
        Collection.load(spec, engine="interp", programs=["plain"])


def test_kfunc_in_one_program_does_not_reject_the_object(obj_path: Path) -> None:
    reports = {r.program: r for r in check_object(obj_path)}
    assert reports["plain"].ok
    assert not reports["with_kfunc"].ok and "kernel functions" in reports["with_kfunc"].error


def test_r10_write_in_dead_code_is_accepted() -> None:
    r = verify_program(prog(R10_IN_DEAD_CODE), MAPS, mode="warn")
    assert r.ok, r.log
    assert 5 not in r.reachable and 6 in r.reachable  # insn 5 is the write (lddw takes 2 slots)
    # reached, it is refused
    bad = R10_IN_DEAD_CODE.replace("jeq %r2, 5", "jeq %r2, 6")
    assert verify_program(prog(bad), MAPS, mode="warn").error == "frame pointer is read only"


def test_uninitialised_source_is_reported_before_the_frame_pointer() -> None:
    assert verify_program(prog("mov %r10, %r3\nexit"), MAPS, mode="warn").error == "R3 !read_ok"
    assert verify_program(prog("ldxdw %r10, [%r3+0]\nexit"), MAPS, mode="warn").error == "R3 !read_ok"


@pytest.mark.kernel
def test_kernel_agrees_on_dead_code(obj_path: Path) -> None:
    reason = kernel_skip_reason()
    if reason:
        pytest.skip(reason)
    assert kernel_verdict(prog(R10_IN_DEAD_CODE), MAPS)[0]
    assert kernel_verdict(prog("mov %r10, %r3\nexit"), MAPS)[1] == "R3 !read_ok"
    from ubpf_py.kernel.loader import load_collection

    coll = load_collection(load_object(str(obj_path)), programs=["plain"])
    coll.close()
