"""Which programs may run in the target: a program that reads the result of a helper whose
in-target return value differs (trace_printk returns 0 once queued) stays on the ptrace path."""

from __future__ import annotations

import pytest

from ubpf_py.isa.asm import assemble
from ubpf_py.live.intarget import _calls_whose_flags_may_have, _calls_whose_result_is_read

PRINTK = frozenset({6})


@pytest.mark.parametrize("tail, read", [
    ("exit\n", False),                                         # a uprobe program's r0 is ignored
    ("mov %r0, 0\nexit\n", False),                              # overwritten first
    ("mov %r2, %r10\nlddw %r1, 0\ncall 1\nexit\n", False),     # another call overwrites r0
    ("add %r0, 1\nexit\n", True),                               # used
    ("mov %r6, %r0\nexit\n", True),                             # copied
    ("stxdw [%r10-8], %r0\nexit\n", True),                      # stored
    ("ldxdw %r1, [%r0+0]\nexit\n", True),                       # dereferenced
    ("jeq %r1, 0, +0\nexit\n", True),                           # a branch: assumed read (conservative)
])
def test_printk_result_reads(tail, read):
    insns = assemble("mov %r1, %r10\nmov %r2, 8\ncall 6\n" + tail)
    assert bool(_calls_whose_result_is_read(insns, PRINTK)) == read


@pytest.mark.parametrize("prog, refused", [
    ("mov %r4, 256\ncall 67\nexit\n", False),                       # BPF_F_USER_STACK only
    ("mov %r4, 2304\ncall 67\nexit\n", True),                       # | BPF_F_USER_BUILD_ID
    ("mov %r4, %r6\ncall 67\nexit\n", True),                        # not a constant
    ("mov %r4, 256\njeq %r1, 0, +1\nmov %r1, 0\ncall 67\nexit\n", True),   # a jump lands before the call
])
def test_get_stack_build_id_flag_keeps_the_ptrace_path(prog, refused):
    """The in-target runtime refuses BPF_F_USER_BUILD_ID (-EOPNOTSUPP) while the ptrace path supports
    it: a program that may pass it must not run in the target."""
    insns = assemble(prog)
    assert bool(_calls_whose_flags_may_have(insns, 67, 4, 1 << 11)) == refused


MAPS_PROG = r"""
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
char LICENSE[] SEC("license") = "GPL";
struct k { __u32 plen; __u32 addr; };
struct { __uint(type, BPF_MAP_TYPE_LPM_TRIE); __uint(max_entries, 16); __type(key, struct k);
	__type(value, __u64); __uint(map_flags, BPF_F_NO_PREALLOC); } trie SEC(".maps");
struct inner_trie { __uint(type, BPF_MAP_TYPE_LPM_TRIE); __uint(max_entries, 16); __type(key, struct k);
	__type(value, __u64); __uint(map_flags, BPF_F_NO_PREALLOC); } trie2 SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS); __uint(max_entries, 2); __type(key, __u32);
	__array(values, struct inner_trie); } tries SEC(".maps") = { .values = { [0] = &trie2 } };
struct { __uint(type, BPF_MAP_TYPE_STACK_TRACE); __uint(max_entries, 16); __type(key, __u32);
	__uint(value_size, 32 * 127); __uint(map_flags, BPF_F_STACK_BUILD_ID); } stacks SEC(".maps");
SEC("uprobe") int uses_tries(void *ctx)
{
	__u32 z = 0;
	return bpf_map_lookup_elem(&tries, &z) != 0;
}
SEC("uprobe") int uses_trie(void *ctx)
{
	struct k key = {32, 0x0100000a};
	__u64 *v = bpf_map_lookup_elem(&trie, &key);
	return v ? *v : 0;
}
SEC("uprobe") int uses_build_ids(void *ctx)
{
	return bpf_get_stackid(ctx, &stacks, BPF_F_USER_STACK);
}
"""


def test_a_map_without_native_operations_keeps_the_ptrace_path(tmp_path):
    """A map the runtime has no descriptor kind for would look empty in the target (lookups NULL,
    updates failing): the program stays on the ptrace path, naming the map; LPM tries and
    map-in-map have native forms."""
    from bpf_build import compile_bpf
    from intarget_fixture import needs_runtime

    if needs_runtime.args[0]:
        pytest.skip(needs_runtime.kwargs["reason"])
    from ubpf_py.intarget import runtime_obj
    from ubpf_py.intarget.arena import SharedArena
    from ubpf_py.live.collection import Collection
    from ubpf_py.live.intarget import _inner_map_reason, program_reason
    from ubpf_py.maps import consts as C
    from ubpf_py.maps import create_map
    from ubpf_py.obj.elf import load_object
    from ubpf_py.obj.spec import MapSpec

    obj = compile_bpf(MAPS_PROG, tmp_path, "maps")
    arena = SharedArena(8 << 20)
    coll = Collection.load(load_object(str(obj)), arena=arena)
    helpers = runtime_obj.helper_ids()
    assert program_reason(coll.program("uses_build_ids"), "strict", helpers) == \
        "map stacks (stack_trace) is not available in the target"
    assert program_reason(coll.program("uses_trie"), "strict", helpers) is None
    assert program_reason(coll.program("uses_tries"), "strict", helpers) is None
    outer = create_map(MapSpec("o", C.ARRAY_OF_MAPS, 4, 4, 2, inner=MapSpec("i", C.CGROUP_ARRAY, 4, 4, 2)),
                       alloc=arena)
    assert _inner_map_reason(outer) == "map o holds cgroup_array maps, which are not available in the target"
