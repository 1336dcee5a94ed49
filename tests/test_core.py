"""CO-RE relocations: clang-built programs patched against hand-built and kernel BTF."""

from __future__ import annotations

from pathlib import Path

import pytest
from bpf_build import compile_bpf

from ubpf_py.errors import RelocationError
from ubpf_py.obj import btf as B
from ubpf_py.obj import btf_ext as X
from ubpf_py.obj.btf_builder import BtfBuilder
from ubpf_py.obj.core import POISON_HELPER, apply_core_relocs, default_targets, essential_name
from ubpf_py.obj.elf import load_object

SRC = r'''
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>

struct pt_regs { unsigned long di; unsigned long si; unsigned long ip; } __attribute__((preserve_access_index));
struct thing { int a; unsigned int lvl:5; long small; int gone; } __attribute__((preserve_access_index));
struct thing___v2 { long pad; } __attribute__((preserve_access_index));
struct missing { int z; } __attribute__((preserve_access_index));
enum mode { M_B = 1, M_GONE = 2 };

unsigned long long out[16];

SEC("uprobe") int good(struct pt_regs *ctx)
{
	struct thing *t = (void *)ctx->si;
	out[0] = ctx->di;
	out[1] = t->a;
	out[2] = BPF_CORE_READ_BITFIELD_PROBED(t, lvl);
	out[3] = t->small;
	out[4] = bpf_core_enum_value(enum mode, M_B);
	out[5] = bpf_core_field_exists(t->gone);
	out[6] = bpf_core_type_exists(struct missing);
	out[7] = bpf_core_type_size(struct thing);
	out[8] = bpf_core_field_size(t->small);
	out[9] = bpf_core_type_id_kernel(struct thing);
	out[10] = bpf_core_type_id_local(struct thing);
	out[11] = ((struct thing___v2 *)t)->pad;
	out[12] = bpf_core_enum_value_exists(enum mode, M_GONE);
	return 0;
}

SEC("uprobe") int bad(struct pt_regs *ctx)
{
	struct thing *t = (void *)ctx->si;
	out[0] = t->gone;
	return 0;
}
char LICENSE[] SEC("license") = "GPL";
'''


@pytest.fixture(scope="module")
def obj(tmp_path_factory: pytest.TempPathFactory):
    return load_object(compile_bpf(SRC, tmp_path_factory.mktemp("core"), "core"))


def target_btf() -> tuple[B.Btf, int]:
    """struct thing { long pad; int a; unsigned flags:3, lvl:5; short small; } (16 bytes), enum mode."""
    b = BtfBuilder()
    ulong = b.int("long unsigned int", 8)
    long_ = b.int("long", 8, signed=True)
    i32 = b.int("int", 4, signed=True)
    u32 = b.int("unsigned int", 4)
    i16 = b.int("short", 2, signed=True)
    regs = ["r15", "r14", "r13", "r12", "bp", "bx", "r11", "r10", "r9", "r8", "ax", "cx", "dx", "si", "di",
            "orig_ax", "ip", "cs", "flags", "sp", "ss"]
    b.struct("pt_regs", 168, [(n, ulong, 64 * i) for i, n in enumerate(regs)])
    thing = b.struct("thing", 16, [("pad", long_, 0), ("a", i32, 64), ("flags", u32, 96, 3), ("lvl", u32, 99, 5),
                                   ("small", i16, 112)])
    b.enum("mode", 4, [("M_A", 5), ("M_B", 9)])
    return b.build("test target"), thing


def _by_desc(obj, prog: str):
    p = obj.programs[prog]
    out = {}
    for r in p.core_relocs:
        out.setdefault((obj.btf.type(r.type_id).name, r.access, r.kind), []).append(r.insn_index)
    return p, out


def test_relocs_recorded(obj) -> None:
    p, rel = _by_desc(obj, "good")
    kinds = {k for (_, _, k) in rel}
    assert kinds == {X.CORE_FIELD_BYTE_OFFSET, X.CORE_FIELD_BYTE_SIZE, X.CORE_FIELD_EXISTS, X.CORE_FIELD_SIGNED,
                     X.CORE_FIELD_LSHIFT_U64, X.CORE_FIELD_RSHIFT_U64, X.CORE_TYPE_ID_LOCAL,
                     X.CORE_TYPE_ID_TARGET, X.CORE_TYPE_EXISTS, X.CORE_TYPE_SIZE, X.CORE_ENUMVAL_EXISTS,
                     X.CORE_ENUMVAL_VALUE}
    assert all(0 <= r.insn_index < len(p.instructions) for r in p.core_relocs)


