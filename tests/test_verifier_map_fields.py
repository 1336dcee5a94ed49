"""Reads of ``struct bpf_map`` fields through a map pointer (issue 15, false rejects).

``((struct bpf_map *)&my_map)->max_entries`` is accepted by the kernel for a privileged
loader: the map pointer is a pointer to the map type's kernel struct, walked with the
kernel's BTF.  ubpf-py accepts the fields that describe the loaded map (map_type, key_size,
value_size, max_entries, map_extra, map_flags) and the loader replaces each load by the
value, so every engine gives what the kernel gives; other fields are refused (not
supported), and what the kernel refuses is refused with its message.  Verdicts are checked
against the running kernel, values against ``--backend kernel`` on the same object.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from bpf_build import build_target_and_program, compile_bpf
from cli_util import run_cli
from kernel_verdict import kernel_skip_reason, kernel_verdict

from ubpf_py.errors import VerifierError
from ubpf_py.live.collection import Collection
from ubpf_py.obj import core
from ubpf_py.obj.btf import load_kernel_btf
from ubpf_py.obj.elf import load_object
from ubpf_py.verifier import verify_program

pytestmark = pytest.mark.skipif(load_kernel_btf() is None, reason="needs the kernel's BTF (/sys/kernel/btf/vmlinux)")

HEADER = r"""
#include <linux/bpf.h>
#include <linux/ptrace.h>
#include <bpf/bpf_helpers.h>

struct bpf_map {          /* CO-RE: the offsets come from the running kernel */
    enum bpf_map_type map_type;
    __u32 key_size;
    __u32 value_size;
    __u32 max_entries;
    __u64 map_extra;
    __u32 map_flags;
    __u32 id;
    void *ops;
} __attribute__((preserve_access_index));

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 77);
    __uint(map_flags, BPF_F_NO_PREALLOC);
    __type(key, __u32);
    __type(value, __u64);
} table SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 5);
    __type(key, __u32);
    __type(value, char[24]);
} arr SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_RINGBUF);
    __uint(max_entries, 8192);
} rb SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_BLOOM_FILTER);
    __uint(max_entries, 64);
    __uint(map_extra, 3);
    __type(value, __u32);
} bloom SEC(".maps");
"""

SOURCE = HEADER + r"""
SEC("uprobe") int hash_fields(void *ctx)
{
    struct bpf_map *m = (struct bpf_map *)&table;
    return m->max_entries * 1000000 + m->key_size * 10000 + m->value_size * 100 + m->map_type * 10
           + m->map_flags;
}

SEC("uprobe") int array_fields(void *ctx)
{
    struct bpf_map *m = (struct bpf_map *)&arr;
    return m->max_entries * 10000 + m->value_size * 100 + m->map_type;
}

SEC("uprobe") int ringbuf_fields(void *ctx)
{
    struct bpf_map *m = (struct bpf_map *)&rb;
    return m->max_entries + m->key_size + m->value_size + m->map_type;
}

SEC("uprobe") int bound_by_max_entries(void *ctx)
{
    struct bpf_map *m = (struct bpf_map *)&arr;
    __u32 n = m->max_entries, total = 0;
    for (__u32 i = 0; i < n && i < 64; i++) {
        __u32 k = i;
        if (bpf_map_lookup_elem(&arr, &k))
            total += 1;
    }
    return total;
}

SEC("uprobe") int write_field(void *ctx)
{
    struct bpf_map *m = (struct bpf_map *)&table;
    m->max_entries = 1;
    return 0;
}

SEC("uprobe") int read_ops_half(void *ctx)
{
    struct bpf_map *m = (struct bpf_map *)&table;
    return *(__u32 *)&m->ops;
}

SEC("uprobe") int read_id(void *ctx)
{
    struct bpf_map *m = (struct bpf_map *)&table;
    return m->id;
}

