"""Helper prototypes: what each helper takes and returns, and who may call it.

The verifier checks every helper call against these prototypes, and the
runtime's helper table uses the same ids and names.  The facts come from the
kernel's ``struct bpf_func_proto`` definitions (kernel/trace/bpf_trace.c,
kernel/bpf/helpers.c, kernel/bpf/ringbuf.c) and from which helpers
``kprobe_prog_func_proto`` hands to a kprobe (= uprobe) program.

Argument kinds (the kernel's ``enum bpf_arg_type``, simplified):

``anything``        any initialised value (ARG_ANYTHING)
``map``             pointer to a map (ARG_CONST_MAP_PTR)
``map_key``         pointer to ``key_size`` readable bytes (ARG_PTR_TO_MAP_KEY)
``map_value``       pointer to ``value_size`` readable bytes (ARG_PTR_TO_MAP_VALUE)
``uninit_map_value`` pointer to ``value_size`` bytes the helper writes
``mem``             readable memory; its size is the next argument (ARG_PTR_TO_MEM | MEM_RDONLY)
``mem_or_null``     like ``mem`` or NULL (PTR_MAYBE_NULL)
``uninit_mem``      memory the helper fills; size is the next argument (ARG_PTR_TO_UNINIT_MEM)
``size``            constant-bounded size > 0 for the previous argument (ARG_CONST_SIZE)
``size_or_zero``    same, may be 0 (ARG_CONST_SIZE_OR_ZERO)
``alloc_size``      known-constant allocation size (ARG_CONST_ALLOC_SIZE_OR_ZERO)
``ctx``             the program's context pointer (ARG_PTR_TO_CTX)
``func``            a callback function pointer (ARG_PTR_TO_FUNC)
``stack_or_null``   pointer to the stack, or NULL (ARG_PTR_TO_STACK_OR_NULL)
``ringbuf_mem``     a reserved ringbuf record, released by the call (ARG_PTR_TO_RINGBUF_MEM | OBJ_RELEASE)
``const_str``       pointer into a read-only map holding a NUL-terminated string (ARG_PTR_TO_CONST_STR)
``long_out``        8 aligned bytes the helper writes (ARG_PTR_TO_FIXED_SIZE_MEM | MEM_UNINIT | MEM_ALIGNED)
``btf_task``        a ``struct task_struct *`` the kernel trusts (ARG_PTR_TO_BTF_ID, the task's BTF id)

Return kinds: ``int`` (unknown scalar), ``void``, ``map_value_or_null``,
``ringbuf_mem_or_null``, ``btf_task`` (bpf_get_current_task_btf's trusted task),
``btf_pt_regs`` (RET_PTR_TO_BTF_ID ``struct pt_regs *``: bpf_task_pt_regs).
"""

from __future__ import annotations

from dataclasses import dataclass

