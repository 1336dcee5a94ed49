"""Helper tables checked against the kernel, written to kill mutants that survived
``benchmarks/mutation_score.py`` (a changed id in the name table, the prototype list or
the kprobe allow list changed nothing any test looked at).

Every helper id is called from a minimal kprobe program (r2-r5 zero): the kernel's
verdict and first error line are the oracle for ubpf-py's, so a wrong name, a
missing prototype or a helper wrongly allowed or refused shows up as a difference.
"""

from __future__ import annotations

import pytest
from kernel_verdict import kernel_skip_reason, kernel_verdict
from test_verifier import MAPS, prog

from ubpf_py.helpers.protos import PROTOS
from ubpf_py.verifier import verify_program

#: deliberate differences, documented in ubpf_py/verifier/__init__.py: helpers taking BTF-typed
#: kernel objects are refused as not supported (the kernel first checks their arguments)
_NOT_SUPPORTED = frozenset(h for h, p in PROTOS.items() if p.btf_only)
#: bpf_probe_write_user: the kernel refuses it on a locked-down machine only (an environment fact)
_ENVIRONMENT = frozenset({36})


def _program(hid: int) -> str:
    return f"mov %r2, 0\nmov %r3, 0\nmov %r4, 0\nmov %r5, 0\ncall {hid}\nmov %r0, 0\nexit"


def _refused(error: str) -> bool:
    """The helper is not there for kprobe programs at all (rather than called wrongly)."""
    return error.startswith(("program of this type cannot use helper", "invalid func unknown#"))


@pytest.mark.kernel
def test_every_helper_id_gets_the_kernels_verdict() -> None:
    """Allowed or refused, for every id (helpers.protos.KPROBE_ALLOWED is the kernel's list);
    then the verdict and first line wherever ubpf-py models the helper's arguments."""
    reason = kernel_skip_reason()
    if reason:
        pytest.skip(reason)
    allow_differ, differ = {}, {}
    for hid in range(1, 216):         # 212.. are not helpers on Linux 6.18
        if hid in _ENVIRONMENT:
            continue
        text = _program(hid)
        r = verify_program(prog(text), MAPS, mode="warn")
        kernel = kernel_verdict(prog(text), MAPS)[:2]
        if _refused(r.error) != _refused(kernel[1]):
            allow_differ[hid] = (r.error, kernel[1])
        if hid not in _NOT_SUPPORTED and (r.ok, r.error) != kernel:
            differ[hid] = ((r.ok, r.error), kernel)
    assert not allow_differ, allow_differ
    assert not differ, differ


def test_classid_is_allowed_without_arguments() -> None:
    """bpf_get_cgroup_classid: kprobe programs get the no-argument form (kernel-checked above;
    it was refused while the allow list was derived from ubpf-py's prototypes)."""
    r = verify_program(prog("call 17\nexit"), MAPS, mode="warn")
    assert r.ok, r.log


def test_a_helper_the_kernel_allows_but_ubpf_py_does_not_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Allowed by the kernel, no prototype here: a clear not-supported refusal, never the
    kernel's "cannot use helper" (which would say the program is wrong)."""
    from ubpf_py.helpers import protos

    monkeypatch.delitem(protos.PROTOS, 17)
    r = verify_program(prog("call 17\nexit"), MAPS, mode="warn")
    assert r.error == "helper bpf_get_cgroup_classid#17 is not modelled by ubpf-py"
    assert r.hint.startswith("not supported: bpf_get_cgroup_classid")


def test_sleepable_helper_in_a_kprobe_program() -> None:
    """The kernel's reason (checked in the test above when root) without needing the kernel."""
    r = verify_program(prog(_program(148)), MAPS, mode="warn")
    assert r.error == "helper call might sleep in a non-sleepable prog"


def test_runtime_names_are_the_verifiers() -> None:
    """The runtime's error messages name helpers as the verifier (kernel-checked above) does."""
    from ubpf_py.helpers import helper_name as runtime_name
    from ubpf_py.helpers.protos import helper_name

    for hid in range(1, 212):
        assert runtime_name(hid) == helper_name(hid), hid


def test_strings_ending_at_the_last_byte_of_a_region() -> None:
    """A string whose NUL is the last byte of the program's memory is a string: the kernel's
    strncpy_from_kernel_nofault returns 1 (the NUL) and an empty format prints nothing and
    returns 0 (context.py#19/#26: the first byte checked as two)."""
    from test_helpers import Rig

    rig = Rig()
    last = rig.at(len(rig.buf) - 1)
    rig.buf.view[len(rig.buf) - 1] = 0
    rig.buf.view[0:8] = b"\xff" * 8
    assert rig.call(115, rig.at(0), 8, last) == 1          # bpf_probe_read_kernel_str
    assert bytes(rig.buf.view[0:2]) == b"\0\xff"
    assert rig.call(6, last, 1) == 0 and rig.printed == [""]   # bpf_trace_printk("")
    rig.buf.view[0] = ord("a")
    assert rig.call(182, rig.at(0), 1, last) == 1          # bpf_strncmp("a", 1, ""): 'a' > NUL


def test_bpf_loop_without_an_engine_is_a_clear_fault() -> None:
    """Called with no engine to run the callback (task_helpers.py#27: the check dropped, the
    call then failed with a TypeError instead of the VMFault the runner reports)."""
    from test_helpers import Rig

    from ubpf_py.errors import VMFault

    with pytest.raises(VMFault, match="callback support"):
        Rig().call(181, 3, 0x1000, 0, 0)


def test_printk_width_digits_are_1_to_9_first() -> None:
    """bpf_bprintf_prepare skips a width that starts with 1-9; any other character there is an
    unknown conversion: -EINVAL (printk_format.py#101: ':' taken for a digit)."""
    from test_helpers import EINVAL, Rig

    rig = Rig()
    for fmt, want in ((b"%:d\0", -EINVAL), (b"%9d\0", None)):
        rig.buf.view[0:len(fmt)] = fmt
        got = rig.call(6, rig.at(0), len(fmt), 5)
        if want is None:
            assert got > 0 and rig.printed[-1] == "        5"
        else:
            assert got == want
