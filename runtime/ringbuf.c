/*
 * BPF_MAP_TYPE_RINGBUF producers (kernel/bpf/ringbuf.c protocol, as
 * maps/ringbuf.py describes it) and PERF_EVENT_ARRAY output.
 *
 * Many producers: the target's threads and the tracer (Python calls these
 * through ctypes) serialise on the descriptor's lock word, as the kernel's
 * producer spinlock.  The consumer (the tracer's RingBufMap.records) takes no
 * lock: a reserved record carries the BUSY bit in its header until committed,
 * the header is written before the producer position moves (release), and
 * the commit clears BUSY with a release store after the data (and the part of
 * a wrapped record beyond the end, copied to the start) is in place.
 *
 * The data area is page aligned and the page before it holds the descriptor's
 * address, so submit/discard find their ring from the record alone, through the
 * header's pg_off, like the kernel.
 */
#include "rt.h"

#define HDR UBPF_BPF_RINGBUF_HDR_SZ
#define BUSY UBPF_BPF_RINGBUF_BUSY_BIT
#define DISCARD UBPF_BPF_RINGBUF_DISCARD_BIT
#define MAX_RECORD (0xffffffffull / 4)

/* move the oldest-uncommitted position over committed records (lock held) */
static u64 advance_pending(struct ubpf_map_desc *d, u64 prod)
{
	const u8 *data = (const u8 *)d->values;
	u64 pend = d->rb_pend;
	while (pend < prod) {
		u32 len = LOAD((const u32 *)(data + (pend & d->limit)));
		if (len & BUSY)
			break;
		pend += ((len & ~(BUSY | DISCARD)) + HDR + 7) & ~7ull;
	}
	d->rb_pend = pend;
	return pend;
}

u64 ubpf_rb_reserve(struct ubpf_map_desc *d, u64 size)
{
	u64 len = (size + HDR + 7) & ~7ull;
	if (d->kind != UBPF_KIND_RINGBUF)
		return 0;
	if (size > MAX_RECORD || len > d->limit + 1) {
		__atomic_add_fetch(&d->rb_dropped, 1, __ATOMIC_RELAXED);
		return 0;
	}
	if (rt_lock(&d->lock)) {
		__atomic_add_fetch(&d->rb_dropped, 1, __ATOMIC_RELAXED);
		return 0;
	}
	u64 prod = d->rb_prod;
	u64 pend = advance_pending(d, prod);
	u64 new_prod = prod + len;
	if (new_prod - LOAD(&d->rb_cons) > d->limit || new_prod - pend > d->limit) {
		d->rb_dropped++;
		rt_unlock(&d->lock);
		return 0;
	}
	u64 off = prod & d->limit;
	u32 *hdr = (u32 *)((u8 *)d->values + off);
	hdr[1] = (u32)((off >> 12) + 2);
	STORE(&hdr[0], (u32)size | BUSY);
	STORE(&d->rb_prod, new_prod);
	rt_unlock(&d->lock);
	return d->values + off + HDR;
}

/* the ring a record belongs to: the header's pg_off leads to the data start, whose
 * preceding page holds the descriptor address */
static struct ubpf_map_desc *record_ring(u64 sample)
{
	u64 hdr = sample - HDR;
	u32 pg_off = ((const u32 *)hdr)[1];
	u64 data = (hdr & ~4095ull) - ((u64)pg_off - 2) * 4096;
	return *(struct ubpf_map_desc **)(data - 4096);
}

s64 ubpf_rb_commit(u64 sample, u64 discard)
{
	struct ubpf_map_desc *d = record_ring(sample);
	u64 hoff = sample - HDR - d->values;
	u8 *data = (u8 *)d->values;
	u32 len = LOAD((const u32 *)(data + hoff));
	if (hoff > d->limit || !(len & BUSY))
		return -(s64)UBPF_EINVAL;
	u64 size = len & ~(BUSY | DISCARD);
	u64 end = hoff + HDR + size;
	if (end > d->limit + 1)     /* wrapped: the tail goes to the start of the ring */
		rt_copy(data, data + d->limit + 1, end - (d->limit + 1));
	STORE((u32 *)(data + hoff), (u32)(size | (discard ? DISCARD : 0)));
	return 0;
}

s64 ubpf_rb_output(struct ubpf_map_desc *d, const void *src, u64 size)
{
	u64 rec = ubpf_rb_reserve(d, size);
	if (!rec)
		return -(s64)UBPF_EAGAIN;
	rt_copy((void *)rec, src, size);
	return ubpf_rb_commit(rec, 0);
}