#: kernel helper names by id (enum bpf_func_id, <linux/bpf.h> __BPF_FUNC_MAPPER order)
HELPER_NAMES_BY_ID: tuple[str, ...] = (
    "unspec", "map_lookup_elem", "map_update_elem", "map_delete_elem", "probe_read", "ktime_get_ns",
    "trace_printk", "get_prandom_u32", "get_smp_processor_id", "skb_store_bytes", "l3_csum_replace",
    "l4_csum_replace", "tail_call", "clone_redirect", "get_current_pid_tgid", "get_current_uid_gid",
    "get_current_comm", "get_cgroup_classid", "skb_vlan_push", "skb_vlan_pop", "skb_get_tunnel_key",
    "skb_set_tunnel_key", "perf_event_read", "redirect", "get_route_realm", "perf_event_output",
    "skb_load_bytes", "get_stackid", "csum_diff", "skb_get_tunnel_opt", "skb_set_tunnel_opt",
    "skb_change_proto", "skb_change_type", "skb_under_cgroup", "get_hash_recalc", "get_current_task",
    "probe_write_user", "current_task_under_cgroup", "skb_change_tail", "skb_pull_data", "csum_update",
    "set_hash_invalid", "get_numa_node_id", "skb_change_head", "xdp_adjust_head", "probe_read_str",
    "get_socket_cookie", "get_socket_uid", "set_hash", "setsockopt", "skb_adjust_room", "redirect_map",
    "sk_redirect_map", "sock_map_update", "xdp_adjust_meta", "perf_event_read_value",
    "perf_prog_read_value", "getsockopt", "override_return", "sock_ops_cb_flags_set",
    "msg_redirect_map", "msg_apply_bytes", "msg_cork_bytes", "msg_pull_data", "bind", "xdp_adjust_tail",
    "skb_get_xfrm_state", "get_stack", "skb_load_bytes_relative", "fib_lookup", "sock_hash_update",
    "msg_redirect_hash", "sk_redirect_hash", "lwt_push_encap", "lwt_seg6_store_bytes",
    "lwt_seg6_adjust_srh", "lwt_seg6_action", "rc_repeat", "rc_keydown", "skb_cgroup_id",
    "get_current_cgroup_id", "get_local_storage", "sk_select_reuseport", "skb_ancestor_cgroup_id",
    "sk_lookup_tcp", "sk_lookup_udp", "sk_release", "map_push_elem", "map_pop_elem", "map_peek_elem",
    "msg_push_data", "msg_pop_data", "rc_pointer_rel", "spin_lock", "spin_unlock", "sk_fullsock",
    "tcp_sock", "skb_ecn_set_ce", "get_listener_sock", "skc_lookup_tcp", "tcp_check_syncookie",
    "sysctl_get_name", "sysctl_get_current_value", "sysctl_get_new_value", "sysctl_set_new_value",
    "strtol", "strtoul", "sk_storage_get", "sk_storage_delete", "send_signal", "tcp_gen_syncookie",
    "skb_output", "probe_read_user", "probe_read_kernel", "probe_read_user_str",
    "probe_read_kernel_str", "tcp_send_ack", "send_signal_thread", "jiffies64", "read_branch_records",
    "get_ns_current_pid_tgid", "xdp_output", "get_netns_cookie", "get_current_ancestor_cgroup_id",
    "sk_assign", "ktime_get_boot_ns", "seq_printf", "seq_write", "sk_cgroup_id",
    "sk_ancestor_cgroup_id", "ringbuf_output", "ringbuf_reserve", "ringbuf_submit", "ringbuf_discard",
    "ringbuf_query", "csum_level", "skc_to_tcp6_sock", "skc_to_tcp_sock", "skc_to_tcp_timewait_sock",
    "skc_to_tcp_request_sock", "skc_to_udp6_sock", "get_task_stack", "load_hdr_opt", "store_hdr_opt",
    "reserve_hdr_opt", "inode_storage_get", "inode_storage_delete", "d_path", "copy_from_user",
    "snprintf_btf", "seq_printf_btf", "skb_cgroup_classid", "redirect_neigh", "per_cpu_ptr",
    "this_cpu_ptr", "redirect_peer", "task_storage_get", "task_storage_delete", "get_current_task_btf",
    "bprm_opts_set", "ktime_get_coarse_ns", "ima_inode_hash", "sock_from_file", "check_mtu",
    "for_each_map_elem", "snprintf", "sys_bpf", "btf_find_by_name_kind", "sys_close", "timer_init",
    "timer_set_callback", "timer_start", "timer_cancel", "get_func_ip", "get_attach_cookie",
    "task_pt_regs", "get_branch_snapshot", "trace_vprintk", "skc_to_unix_sock", "kallsyms_lookup_name",
    "find_vma", "loop", "strncmp", "get_func_arg", "get_func_ret", "get_func_arg_cnt", "get_retval",
    "set_retval", "xdp_get_buff_len", "xdp_load_bytes", "xdp_store_bytes", "copy_from_user_task",
    "skb_set_tstamp", "ima_file_hash", "kptr_xchg", "map_lookup_percpu_elem", "skc_to_mptcp_sock",
    "dynptr_from_mem", "ringbuf_reserve_dynptr", "ringbuf_submit_dynptr", "ringbuf_discard_dynptr",
    "dynptr_read", "dynptr_write", "dynptr_data", "tcp_raw_gen_syncookie_ipv4",
    "tcp_raw_gen_syncookie_ipv6", "tcp_raw_check_syncookie_ipv4", "tcp_raw_check_syncookie_ipv6",
    "ktime_get_tai_ns", "user_ringbuf_drain", "cgrp_storage_get", "cgrp_storage_delete"

)


