"""Maps that cannot be honoured are refused before anything runs (issue 12, item 3);
BPF_F_NO_PREALLOC hash maps allocate as they fill."""

from __future__ import annotations

import time

import pytest
from bpf_build import compile_bpf
from cli_util import assert_one_line_error, run_cli

from ubpf_py.errors import MapError
from ubpf_py.maps import consts as C
from ubpf_py.maps import create_map
from ubpf_py.maps.budget import memory_limit, parse_size, set_memory_limit
from ubpf_py.obj.spec import MapSpec


def _spec(t: int, max_entries: int, key: int = 4, value: int = 8, flags: int = 0, name: str = "m") -> MapSpec:
    return MapSpec(name=name, type=t, key_size=key, value_size=value, max_entries=max_entries, flags=flags)


@pytest.mark.parametrize("t, n, errno", [(C.HASH, 0xFFFFFFFF, C.E2BIG), (C.ARRAY, 0xFFFFFFFF, C.ENOMEM),
                                          (C.PERCPU_ARRAY, 0x10000001, C.ENOMEM),
                                          (C.LRU_HASH, 0x10000001, C.E2BIG)])
def test_absurd_sizes_refused_at_once(t, n, errno):
    t0 = time.monotonic()
    with pytest.raises(MapError) as ei:
        create_map(_spec(t, n, value=64))
    assert time.monotonic() - t0 < 1.0
    msg = str(ei.value)
    assert "'m'" in msg and str(n) in msg and "limit" in msg and "\n" not in msg
    assert ei.value.errno == errno
    assert msg.endswith("[E2BIG]" if errno == C.E2BIG else "[ENOMEM]")
    assert ei.value.exit_code == 6


def test_limit_is_settable():
    set_memory_limit(parse_size("64K"))
    try:
        assert memory_limit()[0] == 65536
        create_map(_spec(C.ARRAY, 1000))            # 8 KB: fits
        with pytest.raises(MapError, match="--map-memory-limit"):
            create_map(_spec(C.ARRAY, 100000))       # 800 KB: does not
    finally:
        set_memory_limit(None)
    assert parse_size("2G") == 2 << 30


def test_no_prealloc_hash_grows_with_stable_addresses():
    m = create_map(_spec(C.HASH, 1 << 24, flags=C.BPF_F_NO_PREALLOC))
    assert sum(r.end - r.start for r in m.regions()) == 0          # nothing allocated up front
    addrs = {}
    for i in range(10000):
        k = i.to_bytes(4, "little")
        assert m.update(k, (i * 3).to_bytes(8, "little"), C.BPF_ANY, None) == 0
        if i % 1000 == 0:
            addrs[k] = m.lookup_addr(k)
    for k, a in addrs.items():                     # values handed out earlier did not move
        assert m.lookup_addr(k) == a
    grown = sum(r.end - r.start for r in m.regions())
    assert 10000 * 8 <= grown < 1 << 22            # chunks for what was stored, not 16M entries
    assert m.lookup((9999).to_bytes(4, "little")) == (9999 * 3).to_bytes(8, "little")


BIG = r"""
#include <linux/bpf.h>
#include <linux/ptrace.h>
#include <bpf/bpf_helpers.h>
struct { __uint(type, BPF_MAP_TYPE_ARRAY); __uint(max_entries, 0x10000001); __type(key, __u32);
         __type(value, __u64); } big SEC(".maps");
SEC("uprobe")
int on_work(struct pt_regs *ctx) { __u32 k = 1; __u64 *v = bpf_map_lookup_elem(&big, &k);
                                   if (v) *v += 1; return 0; }
char LICENSE[] SEC("license") = "GPL";
"""


def test_cli_check_and_run_refuse_the_same_way(tmp_path):
    obj = compile_bpf(BIG, tmp_path, "big")
    chk = run_cli("--check", str(obj), "--map-memory-limit", "1G")
    line = assert_one_line_error(chk, "'big'", "268435457", "limit")
    assert chk.returncode == 6
    run = run_cli(str(obj), "--map-memory-limit", "1G", "-a", "on_work=/bin/true:main", "--", "/bin/true")
    assert run.returncode == 6
    assert assert_one_line_error(run, "'big'") == line


@pytest.mark.kernel
@pytest.mark.parametrize("t", [C.HASH, C.ARRAY])
def test_errno_matches_the_kernel(t):
    """The kernel is the oracle: the same absurd map gets the same errno from BPF_MAP_CREATE."""
    from ubpf_py.errors import KernelBackendError
    from ubpf_py.kernel.maps import KernelMap
    from ubpf_py.kernel.syscall import kernel_bpf_skip_reason

    if reason := kernel_bpf_skip_reason():
        pytest.skip(reason)
    with pytest.raises(KernelBackendError) as kern:
        KernelMap.create(t, 4, 8, 0xFFFFFFFF, name="absurd")
    with pytest.raises(MapError) as ours:
        create_map(_spec(t, 0xFFFFFFFF))
    assert ours.value.errno == kern.value.errno


def test_huge_array_dump_lists_only_nonzero_elements():
    """A fuzzed object's 16M-entry array used to take minutes to dump at exit, one key at a time."""
    from ubpf_py.api.maps import MapView
    from ubpf_py.output.values import ValueDecoder

    class _Owner:     # what a MapView reads a live map through (a loaded BPFObject)
        loaded = True

        def __init__(self, m):
            self.m = m

        def _raw_map(self, name):
            return self.m

    def snapshot_map(m):
        return MapView(m.spec, ValueDecoder(None), _Owner(m)).dump()

    m = create_map(_spec(C.ARRAY, 1 << 24))
    assert m.update((12345).to_bytes(4, "little"), (7).to_bytes(8, "little"), C.BPF_ANY, None) == 0
    t0 = time.monotonic()
    d = snapshot_map(m)
    assert time.monotonic() - t0 < 5
    assert d.entries == [((12345).to_bytes(4, "little"), (7).to_bytes(8, "little"))]
    small = create_map(_spec(C.ARRAY, 4))
    assert len(snapshot_map(small).entries) == 4          # small arrays: every element, as before
