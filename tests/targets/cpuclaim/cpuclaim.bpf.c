/* Programs whose hits own a CPU id (tests/test_intarget_cpuclaim.py): each touches this CPU's
 * copy of a per-CPU array in one way -- a plain increment, its CPU number, a for_each callback,
 * tail calls -- so the copy a hit used tells which id it owned. */
#include <linux/bpf.h>
#include <linux/ptrace.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

struct { __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY); __uint(max_entries, 1); __type(key, __u32); __type(value, __u64); } pcpu SEC(".maps");
/* bpf_get_smp_processor_id() + 1 of the hit that last wrote this CPU's copy (0: none) */
struct { __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY); __uint(max_entries, 1); __type(key, __u32); __type(value, __u64); } ids SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_PROG_ARRAY); __uint(max_entries, 1); __type(key, __u32); __type(value, __u32); } progs SEC(".maps");

static __always_inline void bump(void)
{
	__u32 k = 0;
	__u64 *v = bpf_map_lookup_elem(&pcpu, &k);
	if (v)
		*v += 1;
}

SEC("uprobe") int pcount(struct pt_regs *ctx) { bump(); return 0; }

SEC("uprobe") int cpuid(struct pt_regs *ctx)
{
	__u32 k = 0;
	__u64 *v = bpf_map_lookup_elem(&ids, &k);
	if (v)
		*v = bpf_get_smp_processor_id() + 1;
	return 0;
}

static long add_one(void *map, __u32 *key, __u64 *val, void *ctx)
{
	*val += 1;
	return 0;
}

SEC("uprobe") int each(struct pt_regs *ctx)
{
	bpf_for_each_map_elem(&pcpu, add_one, 0, 0);
	return 0;
}

/* no per-CPU map of its own: the program it tail-calls (pcount) owns the id */
SEC("uprobe") int jump(struct pt_regs *ctx)
{
	bpf_tail_call(ctx, &progs, 0);
	return 0;
}

/* owns an id, then tail-calls pcount, which must keep it (one hit: +2 on one copy) */
SEC("uprobe") int bump_jump(struct pt_regs *ctx)
{
	bump();
	bpf_tail_call(ctx, &progs, 0);
	return 0;
}
