"""Attach requests -> probe sites: the file offsets a request stands for, and the USDT specs.

``live.attach`` plans *what* goes where in symbolic terms; this module turns one
request into concrete ``(binary path, file offset, cookie)`` sites against a
process, and for USDT requests writes the argument specs libbpf's
``usdt.bpf.h`` reads (the site's attach cookie is then the spec id), the way
libbpf's ``bpf_program__attach_usdt`` does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ubpf_py.errors import SymbolError, UbpfError
from ubpf_py.live.attach import AttachRequest

USDT_SPECS_MAP = "__bpf_usdt_specs"


@dataclass(frozen=True)
class ProbeSite:
    """One breakpoint/uprobe to place."""

    path: str
    offset: int
    retprobe: bool = False
    cookie: int = 0
    #: file offset of a USDT semaphore to count up while attached (0: none)
    ref_ctr_offset: int = 0


class UsdtSpecs:
    """Spec ids for one loaded object: ``spec_id(note, cookie)`` allocates an id the way libbpf
    does and stores the encoded spec in ``__bpf_usdt_specs`` through ``update(key, value)``."""

    def __init__(self, max_specs: int, update: Callable[[bytes, bytes], int]) -> None:
        from ubpf_py.probe.usdt import UsdtSpecIds

        self._ids = UsdtSpecIds(max_specs)
        self._update = update

    def spec_id(self, note: Any, cookie: int) -> int:
        from ubpf_py.probe.usdt import encode_usdt_spec

        sid, new = self._ids.assign(note, cookie)
        if new:
            rc = self._update(sid.to_bytes(4, "little"), encode_usdt_spec(note, cookie))
            if rc:
                raise UbpfError(f"cannot store USDT spec {sid} in {USDT_SPECS_MAP} (error {rc})")
        return sid


def usdt_specs_for(maps: dict[str, Any]) -> UsdtSpecs:
    """The spec writer for an object's live maps (refused when it was not built with usdt.bpf.h)."""
    specs = maps.get(USDT_SPECS_MAP)
    if specs is None:
        raise UbpfError(f"the object has USDT programs but no {USDT_SPECS_MAP} map: "
                        f"build it with libbpf's usdt.bpf.h")
    max_entries = specs.spec.max_entries if hasattr(specs, "spec") else specs.max_entries
    return UsdtSpecs(max_entries, lambda k, v: specs.update(k, v, 0))


def resolve_sites(req: AttachRequest, pid: int, usdt_specs: Callable[[], UsdtSpecs]) -> tuple[list[ProbeSite], str]:
    """The sites of ``req`` in process ``pid`` and a note for the user (what was chosen).

    ``usdt_specs`` is called only for USDT requests (objects without USDT need no spec map)."""
    from ubpf_py.probe import resolve, symbols

    if req.usdt:
        from ubpf_py.probe import usdt

        path = resolve.resolve_binary(req.binary, pid=pid)
        notes = usdt.find_usdt(path, req.usdt[0], req.usdt[1])
        if not notes:
            raise SymbolError(f"no USDT probe {req.usdt[0]}:{req.usdt[1]} in {path} "
                              f"(list them with: ubpf-run --list 'usdt:{req.binary}:*')")
        specs = usdt_specs()
        sites = [ProbeSite(path, n.file_offset, cookie=specs.spec_id(n, req.cookie),
                           ref_ctr_offset=n.sema_offset or 0) for n in notes]
        return sites, f"{len(notes)} site(s) in {path}"
    if req.binary:
        path = resolve.resolve_binary(req.binary, pid=pid)
        return [ProbeSite(path, symbols.resolve_function(path, req.function, req.offset), req.retprobe,
                          req.cookie)], ""
    path, offset, detail = resolve.find_function_in_process(pid, req.function)
    return [ProbeSite(path, offset + req.offset, req.retprobe, req.cookie)], detail