@dataclass(frozen=True, slots=True)
class HelperProto:
    id: int
    name: str
    args: tuple[str, ...]
    ret: str = "int"
    #: the value range the kernel gives the result (do_refine_retval_range): "str" -> [min, size]
    ret_refine: str = ""
    #: map types this helper accepts for its map argument (None: any map that is not special)
    map_types: frozenset[int] | None = None
    #: callback signature for ``func`` args: "loop" or "for_each"
    callback: str = ""
    #: only sleepable programs may call it (copy_from_user)
    sleepable_only: bool = False
    #: needs BTF-typed kernel pointers this runtime does not model
    btf_only: bool = False

    @property
    def full_name(self) -> str:
        return f"bpf_{self.name}"


def helper_name(helper_id: int) -> str:
    """``bpf_NAME`` for a known id, ``unknown`` otherwise (the kernel's spelling)."""
    if 0 < helper_id < len(HELPER_NAMES_BY_ID):
        return "bpf_" + HELPER_NAMES_BY_ID[helper_id]
    return "unknown"


# map type numbers used below
_ARRAY, _PROG_ARRAY, _PERF_EVENT_ARRAY, _STACK_TRACE = 2, 3, 4, 7
_CGROUP_ARRAY, _QUEUE, _STACK, _RINGBUF = 8, 22, 23, 27
_PERCPU_HASH, _PERCPU_ARRAY, _LRU_PERCPU_HASH = 5, 6, 10
_ARRAY_OF_MAPS, _HASH_OF_MAPS = 12, 13

#: map types only special helpers may use: map type -> helper ids allowed with it
SPECIAL_MAP_HELPERS: dict[int, frozenset[int]] = {
    _PROG_ARRAY: frozenset({12}),
    _PERF_EVENT_ARRAY: frozenset({22, 25, 55}),
    _STACK_TRACE: frozenset({27}),
    _CGROUP_ARRAY: frozenset({37}),
    _RINGBUF: frozenset({130, 131, 134}),
    _QUEUE: frozenset({87, 88, 89}),
    _STACK: frozenset({87, 88, 89}),
    _ARRAY_OF_MAPS: frozenset({1}),
    _HASH_OF_MAPS: frozenset({1}),
}

#: map types whose use from a kprobe program the verifier models; helpers on any other map
#: type (sockmap, devmap, local storage, arena, ...) are refused: the kernel restricts them
#: per program type, or their lookups return kernel objects rather than values
MODELLED_MAP_TYPES: frozenset[int] = frozenset({1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 22, 23, 27})

_STR = "str"


def _p(hid: int, *args: str, **kw: object) -> HelperProto:
    return HelperProto(hid, HELPER_NAMES_BY_ID[hid], tuple(args), **kw)  # type: ignore[arg-type]


