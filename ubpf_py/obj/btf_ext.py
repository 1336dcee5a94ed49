"""``.BTF.ext`` parser: func_info, line_info and CO-RE relocation records.

Records are grouped by ELF section name and keep the section-relative byte
offset of the instruction they describe (``insn_off``), exactly as clang emits
them; the ELF loader translates them to per-program instruction indices after
subprograms have been appended.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from ubpf_py.errors import BTFError
from ubpf_py.obj.btf import Btf

BTF_EXT_MAGIC = 0xEB9F

# enum bpf_core_relo_kind
CORE_FIELD_BYTE_OFFSET = 0
CORE_FIELD_BYTE_SIZE = 1
CORE_FIELD_EXISTS = 2
CORE_FIELD_SIGNED = 3
CORE_FIELD_LSHIFT_U64 = 4
CORE_FIELD_RSHIFT_U64 = 5
CORE_TYPE_ID_LOCAL = 6
CORE_TYPE_ID_TARGET = 7
CORE_TYPE_EXISTS = 8
CORE_TYPE_SIZE = 9
CORE_ENUMVAL_EXISTS = 10
CORE_ENUMVAL_VALUE = 11
CORE_TYPE_MATCHES = 12

CORE_KIND_NAMES = {
    0: "byte_off", 1: "byte_sz", 2: "field_exists", 3: "signed", 4: "lshift_u64",
    5: "rshift_u64", 6: "local_type_id", 7: "target_type_id", 8: "type_exists",
    9: "type_size", 10: "enumval_exists", 11: "enumval_value", 12: "type_matches",
}


@dataclass(slots=True)
class FuncInfoRec:
    insn_off: int
    type_id: int


@dataclass(slots=True)
class LineInfoRec:
    insn_off: int
    file_name: str
    line: str
    line_num: int
    col: int


@dataclass(slots=True)
class CoreReloRec:
    insn_off: int
    type_id: int
    access: str
    kind: int


@dataclass
class BtfExt:
    """Parsed .BTF.ext: records per ELF section name."""

    func_info: dict[str, list[FuncInfoRec]] = field(default_factory=dict)
    line_info: dict[str, list[LineInfoRec]] = field(default_factory=dict)
    core_relos: dict[str, list[CoreReloRec]] = field(default_factory=dict)


def _sections(data: bytes, start: int, length: int, min_rec: int, what: str, source: str):
    """Yield (section name offset, record size, [record offsets]) for one info block."""
    if length == 0:
        return
    end = start + length
    if end > len(data) or length < 4:
        raise BTFError(f"{source}: .BTF.ext {what} runs past the end of the section")
    (rec_size,) = struct.unpack_from("<I", data, start)
    if rec_size < min_rec:
        raise BTFError(f"{source}: .BTF.ext {what} record size {rec_size} is too small")
    pos = start + 4
    while pos < end:
        if pos + 8 > end:
            raise BTFError(f"{source}: .BTF.ext {what} is truncated")
        sec_off, n = struct.unpack_from("<II", data, pos)
        pos += 8
        if pos + n * rec_size > end:
            raise BTFError(f"{source}: .BTF.ext {what} has {n} records that do not fit")
        yield sec_off, [pos + i * rec_size for i in range(n)]
        pos += n * rec_size


def parse_btf_ext(data: bytes, btf: Btf, source: str = ".BTF.ext") -> BtfExt:
    if len(data) < 24:
        raise BTFError(f"{source}: .BTF.ext is truncated")
    magic, version, _flags, hdr_len = struct.unpack_from("<HBBI", data)
    if magic != BTF_EXT_MAGIC:
        raise BTFError(f"{source}: bad .BTF.ext magic {magic:#x}")
    if version != 1:
        raise BTFError(f"{source}: unsupported .BTF.ext version {version}")
    fi_off, fi_len, li_off, li_len = struct.unpack_from("<IIII", data, 8)
    cr_off = cr_len = 0
    if hdr_len >= 32:
        cr_off, cr_len = struct.unpack_from("<II", data, 24)
    ext = BtfExt()
    s = btf.string
    for sec_off, recs in _sections(data, hdr_len + fi_off, fi_len, 8, "func_info", source):
        ext.func_info[s(sec_off)] = [FuncInfoRec(*struct.unpack_from("<II", data, p)) for p in recs]
    for sec_off, recs in _sections(data, hdr_len + li_off, li_len, 16, "line_info", source):
        out = []
        for p in recs:
            insn_off, file_off, line_off, line_col = struct.unpack_from("<IIII", data, p)
            out.append(LineInfoRec(insn_off, s(file_off), s(line_off), line_col >> 10, line_col & 0x3FF))
        ext.line_info[s(sec_off)] = out
    if cr_len:
        for sec_off, recs in _sections(data, hdr_len + cr_off, cr_len, 16, "core_relo", source):
            out2 = []
            for p in recs:
                insn_off, type_id, access_off, kind = struct.unpack_from("<IIII", data, p)
                out2.append(CoreReloRec(insn_off, type_id, s(access_off), kind))
            ext.core_relos[s(sec_off)] = out2
    return ext
