/*
 * bpf_for_each_map_elem (164) for code compiled for the target: the program's
 * callback is a BPF function of the same image, called as target code calls
 * its BPF functions -- u64 f(r1..r5, frame pointer, runtime block) -- so the
 * compiler passes the callback's frame (one below the caller's) and its
 * runtime block along (vm/jit/compiler.py _emit_target_for_each).
 *
 * Kernel semantics (bpf_for_each_array_elem, bpf_for_each_hash_elem):
 * callback(map, key, value, ctx) for every element in turn, stopping after a
 * callback that returns non-zero (the verifier allows 0 and 1); the result is
 * the number of callbacks made; flags must be 0.  Per-CPU maps hand over this
 * CPU's copy.  Array keys are a u32 index on the (runtime) stack; hash keys and
 * values are the element's own.
 *
 * Hash maps are walked in slot order over the allocator's live bytes, without
 * the map lock (as the tracer's snapshot in helpers/map_helpers.py): slots are
 * preallocated in the arena, so whatever other threads insert or delete
 * meanwhile, every key and value pointer handed to a callback is valid memory
 * of the map.  The walk ends at the slots handed out when it started (elements
 * a callback adds in never-used slots are not visited, as in the snapshot); an
 * element deleted before its turn is skipped.
 */
#include "rt.h"

typedef u64 (*ubpf_callback_t)(u64 r1, u64 r2, u64 r3, u64 r4, u64 r5, u64 fp, void *rt);

RT_API u64 ubpf_for_each_elem(u64 map, u64 fn, u64 ctx, u64 flags, u64 fp, void *rt,
			      struct ubpf_hit_frame *hf);

/* this CPU's copy, folded into the map's copies (as maps.c cpu_in_range) */
static u64 cpu_offset(const struct ubpf_map_desc *d, const struct ubpf_hit_frame *hf)
{
	if (!d->cpu_stride || !d->ncpus)
		return 0;
	return (rt_cpu(hf) % d->ncpus) * d->cpu_stride;
}

u64 ubpf_for_each_elem(u64 map, u64 fn, u64 ctx, u64 flags, u64 fp, void *rt, struct ubpf_hit_frame *hf)
{
	const struct ubpf_map_desc *d = (const struct ubpf_map_desc *)map;
	ubpf_callback_t cb = (ubpf_callback_t)fn;
	u64 n = 0;
	if (flags)
		return NEG(UBPF_EINVAL);
	if (!d || !cb)
		return NEG(UBPF_EINVAL);
	if (d->kind == UBPF_KIND_ARRAY) {
		u64 off = cpu_offset(d, hf);
		volatile u32 key;   /* the callback reads it through its address */
		for (u64 i = 0; i < d->limit; i++) {
			key = (u32)i;
			n++;
			if (cb(map, (u64)&key, d->values + i * d->val_stride + off, ctx, 0, fp, rt))
				break;
		}
		return n;
	}
	if (d->kind == UBPF_KIND_HASH) {
		u64 off = cpu_offset(d, hf);
		const u8 *used = (const u8 *)d->used;
		u64 end = LOAD(&((struct ubpf_map_desc *)d)->fresh);
		if (end > d->max_entries)
			end = d->max_entries;
		for (u64 s = 0; s < end; s++) {
			if (!__atomic_load_n(&used[s], __ATOMIC_ACQUIRE))
				continue;
			n++;
			if (cb(map, d->keys + s * d->key_stride, d->values + s * d->val_stride + off, ctx, 0, fp, rt))
				break;
		}
		return n;
	}
	return NEG(UBPF_EINVAL);   /* no for_each on this map kind (the verifier refuses it) */
}
