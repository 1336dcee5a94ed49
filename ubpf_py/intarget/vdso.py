"""The target's vDSO: where its ``clock_gettime`` and ``getcpu`` are, without a syscall per hit.

Read from the target itself: ``AT_SYSINFO_EHDR`` in ``/proc/PID/auxv`` gives the vDSO's load
address; its dynamic symbol table (the image read through ``/proc/PID/mem``) gives the
functions.  The kernel maps the same vDSO in every process, but its address is per process
(ASLR) and changes at exec, so this is looked up per address space.
"""

from __future__ import annotations

import io
import os
import struct

from elftools.elf.elffile import ELFFile

from ubpf_py.abi.kernel import AT_HWCAP2, AT_SYSINFO_EHDR, HWCAP2_FSGSBASE
from ubpf_py.probe.procmaps import read_maps


def auxv(pid: int | str) -> dict[int, int]:
    with open(f"/proc/{pid}/auxv", "rb") as f:
        data = f.read()
    out = {}
    for k, v in struct.iter_unpack("<QQ", data):
        if k == 0:
            break
        out[k] = v
    return out


def vdso_symbols(pid: int | str = "self",
                 names: tuple[str, ...] = ("__vdso_clock_gettime", "__vdso_getcpu")) -> dict[str, int]:
    """Addresses of ``names`` in the vDSO of process ``pid`` (missing ones are left out)."""
    base = auxv(pid).get(AT_SYSINFO_EHDR, 0)
    if not base:
        return {}
    maps = read_maps(os.getpid() if pid == "self" else int(pid))
    size = next((m.end - m.start for m in maps if m.start == base and m.path == "[vdso]"), 0)
    if not size:
        return {}
    with open(f"/proc/{pid}/mem", "rb") as mem:
        mem.seek(base)
        image = mem.read(size)
    elf = ELFFile(io.BytesIO(image))
    dynsym = elf.get_section_by_name(".dynsym")
    if dynsym is None:
        return {}
    # symbol values are relative to the vDSO's link address (the lowest PT_LOAD's vaddr)
    link = min((s["p_vaddr"] for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"), default=0)
    out = {}
    for sym in dynsym.iter_symbols():
        if sym.name in names and sym["st_value"]:
            out[sym.name] = base + sym["st_value"] - link
    return out


def has_fsgsbase(pid: int | str = "self") -> bool:
    """Can the target use rdfsbase (CPU and kernel both allow it)?"""
    return bool(auxv(pid).get(AT_HWCAP2, 0) & HWCAP2_FSGSBASE)
