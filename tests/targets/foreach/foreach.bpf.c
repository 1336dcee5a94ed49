/* bpf_for_each_map_elem on every map type the kernel walks (tests/test_intarget_foreach.py):
 * `fill(k, v)` puts v at k in each map, `walk(stop)` walks each map with a callback that sums
 * keys and values and stops at key `stop`, `prune(odd)` deletes the hash elements whose value
 * has that parity from inside the callback.  Results accumulate in `out`. */
#include <linux/bpf.h>
#include <linux/ptrace.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

#define MAP(name, t, n) struct { __uint(type, t); __uint(max_entries, n); __type(key, __u32); \
	__type(value, __u64); } name SEC(".maps")
MAP(arr, BPF_MAP_TYPE_ARRAY, 16);
MAP(parr, BPF_MAP_TYPE_PERCPU_ARRAY, 16);
MAP(h, BPF_MAP_TYPE_HASH, 32);
MAP(ph, BPF_MAP_TYPE_PERCPU_HASH, 32);
MAP(lh, BPF_MAP_TYPE_LRU_HASH, 64);
MAP(lph, BPF_MAP_TYPE_LRU_PERCPU_HASH, 64);

#define NMAPS 6
struct totals { __u64 calls[NMAPS], visited[NMAPS], keys[NMAPS], vals[NMAPS], pruned, bad_flags; };
struct { __uint(type, BPF_MAP_TYPE_ARRAY); __uint(max_entries, 1); __type(key, __u32);
	__type(value, struct totals); } out SEC(".maps");

struct walk_ctx { __u64 stop, calls, keys, vals; };

static long sum_cb(void *map, __u32 *key, __u64 *val, struct walk_ctx *c)
{
	c->calls++;
	c->keys += *key;
	c->vals += *val;
	return *key == c->stop;
}

static long prune_cb(void *map, __u32 *key, __u64 *val, struct walk_ctx *c)
{
	if ((*val & 1) == c->stop) {
		bpf_map_delete_elem(map, key);
		c->calls++;
	}
	return 0;
}

SEC("uprobe") int fill(struct pt_regs *ctx)
{
	__u32 k = PT_REGS_PARM1(ctx), ak = k % 16;
	__u64 v = PT_REGS_PARM2(ctx);
	bpf_map_update_elem(&arr, &ak, &v, 0);
	bpf_map_update_elem(&parr, &ak, &v, 0);
	bpf_map_update_elem(&h, &k, &v, 0);
	bpf_map_update_elem(&ph, &k, &v, 0);
	bpf_map_update_elem(&lh, &k, &v, 0);
	bpf_map_update_elem(&lph, &k, &v, 0);
	return 0;
}

#define WALK(i, m) do { \
	struct walk_ctx c = { .stop = stop }; \
	long n = bpf_for_each_map_elem(&m, sum_cb, &c, 0); \
	t->visited[i] += n; t->calls[i] += c.calls; t->keys[i] += c.keys; t->vals[i] += c.vals; \
} while (0)

SEC("uprobe") int walk(struct pt_regs *ctx)
{
	__u32 zero = 0;
	__u64 stop = PT_REGS_PARM1(ctx);
	struct totals *t = bpf_map_lookup_elem(&out, &zero);
	if (!t)
		return 0;
	WALK(0, arr); WALK(1, parr); WALK(2, h); WALK(3, ph); WALK(4, lh); WALK(5, lph);
	struct walk_ctx c = {};
	t->bad_flags += bpf_for_each_map_elem(&arr, sum_cb, &c, 1) == -22;
	return 0;
}

SEC("uprobe") int prune(struct pt_regs *ctx)
{
	__u32 zero = 0;
	struct walk_ctx c = { .stop = PT_REGS_PARM1(ctx) & 1 };
	struct totals *t = bpf_map_lookup_elem(&out, &zero);
	if (!t)
		return 0;
	bpf_for_each_map_elem(&h, prune_cb, &c, 0);
	bpf_for_each_map_elem(&lh, prune_cb, &c, 0);
	t->pruned += c.calls;
	return 0;
}
