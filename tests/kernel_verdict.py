"""The kernel verifier's verdict on a spec-level program, for differential tests.

Maps are created from their ``MapSpec`` (flags included; read-only global data
is created ``BPF_F_RDONLY_PROG``, filled and frozen as libbpf does), the
program's map references are relocated to the new fds and the program is
loaded as a kprobe program, which is how ubpf-py's verifier models uprobes (with
BPF_F_SLEEPABLE when the spec is sleepable, as libbpf loads ``uprobe.s``).
"""

from __future__ import annotations

import os

from ubpf_py.obj.spec import MapSpec, ProgramSpec


def kernel_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root to load programs into the kernel verifier"
    try:
        from ubpf_py.kernel.syscall import kernel_bpf_skip_reason
    except ImportError as e:  # pragma: no cover
        return f"kernel backend unavailable: {e}"
    return kernel_bpf_skip_reason()


def kernel_error_line(log: str) -> str:
    """The kernel's reason: the first line after the last instruction trace line."""
    from ubpf_py.kernel.prog import _summary

    lines = [ln for ln in log.strip().splitlines() if ln.strip()]
    for k in range(len(lines) - 1, -1, -1):
        ln = lines[k]
        if (ln[:1].isdigit() and ": " in ln) or ln.startswith((";", "from ")):
            rest = [x for x in lines[k + 1:] if not x.startswith(("processed ", "verification time",
                                                                   "stack depth", "max_states"))]
            return rest[0] if rest else _summary(log)
    return _summary(log)


def _create(m: MapSpec):
    from ubpf_py.kernel.maps import KernelMap
    from ubpf_py.obj.mapdefs import BPF_F_RDONLY_PROG

    flags = m.flags | (BPF_F_RDONLY_PROG if m.readonly else 0)
    inner_fd = 0
    inner = None
    if m.inner is not None:
        inner = _create(m.inner)
        inner_fd = inner.fd
    try:
        km = KernelMap.create(m.type, m.key_size, m.value_size, m.max_entries, flags, name=m.name,
                              inner_map_fd=inner_fd)
    finally:
        if inner is not None:
            inner.close()
    if m.data is not None:
        km.update(bytes(m.key_size), bytes(m.data)[:m.value_size].ljust(m.value_size, b"\0"))
    if m.readonly:
        km.freeze()
    return km


def kernel_verdict(prog: ProgramSpec, maps: list[MapSpec], btf_fd: int = 0,
                   func_info: bytes | None = None) -> tuple[bool, str, str]:
    """(accepted, error line, whole log) from the running kernel's verifier."""
    from ubpf_py.errors import KernelBackendError
    from ubpf_py.kernel.loader import relocate_for_kernel
    from ubpf_py.kernel.prog import BPF_F_SLEEPABLE, KPROBE, prog_load

    used = {ins.imm for ins in prog.instructions if ins.opcode == 0x18 and ins.src in (5, 6)}
    kmaps = {}
    try:
        for i in sorted(used):
            kmaps[i] = _create(maps[i])
        fds = [kmaps[i].fd if i in kmaps else -1 for i in range(len(maps))]
        insns = relocate_for_kernel(prog.instructions, fds)
        kw: dict = {"prog_flags": BPF_F_SLEEPABLE} if prog.sleepable else {}
        if func_info is not None and btf_fd > 0:
            kw.update(btf_fd=btf_fd, func_info=func_info)
        try:
            fd = prog_load(insns, KPROBE, "GPL", prog_name=prog.name[:15], log_level=1, **kw)
        except KernelBackendError as e:
            return False, kernel_error_line(e.log), e.log
        os.close(fd)
        return True, "", ""
    finally:
        for km in kmaps.values():
            km.close()


def invalid_case_here(corpus_build, case: dict) -> dict:
    """An invalid-set manifest entry with this machine's kernel verdict where it differs.

    The manifest is one kernel's answer; kernels differ where a rule is optional (private
    per-subprogram stacks, 6.13+, are not given everywhere), and the kernel running here is the
    oracle.  Its verdict comes from the corpus's reference loader (``kernel_oracle --verify``);
    with no kernel that can load programs the manifest stands."""
    import json
    import subprocess

    oracle = corpus_build / "kernel_oracle"
    if kernel_skip_reason() is not None or not oracle.is_file():
        return case
    out = subprocess.run([str(oracle), "--verify", str(corpus_build / "invalid" / f"{case['name']}.o")],
                         capture_output=True, text=True, timeout=60)
    doc = json.loads(out.stdout)
    if doc["verdict"] == case["verdict"]:
        return case
    return {**case, "verdict": doc["verdict"], "kernel_error": doc.get("error") or None,
            "note": f"this machine's kernel differs from the manifest ({case.get('note', '')})"}
