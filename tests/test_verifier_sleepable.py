"""Sleepable programs (``uprobe.s``: loaded with BPF_F_SLEEPABLE, as libbpf does) against the
kernel's verifier: the same programs verified sleepable and not, verdict and first error line
equal to the running kernel's (loaded with the flag, ``kernel_verdict``).

What differs when sleepable: helpers that may fault pages in (bpf_copy_from_user[_task]) are
allowed, pointers loaded from kernel objects are untrusted (no RCU read-side section), and only
some map types may be used at all (``verifier.sleepable``).
"""

from __future__ import annotations

import dataclasses

import pytest
from kernel_verdict import kernel_skip_reason, kernel_verdict
from test_verifier import MAPS, prog

from ubpf_py.abi.bpf import MapType
from ubpf_py.helpers.protos import MODELLED_MAP_TYPES
from ubpf_py.obj.btf import KIND_STRUCT, load_kernel_btf
from ubpf_py.obj.spec import MapSpec
from ubpf_py.verifier import verify_program

BTF = load_kernel_btf()
pytestmark = pytest.mark.skipif(BTF is None, reason="needs the kernel's BTF (/sys/kernel/btf/vmlinux)")

_NOT_SLEEPABLE = "helper call might sleep in a non-sleepable prog"
_MAP_RULE = "Sleepable programs can only use array, hash, ringbuf and local storage maps"
_BTF_ARG = "expected=ptr_, trusted_ptr_, rcu_ptr_"
_MEM_ARG = "expected=fp, pkt, pkt_meta, map_key, map_value, mem, ringbuf_mem, buf, trusted_ptr_"


def _off(struct: str, field: str) -> int:
    return BTF.member(BTF.find(struct, KIND_STRUCT), field)[1] // 8


#: bpf_copy_from_user_task(dst = fp-8, 8, user_ptr = 0, task = r4, flags = 0)
_CFUT = "mov %r1, %r10\nadd %r1, -8\nmov %r2, 8\nmov %r3, 0\nmov %r5, 0\ncall 191\nmov %r0, 0\nexit"
#: bpf_copy_from_user(dst = fp-8, 8, user_ptr = 0)
_CFU = "mov %r1, %r10\nadd %r1, -8\nmov %r2, 8\nmov %r3, 0\ncall 148\n"