char LICENSE[] SEC("license") = "GPL";
"""

#: program -> (our error or None, the kernel's error or None)
EXPECTED = {
    "hash_fields": (None, None),
    "array_fields": (None, None),
    "ringbuf_fields": (None, None),
    "bound_by_max_entries": (None, None),
    "write_field": ("only read from bpf_htab is supported",) * 2,
    "read_ops_half": ("cannot access ptr member ops with moff 40 in struct bpf_map with off 40 size 4",) * 2,
    # the kernel gives the map's id; it has no meaning here: refused as not supported
    "read_id": ("reading field 'map.id' of struct bpf_htab through a map pointer is not supported", None),
}
#: what the programs return on every engine (the maps' own numbers)
VALUES = {"hash_fields": 77 * 1000000 + 4 * 10000 + 8 * 100 + 1 * 10 + 1,
          "array_fields": 5 * 10000 + 24 * 100 + 2, "ringbuf_fields": 8192 + 27,
          "bound_by_max_entries": 5}


@pytest.fixture(scope="module")
def obj_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_bpf(SOURCE, tmp_path_factory.mktemp("mapfields"), "mapfields")


def _relocated(obj_path: Path, name: str):
    spec = load_object(str(obj_path))
    p = spec.programs[name]
    return spec, dataclasses.replace(p, instructions=core.apply_core_relocs(p, spec.btf, strict=False))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_verdict(obj_path: Path, name: str) -> None:
    spec, p = _relocated(obj_path, name)
    r = verify_program(p, spec.maps, mode="warn")
    want = EXPECTED[name][0]
    assert r.ok == (want is None), r.error
    if want:
        assert r.error == want


@pytest.mark.skipif(kernel_skip_reason() is not None, reason=str(kernel_skip_reason()))
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_verdict_matches_kernel(obj_path: Path, name: str) -> None:
    spec, p = _relocated(obj_path, name)
    ok, line, _log = kernel_verdict(p, spec.maps)
    want = EXPECTED[name][1]
    assert ok == (want is None), line
    if want:
        assert line == want


@pytest.mark.parametrize("engine", ["interp", "jit"])
@pytest.mark.parametrize("name", sorted(VALUES))
def test_engines_read_the_loaded_maps_values(obj_path: Path, engine: str, name: str) -> None:
    coll = Collection.load(load_object(str(obj_path)), engine=engine, programs=[name])
    loaded = coll.program(name)
    assert loaded.run(coll.ctx_buffer.addr) == VALUES[name]
    # no load through the map pointer is left: the loader put the values in
    assert loaded.report.rewrites


def test_resized_map_gives_its_new_size(obj_path: Path) -> None:
    spec = load_object(str(obj_path))
    spec.maps[[m.name for m in spec.maps].index("arr")].max_entries = 9
    coll = Collection.load(spec, engine="interp", programs=["array_fields"])
    assert coll.program("array_fields").run(coll.ctx_buffer.addr) == 9 * 10000 + 24 * 100 + 2


def test_strict_load_of_unsupported_field_names_it(obj_path: Path) -> None:
    with pytest.raises(VerifierError, match=r"map\.id.*not supported"):
        Collection.load(load_object(str(obj_path)), engine="interp", programs=["read_id"])


# -- values against the kernel: the same object, run by ubpf-run on both backends -----------

TARGET = r"""
__attribute__((noinline)) int got(int n) { volatile int x = n; x += 1; x *= 3; return x / 3 - 1; }
int main(void) { return got(3) == 3 ? 0 : 1; }
"""

PRINTER = HEADER + r"""
SEC("uprobe//proc/self/exe:got") int fields(void *ctx)
{
    struct bpf_map *h = (struct bpf_map *)&table, *a = (struct bpf_map *)&arr;
    struct bpf_map *r = (struct bpf_map *)&rb, *b = (struct bpf_map *)&bloom;
    bpf_printk("hash %u %u %u", h->max_entries, h->key_size, h->value_size);
    bpf_printk("hash %u %u", h->map_type, h->map_flags);
    bpf_printk("array %u %u %u", a->max_entries, a->value_size, a->map_type);
    bpf_printk("ringbuf %u %u %u", r->max_entries, r->key_size, r->map_type);
    bpf_printk("bloom %u %u %u", b->max_entries, (__u32)b->map_extra, b->value_size);
    return 0;
}
char LICENSE[] SEC("license") = "GPL";
"""


@pytest.fixture(scope="module")
def printer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_target_and_program(tmp_path_factory.mktemp("mapfields_cli"), ("target", TARGET),
                                    ("printer", PRINTER))


def _printed(d: Path, *args: str) -> list[str]:
    p = run_cli("printer.bpf.o", "--map-size", "arr.max_entries=9", *args, "--", "./target", cwd=d)
    assert p.returncode == 0, p.stderr
    lines = [ln.rsplit("bpf_trace_printk: ", 1)[-1].strip() for ln in p.stdout.splitlines()]
    return [ln for ln in lines if ln.split(" ", 1)[0] in ("hash", "array", "ringbuf", "bloom")]


@pytest.mark.parametrize("engine,mode", [("interp", "ptrace"), ("jit", "ptrace"), ("jit", "intarget")])
def test_values_equal_the_kernels(printer: Path, engine: str, mode: str) -> None:
    ours = _printed(printer, "--engine", engine, "--mode", mode)
    assert ours == ["hash 77 4 8", "hash 1 1", "array 9 24 2", "ringbuf 8192 0 27", "bloom 64 3 4"], ours
    if (reason := kernel_skip_reason()) is not None:
        pytest.skip(reason)
    assert _printed(printer, "--backend", "kernel") == ours


# -- arithmetic on a map pointer ------------------------------------------------------------

#: (name, program, the kernel's error line or None) -- the kernel lets a map pointer take a known 0
ARITH = [
    ("map_ptr_plus_zero", "lddw %r1, 0xfa00000001\nmov %r2, 0\nadd %r1, %r2\nstw [%r10-4], 0\n"
     "mov %r2, %r10\nadd %r2, -4\ncall 1\nmov %r0, 0\nexit", None),
    ("zero_plus_map_ptr", "lddw %r2, 0xfa00000001\nmov %r1, 0\nadd %r1, %r2\nstw [%r10-4], 0\n"
     "mov %r2, %r10\nadd %r2, -4\ncall 1\nmov %r0, 0\nexit", None),
    ("map_ptr_plus_four", "lddw %r1, 0xfa00000001\nadd %r1, 4\nmov %r0, 0\nexit",
     "R1 pointer arithmetic on map_ptr prohibited"),
]


@pytest.mark.parametrize("name,text,error", ARITH, ids=[a[0] for a in ARITH])
def test_map_pointer_arithmetic(name: str, text: str, error: str | None) -> None:
    from test_verifier import MAPS, prog

    r = verify_program(prog(text), MAPS, mode="warn")
    assert r.ok == (error is None), r.error
    if error:
        assert r.error == error
    if kernel_skip_reason() is None:
        ok, line, _log = kernel_verdict(prog(text), MAPS)
        assert ok == (error is None), line
        if error:
            assert line == error
