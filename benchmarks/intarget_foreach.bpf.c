// benchmarks/intarget_foreach.py: a counter (count_entry) and the same counter after a
// bpf_for_each_map_elem walk of a 16-element array (foreach_entry), so the difference of the
// two per-hit costs is the walk's.
#include <linux/bpf.h>
#include <linux/ptrace.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

struct { __uint(type, BPF_MAP_TYPE_ARRAY); __uint(max_entries, 4); __type(key, __u32);
	__type(value, __u64); } hits SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_ARRAY); __uint(max_entries, 16); __type(key, __u32);
	__type(value, __u64); } arr SEC(".maps");

static long add(void *map, __u32 *key, __u64 *val, __u64 *sum)
{
	*sum += *val + *key;
	return 0;
}

static __always_inline void count(__u64 extra)
{
	__u32 slot = 0, two = 2;
	__u64 *v = bpf_map_lookup_elem(&hits, &slot);
	if (v)
		__sync_fetch_and_add(v, 1);
	v = bpf_map_lookup_elem(&hits, &two);     /* the walks' sums: keeps the walk live */
	if (v)
		*v += extra;
}

SEC("uprobe") int count_entry(struct pt_regs *ctx) { count(0); return 0; }

SEC("uprobe") int foreach_entry(struct pt_regs *ctx)
{
	__u64 sum = 0;
	bpf_for_each_map_elem(&arr, add, &sum, 0);
	count(sum);
	return 0;
}
