/*
 * BPF_MAP_TYPE_STACK_TRACE stores (kernel __bpf_get_stackid, as
 * maps/stack_trace.py describes it) and bpf_get_stackid (27) for user stacks.
 * One implementation: the tracer's StackTraceMap calls ubpf_stack_store /
 * ubpf_stack_delete on shared maps too; the descriptor's lock word serialises them.
 */
#include "rt.h"

/* store trace[skip:] (trace cut to max_depth + skip) and return its id, or -EFAULT /
 * -EEXIST / -ENOMEM exactly as StackTraceMap.get_stackid */
RT_API s64 ubpf_stack_store(struct ubpf_map_desc *d, const u64 *trace, u64 n, u64 flags);
s64 ubpf_stack_store(struct ubpf_map_desc *d, const u64 *trace, u64 n, u64 flags)
{
	u64 skip = flags & UBPF_BPF_F_SKIP_FIELD_MASK;
	if (d->kind != UBPF_KIND_STACK)
		return -(s64)UBPF_EINVAL;
	if (n <= skip)
		return -(s64)UBPF_EFAULT;
	const u64 *ips = trace + skip;
	u64 nr = n - skip;
	if (nr * 8 > d->value_size)
		nr = d->value_size / 8;
	u32 h = jhash2((const u32 *)ips, 2 * nr, 0);
	u64 sid = h & d->limit;
	u32 *hashes = (u32 *)d->table, *nrs = (u32 *)d->keys;
	u8 *present = (u8 *)d->used;
	u64 *row = (u64 *)(d->values + sid * d->val_stride);
	s64 rc;
	if ((rc = rt_lock(&d->lock)))
		return rc;
	int was = present[sid], match = was && hashes[sid] == h;
	if (match && (flags & UBPF_BPF_F_FAST_STACK_CMP)) {
		rc = (s64)sid;
	} else if (match && nrs[sid] == nr && rt_equal(row, ips, nr * 8)) {
		rc = (s64)sid;
	} else if (was && !(flags & UBPF_BPF_F_REUSE_STACKID)) {
		rc = -(s64)UBPF_EEXIST;
	} else if (d->count >= d->max_entries) {   /* (the kernel pops a bucket before freeing one) */
		rc = -(s64)UBPF_ENOMEM;
	} else {
		rt_zero(row, d->val_stride);
		rt_copy(row, ips, nr * 8);
		hashes[sid] = h;
		nrs[sid] = (u32)nr;
		if (!was) {
			present[sid] = 1;
			d->count++;
		}
		rc = (s64)sid;
	}
	rt_unlock(&d->lock);
	return rc;
}

RT_API s64 ubpf_stack_delete(struct ubpf_map_desc *d, u64 sid);
s64 ubpf_stack_delete(struct ubpf_map_desc *d, u64 sid)
{
	s64 rc;
	if (d->kind != UBPF_KIND_STACK || sid > d->limit)
		return -(s64)UBPF_EINVAL;
	if ((rc = rt_lock(&d->lock)))
		return rc;
	u8 *present = (u8 *)d->used;
	if (present[sid]) {
		present[sid] = 0;
		d->count--;
	} else {
		rc = -(s64)UBPF_ENOENT;
	}
	rt_unlock(&d->lock);
	return rc;
}

HELPER(27)    /* bpf_get_stackid(ctx, map, flags) */
{
	(void)r1; (void)r4; (void)r5;
	struct ubpf_map_desc *d = (struct ubpf_map_desc *)r2;
	const struct ubpf_runtime_header *rt = (const void *)hf->runtime;
	u64 flags = r3, trace[128], n = 0;
	if (flags & ~(UBPF_BPF_F_SKIP_FIELD_MASK | UBPF_BPF_F_USER_STACK | UBPF_BPF_F_FAST_STACK_CMP |
		      UBPF_BPF_F_REUSE_STACKID))
		return NEG(UBPF_EINVAL);
	if (d->kind != UBPF_KIND_STACK)
		return NEG(UBPF_EOPNOTSUPP);   /* build-id stack maps stay on the ptrace path */
	u64 skip = flags & UBPF_BPF_F_SKIP_FIELD_MASK;
	u64 max_stack = rt->max_stack ? rt->max_stack : 127;
	u64 depth = d->value_size / 8 + skip;
	if (depth > max_stack)
		depth = max_stack;
	if (depth > 128)
		depth = 128;
	if (flags & UBPF_BPF_F_USER_STACK)
		n = rt_unwind(hf, trace, depth);
	/* a uprobe interrupts user mode: there is no kernel call chain (n stays 0) */
	return (u64)ubpf_stack_store(d, trace, n, flags);
}
