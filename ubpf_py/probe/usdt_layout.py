"""The layout of ``struct __bpf_usdt_spec``, read from the object's own BTF.

libbpf's ``usdt.bpf.h`` changed this struct between releases: up to 1.6 an
argument spec is 16 bytes (``u64 val_off; enum arg_type; short reg_off; bool
arg_signed; char arg_bitshift``); 1.7 made ``arg_type`` an 8-bit bitfield and
added ``idx_reg_off:12`` / ``scale_bitshift:4`` for scaled-index operands, which
makes it 24 bytes (the spec grows from 208 to 304).  The BPF side reads whatever
its header declared, so the loader must write what the *object* says, not what
one libbpf version says: every offset, bitfield and the argument count here come
from the object's BTF, with the 1.0-1.6 layout only for objects without BTF.
"""

from __future__ import annotations

from dataclasses import dataclass

from ubpf_py.errors import NotSupportedError, ObjectLoadError

SPEC_STRUCT = "__bpf_usdt_spec"
BPF_USDT_ARG_SIB = 3

#: (member, bit offset, bit size) of one argument spec in libbpf 1.0-1.6 (no BTF to read)
_LEGACY_ARG = (("val_off", 0, 64), ("arg_type", 64, 32), ("reg_off", 96, 16),
               ("arg_signed", 112, 8), ("arg_bitshift", 120, 8))


@dataclass(frozen=True)
class UsdtSpecLayout:
    """Where each field of ``struct __bpf_usdt_spec`` lives (bit offsets within one arg spec)."""

    size: int
    arg_stride: int
    max_args: int
    cookie_off: int
    cnt_off: int
    #: member name -> (bit offset within an arg spec, bit size)
    arg_fields: dict[str, tuple[int, int]]

    @property
    def has_sib(self) -> bool:
        return "idx_reg_off" in self.arg_fields and "scale_bitshift" in self.arg_fields

    def pack(self, args: list[dict[str, int]], cookie: int) -> bytes:
        """The spec bytes for ``args`` (one {member: value} per argument) and the user's cookie."""
        if len(args) > self.max_args:
            raise NotSupportedError(f"{len(args)} USDT arguments; the object's usdt.bpf.h holds {self.max_args}")
        buf = bytearray(self.size)
        for i, a in enumerate(args):
            for name, value in a.items():
                if name not in self.arg_fields:
                    raise NotSupportedError(f"USDT spec field {name} is not in this object's "
                                            f"struct __bpf_usdt_arg_spec (built with an older libbpf usdt.bpf.h)")
                bit, nbits = self.arg_fields[name]
                _put_bits(buf, i * self.arg_stride * 8 + bit, nbits, value)
        _put_bits(buf, self.cookie_off * 8, 64, cookie)
        _put_bits(buf, self.cnt_off * 8, 16, len(args))
        return bytes(buf)


LEGACY_LAYOUT = UsdtSpecLayout(size=208, arg_stride=16, max_args=12, cookie_off=192, cnt_off=200,
                               arg_fields={n: (o, b) for n, o, b in _LEGACY_ARG})


def _put_bits(buf: bytearray, bit: int, nbits: int, value: int) -> None:
    """Store ``value`` (two's complement, truncated) at a little-endian bit position."""
    mask = (1 << nbits) - 1
    first, last = bit // 8, (bit + nbits + 7) // 8
    word = int.from_bytes(buf[first:last], "little")
    shift = bit - first * 8
    word = (word & ~(mask << shift)) | ((value & mask) << shift)
    buf[first:last] = word.to_bytes(last - first, "little")


def layout_from_btf(btf: object | None) -> UsdtSpecLayout:
    """The layout the object's BTF declares (LEGACY_LAYOUT when the object has no such BTF)."""
    if btf is None:
        return LEGACY_LAYOUT
    from ubpf_py.obj.btf import KIND_ARRAY, KIND_STRUCT

    ids = btf.find_all(SPEC_STRUCT, KIND_STRUCT)  # type: ignore[attr-defined]
    if not ids:
        return LEGACY_LAYOUT
    spec = btf.type(ids[0])  # type: ignore[attr-defined]
    members = {m.name: m for m in spec.members}
    try:
        args_m, cookie_m, cnt_m = members["args"], members["usdt_cookie"], members["arg_cnt"]
    except KeyError as e:
        raise ObjectLoadError(f"struct {SPEC_STRUCT} in the object's BTF has no member {e}") from None
    arr = btf.resolved(args_m.type_id)  # type: ignore[attr-defined]
    if arr.kind != KIND_ARRAY or args_m.bit_offset:
        raise ObjectLoadError(f"struct {SPEC_STRUCT}: 'args' is not an array at offset 0")
    arg = btf.resolved(arr.elem_type)  # type: ignore[attr-defined]
    fields: dict[str, tuple[int, int]] = {}
    for m in arg.members:
        nbits = m.bitfield_size or 8 * btf.size_of(m.type_id)  # type: ignore[attr-defined]
        fields[m.name] = (m.bit_offset, nbits)
    for need in ("val_off", "arg_type", "reg_off", "arg_signed", "arg_bitshift"):
        if need not in fields:
            raise ObjectLoadError(f"struct __bpf_usdt_arg_spec in the object's BTF has no member '{need}'")
    return UsdtSpecLayout(size=spec.size, arg_stride=arg.size, max_args=arr.nelems,
                          cookie_off=cookie_m.bit_offset // 8, cnt_off=cnt_m.bit_offset // 8, arg_fields=fields)