HELPER(130)   /* bpf_ringbuf_output(ringbuf, data, size, flags) */
{
	(void)r5; (void)hf;
	if (r4 & ~(UBPF_BPF_RB_NO_WAKEUP | UBPF_BPF_RB_FORCE_WAKEUP))
		return NEG(UBPF_EINVAL);
	return (u64)ubpf_rb_output((struct ubpf_map_desc *)r1, (const void *)r2, r3);
}

HELPER(131)   /* bpf_ringbuf_reserve(ringbuf, size, flags) */
{
	(void)r4; (void)r5; (void)hf;
	if (r3)
		return 0;
	return ubpf_rb_reserve((struct ubpf_map_desc *)r1, r2);
}

HELPER(132)   /* bpf_ringbuf_submit(data, flags) */
{
	(void)r2; (void)r3; (void)r4; (void)r5; (void)hf;
	ubpf_rb_commit(r1, 0);
	return 0;
}

HELPER(133)   /* bpf_ringbuf_discard(data, flags) */
{
	(void)r2; (void)r3; (void)r4; (void)r5; (void)hf;
	ubpf_rb_commit(r1, 1);
	return 0;
}

HELPER(134)   /* bpf_ringbuf_query(ringbuf, flags) */
{
	(void)r3; (void)r4; (void)r5; (void)hf;
	struct ubpf_map_desc *d = (struct ubpf_map_desc *)r1;
	switch (r2) {
	case UBPF_BPF_RB_AVAIL_DATA: return LOAD(&d->rb_prod) - LOAD(&d->rb_cons);
	case UBPF_BPF_RB_RING_SIZE: return d->limit + 1;
	case UBPF_BPF_RB_CONS_POS: return LOAD(&d->rb_cons);
	case UBPF_BPF_RB_PROD_POS: return LOAD(&d->rb_prod);
	default: return 0;
	}
}

/* ---- PERF_EVENT_ARRAY ----------------------------------------------------------------- */

#define PERF_RECORD_SAMPLE 9

static void ring_put(u8 *ring, u64 size, u64 pos, const void *src, u64 n)
{
	u64 off = pos & (size - 1), first = size - off < n ? size - off : n;
	rt_copy(ring + off, src, first);
	if (first < n)
		rt_copy(ring, (const u8 *)src + first, n - first);
}

/* a sample as the kernel writes it into the perf ring: perf_event_header, u32 raw
 * size, the raw bytes zero-padded so 4 + size is a multiple of 8; -ENOSPC (lost)
 * when it does not fit.  Return codes as PerfEventArrayMap.output. */
s64 ubpf_perf_output(struct ubpf_map_desc *d, u64 cpu, const void *src, u64 size, u64 flags)
{
	if (d->kind != UBPF_KIND_PERF || (flags & ~UBPF_BPF_F_INDEX_MASK))
		return -(s64)UBPF_EINVAL;
	u64 index = flags & UBPF_BPF_F_INDEX_MASK;
	if (index == UBPF_BPF_F_CURRENT_CPU)
		index = cpu;
	if (index >= d->max_entries)
		return -(s64)UBPF_E2BIG;
	if (index >= d->ncpus)
		return -(s64)UBPF_ENOENT;
	if (index != cpu)
		return -(s64)UBPF_EOPNOTSUPP;
	struct ubpf_perf_ring *r = (struct ubpf_perf_ring *)d->perf_rings + cpu;
	u64 padded = ((size + 4 + 7) & ~7ull) - 4;
	u64 total = 8 + 4 + padded;
	struct { u32 type; u16 misc, size; u32 raw; } __attribute__((packed)) h = {
		PERF_RECORD_SAMPLE, 0, (u16)total, (u32)padded};
	static const u8 zeros[8];
	if (rt_lock(&r->lock))
		return -(s64)UBPF_EBUSY;
	u64 head = r->head;
	if (r->size - (head - LOAD(&r->tail)) < total) {
		r->lost++;
		rt_unlock(&r->lock);
		return -(s64)UBPF_ENOSPC;
	}
	ring_put((u8 *)r->data, r->size, head, &h, sizeof(h));
	ring_put((u8 *)r->data, r->size, head + sizeof(h), src, size);
	ring_put((u8 *)r->data, r->size, head + sizeof(h) + size, zeros, padded - size);
	STORE(&r->head, head + total);
	rt_unlock(&r->lock);
	return 0;
}

HELPER(25)   /* bpf_perf_event_output(ctx, map, flags, data, size) */
{
	(void)r1;
	return (u64)ubpf_perf_output((struct ubpf_map_desc *)r2, rt_cpu(hf), (const void *)r4, r5, r3);
}
