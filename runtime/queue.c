/*
 * QUEUE / STACK (kernel/bpf/queue_stack_maps.c, as maps/queue.py) and
 * BLOOM_FILTER (kernel/bpf/bloom_filter.c): push (87), pop (88), peek (89).
 * One implementation with the tracer's QueueMap / BloomFilterMap on shared maps;
 * queue pushes and pops hold the descriptor lock, bloom bits are set atomically.
 */
#include "rt.h"

RT_API s64 ubpf_queue_push(struct ubpf_map_desc *d, const void *value, u64 flags);
s64 ubpf_queue_push(struct ubpf_map_desc *d, const void *value, u64 flags)
{
	s64 rc;
	if ((flags & UBPF_BPF_NOEXIST) || flags > UBPF_BPF_EXIST)
		return -(s64)UBPF_EINVAL;
	if ((rc = rt_lock(&d->lock)))
		return rc;
	u64 next = d->head + 1 >= d->limit ? 0 : d->head + 1;
	if (next == d->tail) {                 /* full */
		if (flags != UBPF_BPF_EXIST) {
			rt_unlock(&d->lock);
			return -(s64)UBPF_E2BIG;
		}
		d->tail = d->tail + 1 >= d->limit ? 0 : d->tail + 1;
	}
	rt_copy((u8 *)d->values + d->head * d->val_stride, value, d->value_size);
	d->head = next;
	rt_unlock(&d->lock);
	return 0;
}

/* copy the next element to out (pop: and remove it); -ENOENT when empty */
RT_API s64 ubpf_queue_take(struct ubpf_map_desc *d, void *out, u64 remove);
s64 ubpf_queue_take(struct ubpf_map_desc *d, void *out, u64 remove)
{
	s64 rc;
	if ((rc = rt_lock(&d->lock)))
		return rc;
	if (d->head == d->tail) {
		rt_unlock(&d->lock);
		return -(s64)UBPF_ENOENT;
	}
	u64 index;
	if (d->lifo) {
		index = d->head ? d->head - 1 : d->limit - 1;
		if (remove)
			d->head = index;
	} else {
		index = d->tail;
		if (remove)
			d->tail = d->tail + 1 >= d->limit ? 0 : d->tail + 1;
	}
	rt_copy(out, (const u8 *)d->values + index * d->val_stride, d->value_size);
	rt_unlock(&d->lock);
	return 0;
}

static u64 bloom_bit(const struct ubpf_map_desc *d, const u8 *value, u64 i)
{
	u32 seed = (u32)(d->seed + i);
	u32 h = d->value_size % 4 ? jhash(value, d->value_size, seed)
				   : jhash2((const u32 *)value, d->value_size / 4, seed);
	return h & d->limit;
}

RT_API s64 ubpf_bloom_push(struct ubpf_map_desc *d, const void *value, u64 flags);
s64 ubpf_bloom_push(struct ubpf_map_desc *d, const void *value, u64 flags)
{
	if (flags != UBPF_BPF_ANY)
		return -(s64)UBPF_EINVAL;
	for (u64 i = 0; i < d->nr_hash; i++) {
		u64 b = bloom_bit(d, value, i);
		__atomic_or_fetch((u8 *)d->values + (b >> 3), (u8)(1u << (b & 7)), __ATOMIC_RELAXED);
	}
	return 0;
}

RT_API s64 ubpf_bloom_peek(struct ubpf_map_desc *d, const void *value);
s64 ubpf_bloom_peek(struct ubpf_map_desc *d, const void *value)
{
	for (u64 i = 0; i < d->nr_hash; i++) {
		u64 b = bloom_bit(d, value, i);
		if (!(__atomic_load_n((u8 *)d->values + (b >> 3), __ATOMIC_RELAXED) & (1u << (b & 7))))
			return -(s64)UBPF_ENOENT;
	}
	return 0;
}

HELPER(87)    /* bpf_map_push_elem(map, value, flags) */
{
	(void)r4; (void)r5; (void)hf;
	struct ubpf_map_desc *d = (struct ubpf_map_desc *)r1;
	if (d->kind == UBPF_KIND_BLOOM)
		return (u64)ubpf_bloom_push(d, (const void *)r2, r3);
	if (d->kind == UBPF_KIND_QUEUE)
		return (u64)ubpf_queue_push(d, (const void *)r2, r3);
	return NEG(UBPF_EOPNOTSUPP);
}

/* pop / peek: the value, or zeroes and the error (maps/queue.py via map_helpers) */
static u64 take(struct ubpf_map_desc *d, u64 out, u64 remove)
{
	s64 rc = d->kind == UBPF_KIND_QUEUE ? ubpf_queue_take(d, (void *)out, remove)
					    : -(s64)UBPF_EOPNOTSUPP;
	if (rc)
		rt_zero((void *)out, d->value_size);
	return (u64)rc;
}

HELPER(88)    /* bpf_map_pop_elem(map, value) */
{
	(void)r3; (void)r4; (void)r5; (void)hf;
	return take((struct ubpf_map_desc *)r1, r2, 1);
}

HELPER(89)    /* bpf_map_peek_elem(map, value): bloom filters answer "maybe present" */
{
	(void)r3; (void)r4; (void)r5; (void)hf;
	struct ubpf_map_desc *d = (struct ubpf_map_desc *)r1;
	if (d->kind == UBPF_KIND_BLOOM)
		return (u64)ubpf_bloom_peek(d, (const void *)r2);
	return take(d, r2, 0);
}
