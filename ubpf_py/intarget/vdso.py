"""Addresses of a process's vDSO functions (``__vdso_clock_gettime`` for the runtime's
clocks: RUNTIME_HEADER.vdso_clock_gettime).

The vDSO is an ELF image the kernel maps into every process; its dynamic symbol
table gives offsets from its load address.  Read through ``/proc/<pid>/mem``
(the tracer may read its tracee; any process may read itself).
"""

from __future__ import annotations

import io

from elftools.elf.elffile import ELFFile


def _vdso_range(pid: int | str) -> tuple[int, int] | None:
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            if line.rstrip().endswith("[vdso]"):
                lo, hi = line.split()[0].split("-")
                return int(lo, 16), int(hi, 16)
    return None


def vdso_symbols(pid: int | str = "self") -> dict[str, int]:
    """``{name: address}`` of the vDSO's functions in process ``pid``; {} when it has none
    or its memory cannot be read."""
    rng = _vdso_range(pid)
    if rng is None:
        return {}
    lo, hi = rng
    try:
        with open(f"/proc/{pid}/mem", "rb") as f:
            f.seek(lo)
            raw = f.read(hi - lo)
    except OSError:
        return {}
    elf = ELFFile(io.BytesIO(raw))
    dynsym = elf.get_section_by_name(".dynsym")
    if dynsym is None:
        return {}
    # symbol values are relative to the image's first PT_LOAD vaddr (0 for the vDSO)
    first = min((s["p_vaddr"] for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"), default=0)
    return {s.name: lo + s["st_value"] - first for s in dynsym.iter_symbols()
            if s.name and s["st_info"]["type"] == "STT_FUNC" and s["st_shndx"] != "SHN_UNDEF"}