def _cases() -> list[tuple[str, str, str, str]]:
    """(name, program, kernel's error when sleepable, when not)."""
    if BTF is None:
        return []
    parent, rparent, tgid, comm = (_off("task_struct", f) for f in ("parent", "real_parent", "tgid", "comm"))
    to_ringbuf = f"add %r2, {comm}\nlddw %r1, 0xfa00000002\nmov %r3, 16\nmov %r4, 0\ncall 130\nmov %r0, 0\nexit"
    return [
        ("copy_from_user", _CFU + "ldxdw %r0, [%r10-8]\nmov %r0, 0\nexit", "", _NOT_SLEEPABLE),
        ("copy_from_user_result_is_unbounded", _CFU + "mov %r1, %r10\nadd %r1, %r0\nstb [%r1-1], 0\nmov %r0, 0\nexit",
         "math between fp pointer and register with unbounded min value is not allowed", _NOT_SLEEPABLE),
        ("copy_from_user_task_current", "call 158\nmov %r4, %r0\n" + _CFUT, "", _NOT_SLEEPABLE),
        ("copy_from_user_task_spilled_task", "call 158\nstxdw [%r10-16], %r0\nldxdw %r4, [%r10-16]\n" + _CFUT,
         "", _NOT_SLEEPABLE),
        # the task argument is a BTF-typed pointer (ARG_PTR_TO_BTF_ID): ubpf-py took any value
        ("copy_from_user_task_scalar", "mov %r4, 0\n" + _CFUT, f"R4 type=scalar {_BTF_ARG}", _NOT_SLEEPABLE),
        ("copy_from_user_task_get_current_task", "call 35\nmov %r4, %r0\n" + _CFUT,
         f"R4 type=scalar {_BTF_ARG}", _NOT_SLEEPABLE),
        ("copy_from_user_task_ctx", "mov %r4, %r1\n" + _CFUT, f"R4 type=ctx {_BTF_ARG}", _NOT_SLEEPABLE),
        ("copy_from_user_task_stack", "mov %r4, %r10\n" + _CFUT, f"R4 type=fp {_BTF_ARG}", _NOT_SLEEPABLE),
        # a task loaded from the current one is untrusted in a sleepable program
        ("copy_from_user_task_parent", f"call 158\nldxdw %r4, [%r0+{rparent}]\n" + _CFUT,
         f"R4 type=untrusted_ptr_ {_BTF_ARG}", _NOT_SLEEPABLE),
        ("copy_from_user_task_fixed_offset", "call 158\nadd %r0, 8\nmov %r4, %r0\n" + _CFUT,
         "R4 is of type task_struct but task_struct is expected", _NOT_SLEEPABLE),
        ("copy_from_user_task_negative_offset", "call 158\nadd %r0, -8\nmov %r4, %r0\n" + _CFUT,
         "access beyond struct task_struct at off 4294967288 size 1", _NOT_SLEEPABLE),
        ("copy_from_user_task_variable_offset",
         "call 158\nmov %r6, %r0\ncall 7\nand %r0, 8\nadd %r6, %r0\nmov %r4, %r6\n" + _CFUT,
         "variable trusted_ptr_ access var_off=(0x0; 0x8) disallowed", _NOT_SLEEPABLE),
        # direct loads: real_parent is RCU-trusted only outside sleepable programs; loads through
        # either kind are allowed, passing them to a helper is not
        ("real_parent_tgid", f"call 158\nldxdw %r1, [%r0+{rparent}]\nldxw %r0, [%r1+{tgid}]\nexit", "", ""),
        ("parent_tgid", f"call 158\nldxdw %r1, [%r0+{parent}]\nldxw %r0, [%r1+{tgid}]\nexit", "", ""),
        ("real_parent_comm_to_helper", f"call 158\nldxdw %r2, [%r0+{rparent}]\n" + to_ringbuf,
         f"R2 type=untrusted_ptr_ {_MEM_ARG}", f"R2 type=rcu_ptr_ {_MEM_ARG}"),
        ("parent_comm_to_helper", f"call 158\nldxdw %r2, [%r0+{parent}]\n" + to_ringbuf,
         f"R2 type=untrusted_ptr_ {_MEM_ARG}", f"R2 type=untrusted_ptr_ {_MEM_ARG}"),
        ("current_comm_to_helper", "call 158\nmov %r2, %r0\n" + to_ringbuf, "", ""),
        # map lookups and ringbuf records work as in other programs
        ("hash_lookup", "stw [%r10-4], 0\nmov %r2, %r10\nadd %r2, -4\nlddw %r1, 0xfa00000000\ncall 1\n"
         "jeq %r0, 0, +1\nldxdw %r0, [%r0+0]\nmov %r0, 0\nexit", "", ""),
        ("ringbuf_record", "lddw %r1, 0xfa00000002\nmov %r2, 8\nmov %r3, 0\ncall 131\njeq %r0, 0, +3\n"
         "mov %r1, %r0\nmov %r2, 0\ncall 133\nmov %r0, 0\nexit", "", ""),
        # a prog array is not for sleepable programs: refused before anything is verified
        ("tail_call", "lddw %r2, 0xfa00000004\nmov %r3, 0\ncall 12\nmov %r0, 0\nexit", _MAP_RULE, ""),
        ("unreached_prog_array", "mov %r0, 0\njeq %r0, 0, +2\nlddw %r1, 0xfa00000004\nexit", _MAP_RULE, ""),
    ]


CASES = _cases()


def _verdicts(text: str, maps: list[MapSpec], sleepable: bool) -> tuple[tuple[bool, str], tuple[bool, str] | None]:
    p = dataclasses.replace(prog(text), sleepable=sleepable)
    r = verify_program(p, maps, mode="warn", time_budget=10)
    if kernel_skip_reason() is not None:
        return (r.ok, r.error), None
    return (r.ok, r.error), kernel_verdict(p, maps)[:2]


@pytest.mark.parametrize("name,text,sleepable_error,error", CASES, ids=[c[0] for c in CASES])
def test_sleepable_and_not_like_the_kernel(name: str, text: str, sleepable_error: str, error: str) -> None:
    for sleepable, want in ((True, sleepable_error), (False, error)):
        ours, kernel = _verdicts(text, MAPS, sleepable)
        assert ours == (not want, want), (sleepable, ours)
        if kernel is not None:
            assert kernel == ours, (sleepable, kernel)


def test_map_types_a_sleepable_program_may_use() -> None:
    """Every map type ubpf-py models, named by an lddw of a sleepable program: the kernel's
    verdict (it checks the map when the program is loaded, before verifying)."""
    if (reason := kernel_skip_reason()) is not None:
        pytest.skip(reason)
    sizes = {MapType.STACK_TRACE: (4, 8 * 127), MapType.QUEUE: (0, 8), MapType.STACK: (0, 8),
             MapType.LPM_TRIE: (8, 8), MapType.RINGBUF: (0, 0)}
    differ = {}
    for t in sorted(MODELLED_MAP_TYPES):
        key, value = sizes.get(t, (4, 4 if t in (3, 4, 8, 12, 13) else 8))
        m = MapSpec("m", t, key, value, 4096 if t == MapType.RINGBUF else 4,
                    flags=1 if t == MapType.LPM_TRIE else 0,
                    inner=MapSpec("i", MapType.ARRAY, 4, 8, 1) if t in (12, 13) else None)
        ours, kernel = _verdicts("lddw %r1, 0xfa00000000\nmov %r0, 0\nexit", [m], True)
        if ours != kernel:
            differ[MapType(t).name] = (ours, kernel)
    assert not differ, differ
