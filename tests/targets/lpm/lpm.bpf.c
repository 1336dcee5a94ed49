/* LPM trie from a program (test_intarget_helpers_e2e.py): route(op, prefixlen, addr) inserts
 * (op 0), looks up (op 1: the matched value is counted in `matches`, a miss under key 0) or
 * deletes (op 2) a prefix of a 4-byte address. */
#include <linux/bpf.h>
#include <linux/ptrace.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

struct key { __u32 prefixlen; __u8 addr[4]; };
struct { __uint(type, BPF_MAP_TYPE_LPM_TRIE); __uint(max_entries, 24); __type(key, struct key);
	__type(value, __u64); __uint(map_flags, BPF_F_NO_PREALLOC); } routes SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_HASH); __uint(max_entries, 128); __type(key, __u64);
	__type(value, __u64); } matches SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_ARRAY); __uint(max_entries, 4); __type(key, __u32);
	__type(value, __s64); } results SEC(".maps");   /* sum of the update/delete return codes, per op */

SEC("uprobe") int route(struct pt_regs *ctx)
{
	__u32 op = PT_REGS_PARM1(ctx);
	__u32 a = PT_REGS_PARM3(ctx);
	struct key k = { .prefixlen = PT_REGS_PARM2(ctx) };
	__builtin_memcpy(k.addr, &a, 4);
	__s64 rc = 0;
	if (op == 0) {
		__u64 v = (__u64)k.prefixlen << 32 | a;
		rc = bpf_map_update_elem(&routes, &k, &v, 0);
	} else if (op == 1) {
		__u64 *v = bpf_map_lookup_elem(&routes, &k);
		__u64 m = v ? *v : 0, one = 1;
		__u64 *n = bpf_map_lookup_elem(&matches, &m);
		if (n)
			__sync_fetch_and_add(n, 1);
		else
			bpf_map_update_elem(&matches, &m, &one, BPF_NOEXIST);
	} else {
		rc = bpf_map_delete_elem(&routes, &k);
	}
	__s64 *r = bpf_map_lookup_elem(&results, &op);
	if (r)
		*r += rc;
	return 0;
}