_PROTOS = [
    _p(1, "map", "map_key", ret="map_value_or_null"),
    _p(2, "map", "map_key", "map_value", "anything"),
    _p(3, "map", "map_key"),
    _p(4, "uninit_mem", "size_or_zero", "anything"),
    _p(5),
    _p(6, "mem", "size"),
    _p(7),
    _p(8),
    _p(12, "ctx", "map", "anything", map_types=frozenset({_PROG_ARRAY})),
    _p(14),
    _p(15),
    _p(16, "uninit_mem", "size"),
    _p(17),     # kprobe programs get bpf_get_cgroup_classid_curr_proto: no arguments
    _p(22, "map", "anything", map_types=frozenset({_PERF_EVENT_ARRAY})),
    _p(25, "ctx", "map", "anything", "mem", "size_or_zero", map_types=frozenset({_PERF_EVENT_ARRAY})),
    _p(27, "ctx", "map", "anything", map_types=frozenset({_STACK_TRACE})),
    _p(35),
    _p(36, "anything", "mem", "size"),
    _p(37, "map", "anything", map_types=frozenset({_CGROUP_ARRAY})),
    _p(42),
    _p(45, "uninit_mem", "size_or_zero", "anything", ret_refine=_STR),
    _p(55, "map", "anything", "uninit_mem", "size", map_types=frozenset({_PERF_EVENT_ARRAY})),
    _p(58, "ctx", "anything"),
    _p(67, "ctx", "uninit_mem", "size_or_zero", "anything", ret_refine=_STR),
    _p(80),
    _p(87, "map", "map_value", "anything", map_types=frozenset({_QUEUE, _STACK})),
    _p(88, "map", "uninit_map_value", map_types=frozenset({_QUEUE, _STACK})),
    _p(89, "map", "uninit_map_value", map_types=frozenset({_QUEUE, _STACK})),
    _p(105, "mem", "size", "anything", "long_out"),
    _p(106, "mem", "size", "anything", "long_out"),
    _p(109, "anything"),
    _p(112, "uninit_mem", "size_or_zero", "anything"),
    _p(113, "uninit_mem", "size_or_zero", "anything"),
    _p(114, "uninit_mem", "size_or_zero", "anything", ret_refine=_STR),
    _p(115, "uninit_mem", "size_or_zero", "anything", ret_refine=_STR),
    _p(117, "anything"),
    _p(118),
    _p(120, "anything", "anything", "uninit_mem", "size"),
    _p(123, "anything"),
    _p(125),
    _p(130, "map", "mem", "size_or_zero", "anything", map_types=frozenset({_RINGBUF})),
    _p(131, "map", "alloc_size", "anything", ret="ringbuf_mem_or_null", map_types=frozenset({_RINGBUF})),
    _p(132, "ringbuf_mem", "anything", ret="void"),
    _p(133, "ringbuf_mem", "anything", ret="void"),
    _p(134, "map", "anything", map_types=frozenset({_RINGBUF})),
    _p(141, "btf_task", "uninit_mem", "size_or_zero", "anything", ret_refine=_STR),
    _p(148, "uninit_mem", "size_or_zero", "anything", sleepable_only=True),
    _p(160),
    _p(158, ret="btf_task"),
    _p(164, "map", "func", "stack_or_null", "anything", callback="for_each"),
    _p(165, "mem_or_null", "size_or_zero", "const_str", "mem_or_null", "size_or_zero"),
    _p(173, "ctx"),
    _p(174, "ctx"),
    _p(175, "btf_task", ret="btf_pt_regs"),
    _p(176, "uninit_mem", "size_or_zero", "anything"),
    _p(177, "mem", "size", "mem_or_null", "size_or_zero"),
    _p(181, "anything", "func", "stack_or_null", "anything", callback="loop"),
    _p(182, "mem", "size", "const_str"),
    _p(191, "uninit_mem", "size_or_zero", "anything", "btf_task", "anything", sleepable_only=True),
    _p(195, "map", "map_key", "anything", ret="map_value_or_null",
       map_types=frozenset({_PERCPU_HASH, _PERCPU_ARRAY, _LRU_PERCPU_HASH})),
    _p(208),
]

#: helpers a kprobe program may call whose arguments are BTF-typed kernel objects
_BTF_ONLY = (93, 94, 149, 153, 154, 156, 157, 169, 170, 171, 172, 180, 194,
             197, 198, 199, 200, 201, 202, 203, 209, 210, 211)

PROTOS: dict[int, HelperProto] = {p.id: p for p in _PROTOS}
for _hid in _BTF_ONLY:
    PROTOS[_hid] = _p(_hid, btf_only=True)

#: every helper id a kprobe (= uprobe) program may call: what kprobe_prog_func_proto hands it on
#: Linux 6.18, read off the running kernel for every id by tests/test_mutation_kills_helpers.py.
#: A fact about the kernel, kept apart from PROTOS (what ubpf-py models): derived from PROTOS, a
#: helper ubpf-py had no prototype for was refused as if the kernel refused it
#: (bpf_get_cgroup_classid).  bpf_probe_write_user (36) is in: the kernel allows it to
#: CAP_SYS_ADMIN loaders on machines that are not locked down, and here it writes the traced
#: process's memory.
KPROBE_ALLOWED: frozenset[int] = frozenset({
    1, 2, 3, 4, 5, 6, 7, 8, 12, 14, 15, 16, 17, 22, 25, 27, 35, 36, 37, 42, 45, 55, 67, 80, 87, 88, 89,
    93, 94, 105, 106, 109, 112, 113, 114, 115, 117, 118, 120, 123, 125, 130, 131, 132, 133, 134, 141,
    148, 149, 153, 154, 156, 157, 158, 164, 165, 169, 170, 171, 172, 173, 174, 175, 176, 177, 180, 181,
    182, 191, 194, 195, 197, 198, 199, 200, 201, 202, 203, 208, 209, 210, 211,
})

#: helpers with a prototype that kprobe programs still may not call ("program of this type
#: cannot use helper"): bpf_override_return (kprobes on error-injectable kernel functions only)
#: and bpf_ktime_get_coarse_ns (not for tracing); the runtime has them for other uses
_NOT_FOR_KPROBE = frozenset(PROTOS) - KPROBE_ALLOWED