def test_apply_against_built_target(obj) -> None:
    tb, thing_id = target_btf()
    p, rel = _by_desc(obj, "good")
    new = apply_core_relocs(p, obj.btf, tb)

    def at(name, access, kind):
        return [new[i] for i in rel[(name, access, kind)]]
    # pt_regs->di at 14*8, ->si at 13*8 (memory offsets)
    assert {i.off for i in at("pt_regs", "0:0", X.CORE_FIELD_BYTE_OFFSET)} == {112}
    assert {i.off for i in at("pt_regs", "0:1", X.CORE_FIELD_BYTE_OFFSET)} == {104}
    # t->a: local offset 0 -> 8
    assert {i.off for i in at("thing", "0:0", X.CORE_FIELD_BYTE_OFFSET)} == {8}
    # t->small: local long at 8 -> short at 14; the 8-byte load becomes a 2-byte load
    small = at("thing", "0:2", X.CORE_FIELD_BYTE_OFFSET)
    assert [(i.off, i.opcode) for i in small] == [(14, 0x69)]
    assert {i.imm for i in at("thing", "0:2", X.CORE_FIELD_BYTE_SIZE)} == {2}
    # bitfield lvl: bit 99, 5 bits, in a 4-byte unit at byte 12
    assert {i.imm for i in at("thing", "0:1", X.CORE_FIELD_BYTE_OFFSET)} == {12}
    assert {i.imm for i in at("thing", "0:1", X.CORE_FIELD_BYTE_SIZE)} == {4}
    assert {i.imm for i in at("thing", "0:1", X.CORE_FIELD_LSHIFT_U64)} == {64 - (99 + 5 - 96)}
    assert {i.imm for i in at("thing", "0:1", X.CORE_FIELD_RSHIFT_U64)} == {64 - 5}
    assert {i.imm for i in at("thing", "0:1", X.CORE_FIELD_SIGNED)} == {0}
    # enum value M_B = 9 in the target (lddw imm64)
    assert [i.imm64 for i in at("mode", "0", X.CORE_ENUMVAL_VALUE)] == [9]
    assert [i.imm64 for i in at("mode", "1", X.CORE_ENUMVAL_EXISTS)] == [0]
    # missing field / type -> 0
    assert {i.imm for i in at("thing", "0:3", X.CORE_FIELD_EXISTS)} == {0}
    assert [i.imm for i in at("missing", "0", X.CORE_TYPE_EXISTS)] == [0]
    assert [i.imm for i in at("thing", "0", X.CORE_TYPE_SIZE)] == [16]
    assert [i.imm64 for i in at("thing", "0", X.CORE_TYPE_ID_TARGET)] == [thing_id]
    local_id = obj.btf.find("thing", B.KIND_STRUCT)
    assert [i.imm64 for i in at("thing", "0", X.CORE_TYPE_ID_LOCAL)] == [local_id]
    # flavour thing___v2 matches target 'thing': pad at 0
    assert {i.off for i in at("thing___v2", "0:0", X.CORE_FIELD_BYTE_OFFSET)} == {0}
    # the spec itself is unchanged
    assert p.instructions[rel[("thing", "0:0", X.CORE_FIELD_BYTE_OFFSET)][0]].off == 0


def test_unresolvable_field_strict_and_poison(obj) -> None:
    tb, _ = target_btf()
    p = obj.programs["bad"]
    with pytest.raises(RelocationError, match=r"struct thing\.gone"):
        apply_core_relocs(p, obj.btf, tb)
    new = apply_core_relocs(p, obj.btf, tb, strict=False)
    r = next(r for r in p.core_relocs if obj.btf.type(r.type_id).name == "thing")
    assert new[r.insn_index].opcode == 0x85 and new[r.insn_index].imm == POISON_HELPER


def test_builtin_pt_regs_target(obj) -> None:
    """Without kernel BTF, pt_regs fields still resolve through the built-in layout."""
    from ubpf_py.obj.btf_builder import builtin_btf
    p = obj.programs["bad"]
    pr = builtin_btf()
    # 'bad' reads ctx->si (pt_regs, resolvable) and t->gone (no 'thing' in built-in BTF)
    with pytest.raises(RelocationError, match="thing"):
        apply_core_relocs(p, obj.btf, pr)
    new = apply_core_relocs(p, obj.btf, pr, strict=False)
    offs = [new[r.insn_index].off for r in p.core_relocs if obj.btf.type(r.type_id).name == "pt_regs"]
    assert offs == [104]


def test_kernel_btf_target(obj) -> None:
    kb = B.load_kernel_btf()
    if kb is None:
        pytest.skip("/sys/kernel/btf/vmlinux not readable")
    p, rel = _by_desc(obj, "good")
    new = apply_core_relocs(p, obj.btf, default_targets(), strict=False)
    regs = kb.find("pt_regs", B.KIND_STRUCT)
    di = kb.member(regs, "di")[1] // 8
    ip_ = kb.member(regs, "si")[1] // 8
    assert {new[i].off for i in rel[("pt_regs", "0:0", X.CORE_FIELD_BYTE_OFFSET)]} == {di}
    assert {new[i].off for i in rel[("pt_regs", "0:1", X.CORE_FIELD_BYTE_OFFSET)]} == {ip_}
    # the kernel has no 'struct thing' -> type_exists(struct missing) stays 0 and 'thing' reads are poisoned
    assert {new[i].imm for i in rel[("missing", "0", X.CORE_TYPE_EXISTS)]} == {0}
    assert all(new[i].imm == POISON_HELPER for i in rel[("thing", "0:0", X.CORE_FIELD_BYTE_OFFSET)])


def test_essential_name() -> None:
    assert essential_name("task_struct___v1") == "task_struct"
    assert essential_name("thing") == "thing"
    assert essential_name("a___b___c") == "a___b"
    assert essential_name("__x___") == "__x___"


def test_no_relocs_is_identity(corpus_build: Path) -> None:
    spec = load_object(corpus_build / "hello.bpf.o")
    p = spec.programs["add_entry"]
    assert apply_core_relocs(p, spec.btf, []) == p.instructions
