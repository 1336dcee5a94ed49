/*
 * ARRAY / PERCPU_ARRAY, the HASH family (HASH, PERCPU_HASH, LRU_HASH,
 * LRU_PERCPU_HASH), LPM_TRIE (on a HASH store) and map-in-map lookups, driven by the map descriptor (struct ubpf_map_desc,
 * ubpf_py/abi/maps.py).  This is the one implementation of hash inserts and
 * deletes: the target's threads run it from the helpers below and the tracer's
 * Python map objects call the same functions (ubpf_map_*) through ctypes on a
 * copy of this object linked into the tracer, on the same shared memory.
 *
 * Concurrency, as the kernel's bucket locks: inserts and deletes hold d->lock;
 * lookups take no lock (entries are published with a release store after the
 * key and value are written, a deleted entry becomes a tombstone, so a probe
 * never loses its way) and retry a miss when d->seq moved, i.e. when a rebuilt
 * table was published meanwhile.
 * cpu < 0 means user space (the syscall): per-CPU values are the whole buffer.
 */
#include "rt.h"

/* the index hash (ubpf_py/abi/maps.py; maps/descriptor.py key_hash, the JIT's
 * @bpf_fast_hash): FNV-1a over little-endian u64 words of the key (the last one
 * zero-padded), folded */
static u64 key_hash(const u8 *key, u64 n)
{
	u64 h = UBPF_FNV_BASIS;
	if (n == 4) {
		h = (h ^ *(const u32 *)key) * UBPF_FNV_PRIME;
	} else {
		for (u64 i = 0; i < n; i += 8) {
			u64 w = 0;
			u64 k = n - i < 8 ? n - i : 8;
			for (u64 j = 0; j < k; j++)
				w |= (u64)key[i + j] << (8 * j);
			h = (h ^ w) * UBPF_FNV_PRIME;
		}
	}
	return h ^ (h >> 32);
}

static inline u8 *slot_key(const struct ubpf_map_desc *d, u64 slot)
{
	return (u8 *)d->keys + slot * d->key_stride;
}

static inline u8 *slot_value(const struct ubpf_map_desc *d, u64 slot)
{
	return (u8 *)d->values + slot * d->val_stride;
}

/* struct bpf_spin_lock: a u32 word in the value, non-zero while held */
static int value_lock(u32 *w, u64 spins)
{
	for (u64 i = 0; i < spins; i++) {
		if (__atomic_load_n(w, __ATOMIC_RELAXED) == 0 && __atomic_exchange_n(w, 1, __ATOMIC_ACQUIRE) == 0)
			return 0;
		if (i < 64)
			rt_pause();
		else
			rt_syscall0(SYS_sched_yield);
	}
	return -(int)UBPF_EBUSY;
}

/* copy a value; with BPF_F_LOCK keeping the 4-byte lock word (as maps/base.py
 * write_value does: the copy does not take the value's lock, and a plain update copies
 * the word too -- both unlike the kernel, see bpf_spin_lock below) */
static s64 write_value(const struct ubpf_map_desc *d, u8 *dst, const u8 *src, u64 n, int keep_lock)
{
	if (keep_lock && d->spin_off) {
		u64 lo = d->spin_off - 1;
		rt_copy(dst, src, lo);
		rt_copy(dst + lo + 4, src + lo + 4, n - lo - 4);
	} else {
		rt_copy(dst, src, n);
	}
	return 0;
}

static s64 check_flags(const struct ubpf_map_desc *d, u64 flags)
{
	if ((flags & ~UBPF_BPF_F_LOCK) > UBPF_BPF_EXIST)
		return -(s64)UBPF_EINVAL;
	if ((flags & UBPF_BPF_F_LOCK) && !d->spin_off)
		return -(s64)UBPF_EINVAL;
	return 0;
}

/* ---- ARRAY / PERCPU_ARRAY ----------------------------------------------------------- */

static u64 array_lookup(const struct ubpf_map_desc *d, const void *key, s64 cpu)
{
	u32 i = *(const u32 *)key;
	if (i >= d->limit)
		return 0;
	return d->values + i * d->val_stride + (cpu > 0 ? (u64)cpu * d->cpu_stride : 0);
}

static s64 array_update(const struct ubpf_map_desc *d, const void *key, const void *value, u64 flags, s64 cpu)
{
	s64 rc = check_flags(d, flags);
	u32 i = *(const u32 *)key;
	if (rc)
		return rc;
	if (i >= d->limit)
		return -(s64)UBPF_E2BIG;
	if ((flags & 3) == UBPF_BPF_NOEXIST)
		return -(s64)UBPF_EEXIST;
	u8 *dst = (u8 *)d->values + i * d->val_stride;
	if (d->cpu_stride && cpu < 0) {   /* user space: every CPU's value, val_stride apart */
		for (u64 c = 0; c < d->ncpus; c++)
			rt_copy(dst + c * d->cpu_stride, (const u8 *)value + c * d->val_stride, d->val_stride);
		return 0;
	}
	if (d->cpu_stride)
		dst += (u64)cpu * d->cpu_stride;
	return write_value(d, dst, value, d->value_size, flags & UBPF_BPF_F_LOCK);
}

/* ---- HASH family: the index --------------------------------------------------------- */

static inline int key_equal(const struct ubpf_map_desc *d, const u8 *stored, const u8 *key)
{
	switch (d->key_size) {   /* the common key sizes in one compare */
	case 4: return *(const u32 *)stored == *(const u32 *)key;
	case 8: return *(const u64 *)stored == *(const u64 *)key;
	default: return rt_equal(stored, key, d->key_size);
	}
}

/* slot + 1 of key, 0 when absent; *pos gets the table position */
static u64 probe(const struct ubpf_map_desc *d, const u8 *key, u64 h, u64 *pos)
{
	u64 *tab = (u64 *)LOAD(&((struct ubpf_map_desc *)d)->table);
	u64 mask = d->limit, i = h & mask;
	for (u64 n = 0; n <= mask; n++, i = (i + 1) & mask) {
		u64 e = LOAD(&tab[i]);
		if (!e)
			return 0;
		if (e != UBPF_TOMBSTONE && e - 1 < d->max_entries && key_equal(d, slot_key(d, e - 1), key)) {
			if (pos)
				*pos = i;
			return e;
		}
	}
	return 0;
}

/* lock-free lookup: a miss is only believed when no rebuild ran meanwhile */
static u64 find(struct ubpf_map_desc *d, const u8 *key)
{
	u64 h = key_hash(key, d->key_size);
	for (u64 tries = 0; tries < UBPF_LOCK_SPINS; tries++) {
		u64 seq = LOAD(&d->seq);
		u64 e = probe(d, key, h, 0);
		if (e || LOAD(&d->seq) == seq)
			return e;
	}
	return 0;
}

static void table_put(struct ubpf_map_desc *d, u64 *tab, const u8 *key, u64 slot, int count_tombs)
{
	u64 mask = d->limit, i = key_hash(key, d->key_size) & mask;
	for (;;) {
		u64 e = tab[i];
		if (!e || e == UBPF_TOMBSTONE) {
			if (e && count_tombs)
				d->tombs--;
			STORE(&tab[i], slot + 1);
			return;
		}
		i = (i + 1) & mask;
	}
}

/* tombstones past a quarter of the table (lock held): fill the spare table with the
 * live elements and publish it with one store; lookups that missed in the old one
 * meanwhile see seq moved and retry.  The old table becomes the spare: it is only
 * written again at the next rebuild, a quarter of a table's worth of deletes later. */
static void rebuild(struct ubpf_map_desc *d)
{
	u64 *old = (u64 *)d->table, *tab = (u64 *)d->spare_table;
	const u8 *used = (const u8 *)d->used;
	for (u64 i = 0; i <= d->limit; i++)
		tab[i] = 0;
	for (u64 s = 0; s < d->fresh; s++)
		if (used[s])
			table_put(d, tab, slot_key(d, s), s, 0);
	STORE(&d->table, (u64)tab);
	d->spare_table = (u64)old;
	d->tombs = 0;
	STORE(&d->seq, d->seq + 2);
}

/* ---- HASH family: slots and the LRU list (lock held) ---------------------------------- */

static void lru_unlink(struct ubpf_map_desc *d, u32 s)
{
	u32 *prev = (u32 *)d->lru_prev, *next = (u32 *)d->lru_next;
	u32 p = prev[s], n = next[s];
	if (p != UBPF_LRU_NIL) next[p] = n; else d->lru_head = n;
	if (n != UBPF_LRU_NIL) prev[n] = p; else d->lru_tail = p;
}

static void lru_append(struct ubpf_map_desc *d, u32 s)
{
	u32 *prev = (u32 *)d->lru_prev, *next = (u32 *)d->lru_next;
	u32 t = (u32)d->lru_tail;
	prev[s] = t;
	next[s] = UBPF_LRU_NIL;
	if (t != UBPF_LRU_NIL) next[t] = s; else d->lru_head = s;
	d->lru_tail = s;
}

static void remove_slot(struct ubpf_map_desc *d, u64 slot, u64 pos)
{
	STORE(&((u64 *)d->table)[pos], UBPF_TOMBSTONE);
	d->tombs++;
	d->count--;
	((u8 *)d->used)[slot] = 0;
	if (d->ref)
		lru_unlink(d, (u32)slot);
	((u32 *)d->free)[d->nfree++] = (u32)slot;
	if (d->tombs > (d->limit + 1) / UBPF_HASH_REBUILD_DIV)
		rebuild(d);
}

/* the element not referenced recently, oldest first, second chance to referenced
 * ones (as maps/hash.py did with its insertion-ordered index) */
static void evict(struct ubpf_map_desc *d)
{
	u8 *ref = (u8 *)d->ref;
	u64 slot = d->lru_head;
	for (u64 n = 0; n < 2 * d->count + 1; n++) {
		slot = d->lru_head;
		if (!ref[slot])
			break;
		ref[slot] = 0;
		lru_unlink(d, (u32)slot);
		lru_append(d, (u32)slot);
	}
	u64 pos = 0;
	probe(d, slot_key(d, slot), key_hash(slot_key(d, slot), d->key_size), &pos);
	remove_slot(d, slot, pos);
	d->evictions++;
}

static s64 alloc_slot(struct ubpf_map_desc *d)
{
	if (d->nfree)
		return ((u32 *)d->free)[--d->nfree];
	if (d->fresh < d->max_entries)
		return (s64)d->fresh++;
	return -1;
}

/* an LPM trie's element in its store (see LPM_TRIE below): the trie's value, then at
 * key_off the key exactly as given (the kernel keeps the bits past the prefix too) */
struct lpm_parts {
	u64 value_len;
	const u8 *key;
	u64 key_off, key_len;
};

static s64 store_value(struct ubpf_map_desc *d, u64 slot, const u8 *value, s64 cpu, int keep_lock, int fresh,
		       const struct lpm_parts *lpm)
{
	u8 *dst = slot_value(d, slot);
	if (lpm) {
		rt_copy(dst, value, lpm->value_len);
		rt_copy(dst + lpm->key_off, lpm->key, lpm->key_len);
		return 0;
	}
	if (!d->cpu_stride)
		return write_value(d, dst, value, d->value_size, keep_lock);
	if (cpu < 0) {    /* user space: the whole per-CPU buffer */
		rt_copy(dst, value, d->cpu_stride * d->ncpus);
		return 0;
	}
	if (fresh)        /* a program inserting: this CPU's copy gets the value, the others zeroes */
		rt_zero(dst, d->val_stride);
	return write_value(d, dst + (u64)cpu * d->cpu_stride, value, d->value_size, keep_lock);
}

static s64 hash_update(struct ubpf_map_desc *d, const u8 *key, const u8 *value, u64 flags, s64 cpu,
			const struct lpm_parts *lpm)
{
	s64 rc = check_flags(d, flags);
	if (rc)
		return rc;
	int keep_lock = !!(flags & UBPF_BPF_F_LOCK);
	u64 mode = flags & 3;
	if ((rc = rt_lock(&d->lock)))
		return rc;
	u64 e = probe(d, key, key_hash(key, d->key_size), 0);
	if (e) {
		if (mode == UBPF_BPF_NOEXIST) {
			rc = -(s64)UBPF_EEXIST;
		} else {
			rc = store_value(d, e - 1, value, cpu, keep_lock, 0, lpm);
			if (d->ref)
				((u8 *)d->ref)[e - 1] = 1;
		}
		goto out;
	}
	if (mode == UBPF_BPF_EXIST) {
		rc = -(s64)UBPF_ENOENT;
		goto out;
	}
	s64 slot = alloc_slot(d);
	if (slot < 0) {
		if (!d->ref) {
			rc = -(s64)UBPF_E2BIG;
			goto out;
		}
		evict(d);
		slot = alloc_slot(d);
	}
	rt_copy(slot_key(d, (u64)slot), key, d->key_size);
	store_value(d, (u64)slot, value, cpu, 0, 1, lpm);
	((u8 *)d->used)[slot] = 1;
	if (d->ref) {
		((u8 *)d->ref)[slot] = 0;
		lru_append(d, (u32)slot);
	}
	d->count++;
	table_put(d, (u64 *)d->table, key, (u64)slot, 1);   /* publish last: readers see a complete element */
out:
	rt_unlock(&d->lock);
	return rc;
}

static s64 hash_delete(struct ubpf_map_desc *d, const u8 *key)
{
	s64 rc;
	u64 pos = 0;
	if ((rc = rt_lock(&d->lock)))
		return rc;
	u64 e = probe(d, key, key_hash(key, d->key_size), &pos);
	if (e)
		remove_slot(d, e - 1, pos);
	else
		rc = -(s64)UBPF_ENOENT;
	rt_unlock(&d->lock);
	return rc;
}

/* ---- LPM_TRIE ------------------------------------------------------------------------ */
/*
 * A trie's elements live in a HASH store (d->values, abi/maps.py KIND_LPM) keyed by the
 * canonical key -- prefixlen and the data masked to it -- whose values are the trie's
 * value followed, at round8(value_size), by the key as given.  The prefix lengths in use
 * are a bitmap (d->keys, bit p set while some element has prefixlen p) with a count per
 * length (d->table, u32s).  A lookup tries the lengths in use, longest first, each with
 * one lock-free probe of the store: the result is the kernel's longest prefix match (and
 * maps/lpm.py's).  Updates and deletes hold d->lock (the store's own lock nests inside),
 * so the counts and the bitmap follow the store exactly; a lookup racing an insert may
 * miss the new prefix until its bit is set, as a kernel lookup racing the RCU publish.
 */
static void lpm_canon(u8 *out, const u8 *key, u32 plen, u64 n)
{
	u64 full = plen / 8, rest = plen % 8;
	*(u32 *)out = plen;
	for (u64 j = 0; j + 4 < n; j++) {
		u8 b = key[4 + j];
		out[4 + j] = j < full ? b : (j == full && rest ? (u8)(b & (0xff << (8 - rest))) : 0);
	}
}

static struct ubpf_map_desc *lpm_store(const struct ubpf_map_desc *d)
{
	struct ubpf_map_desc *store = (struct ubpf_map_desc *)d->values;
	if (!store || store->kind != UBPF_KIND_HASH || d->key_size < 5 || d->key_size > UBPF_LPM_KEY_MAX
	    || !d->keys || !d->table)
		return 0;
	return store;
}

static u64 lpm_lookup(struct ubpf_map_desc *d, const u8 *key)
{
	struct ubpf_map_desc *store = lpm_store(d);
	u8 buf[UBPF_LPM_KEY_MAX];
	if (!store)
		return 0;
	const u64 *bits = (const u64 *)d->keys;
	u64 plen = *(const u32 *)key;
	if (plen > d->limit)
		return 0;      /* as the kernel's trie_lookup_elem (and maps/lpm.py) */
	for (s64 p = (s64)plen; p >= 0; p--) {
		u64 w = LOAD(&bits[p >> 6]) & (~0ull >> (63 - (p & 63)));   /* lengths <= p in this word */
		if (!w) {
			p &= ~63;      /* none: on to the word below */
			continue;
		}
		p = (p & ~63) + 63 - __builtin_clzll(w);
		lpm_canon(buf, key, (u32)p, d->key_size);
		u64 e = find(store, buf);
		if (e)
			return (u64)slot_value(store, e - 1);
	}
	return 0;
}

/* The store of trie d and the canonical form of key in buf (its prefixlen in *plen); NULL when
 * d has no store or the prefixlen is past the data (both -EINVAL for an update or delete). */
static struct ubpf_map_desc *lpm_keyed(struct ubpf_map_desc *d, const u8 *key, u8 *buf, u32 *plen)
{
	struct ubpf_map_desc *store = lpm_store(d);
	*plen = *(const u32 *)key;
	if (!store || *plen > d->limit)
		return 0;
	lpm_canon(buf, key, *plen, d->key_size);
	return store;
}

static s64 lpm_update(struct ubpf_map_desc *d, const u8 *key, const u8 *value, u64 flags)
{
	u8 buf[UBPF_LPM_KEY_MAX];
	u32 plen;
	s64 rc;
	struct ubpf_map_desc *store = lpm_keyed(d, key, buf, &plen);
	if (!store || flags > UBPF_BPF_EXIST)
		return -(s64)UBPF_EINVAL;
	struct lpm_parts parts = { d->value_size, key, (d->value_size + 7) & ~7ull, d->key_size };
	if ((rc = rt_lock(&d->lock)))
		return rc;
	if (flags != UBPF_BPF_EXIST && !find(store, buf) && store->count >= d->max_entries) {
		rc = -(s64)UBPF_ENOSPC;
	} else {
		u64 was = store->count;
		rc = hash_update(store, buf, value, flags, 0, &parts);
		if (!rc && store->count != was) {
			u32 *counts = (u32 *)d->table;
			if (counts[plen]++ == 0)
				__atomic_fetch_or(&((u64 *)d->keys)[plen >> 6], 1ull << (plen & 63), __ATOMIC_RELEASE);
		}
	}
	rt_unlock(&d->lock);
	return rc;
}

static s64 lpm_delete(struct ubpf_map_desc *d, const u8 *key)
{
	u8 buf[UBPF_LPM_KEY_MAX];
	u32 plen;
	s64 rc;
	struct ubpf_map_desc *store = lpm_keyed(d, key, buf, &plen);
	if (!store)
		return -(s64)UBPF_EINVAL;
	if ((rc = rt_lock(&d->lock)))
		return rc;
	rc = hash_delete(store, buf);
	if (!rc) {
		u32 *counts = (u32 *)d->table;
		if (--counts[plen] == 0)
			__atomic_fetch_and(&((u64 *)d->keys)[plen >> 6], ~(1ull << (plen & 63)), __ATOMIC_RELEASE);
	}
	rt_unlock(&d->lock);
	return rc;
}

/* ---- entry points (tracer through ctypes, helpers below) ------------------------------ */

/* slot + 1 of key in a hash map (no LRU reference), 0 when absent: the tracer's lookup */
RT_API u64 ubpf_hash_find(struct ubpf_map_desc *d, const void *key);
u64 ubpf_hash_find(struct ubpf_map_desc *d, const void *key)
{
	return d->kind == UBPF_KIND_HASH ? find(d, key) : 0;
}

/* a CPU number beyond the map's copies (more CPUs online than the map was sized for)
 * must never index past the slot: fold it into range */
static inline s64 cpu_in_range(const struct ubpf_map_desc *d, s64 cpu)
{
	return cpu > 0 && d->cpu_stride && (u64)cpu >= d->ncpus ? (s64)((u64)cpu % d->ncpus) : cpu;
}

/* map-in-map: the inner map's handle (its descriptor), 0 for an empty slot.  The
 * handle is read with one atomic load: the tracer stores whole handles (abi/maps.py) */
static u64 inner_map(struct ubpf_map_desc *d, const void *key)
{
	if (d->kind == UBPF_KIND_ARRAY_OF_MAPS) {
		u32 i = *(const u32 *)key;
		return i < d->limit && d->values ? LOAD(&((u64 *)d->values)[i]) : 0;
	}
	struct ubpf_map_desc *store = (struct ubpf_map_desc *)d->values;
	if (!store || store->kind != UBPF_KIND_HASH)
		return 0;
	u64 e = find(store, key);
	return e ? LOAD((u64 *)slot_value(store, e - 1)) : 0;
}

/* the tracer putting an inner map in an ARRAY_OF_MAPS slot (0: empty), one atomic store
 * that lookups racing it see whole; -E2BIG past the end */
RT_API s64 ubpf_map_set_inner(struct ubpf_map_desc *d, u64 index, u64 handle);
s64 ubpf_map_set_inner(struct ubpf_map_desc *d, u64 index, u64 handle)
{
	if (d->kind != UBPF_KIND_ARRAY_OF_MAPS || !d->values)
		return -(s64)UBPF_EINVAL;
	if (index >= d->limit)
		return -(s64)UBPF_E2BIG;
	STORE(&((u64 *)d->values)[index], handle);
	return 0;
}

u64 ubpf_map_lookup(struct ubpf_map_desc *d, const void *key, s64 cpu)
{
	cpu = cpu_in_range(d, cpu);
	if (d->kind == UBPF_KIND_ARRAY)
		return array_lookup(d, key, cpu);
	if (d->kind == UBPF_KIND_ARRAY_OF_MAPS || d->kind == UBPF_KIND_HASH_OF_MAPS)
		return inner_map(d, key);
	if (d->kind == UBPF_KIND_LPM)
		return lpm_lookup(d, key);
	if (d->kind != UBPF_KIND_HASH)
		return 0;
	u64 e = find(d, key);
	if (!e)
		return 0;
	if (d->ref && !((u8 *)d->ref)[e - 1])
		((u8 *)d->ref)[e - 1] = 1;
	return (u64)slot_value(d, e - 1) + (cpu > 0 ? (u64)cpu * d->cpu_stride : 0);
}

s64 ubpf_map_update(struct ubpf_map_desc *d, const void *key, const void *value, u64 flags, s64 cpu)
{
	cpu = cpu_in_range(d, cpu);
	if (d->kind == UBPF_KIND_ARRAY)
		return array_update(d, key, value, flags, cpu);
	if (d->kind == UBPF_KIND_HASH)
		return hash_update(d, key, value, flags, cpu, 0);
	if (d->kind == UBPF_KIND_LPM)
		return lpm_update(d, key, value, flags);
	return -(s64)UBPF_EOPNOTSUPP;
}

s64 ubpf_map_delete(struct ubpf_map_desc *d, const void *key)
{
	if (d->kind == UBPF_KIND_ARRAY)
		return -(s64)UBPF_EINVAL;
	if (d->kind == UBPF_KIND_HASH)
		return hash_delete(d, key);
	if (d->kind == UBPF_KIND_LPM)
		return lpm_delete(d, key);
	return -(s64)UBPF_EOPNOTSUPP;
}

HELPER(1)   /* bpf_map_lookup_elem */
{
	(void)r3; (void)r4; (void)r5;
	return ubpf_map_lookup((struct ubpf_map_desc *)r1, (const void *)r2, (s64)rt_cpu(hf));
}

HELPER(2)   /* bpf_map_update_elem */
{
	(void)r5;
	struct ubpf_map_desc *d = (struct ubpf_map_desc *)r1;
	return (u64)ubpf_map_update(d, (const void *)r2, (const void *)r3, r4, d->cpu_stride ? (s64)rt_cpu(hf) : 0);
}

HELPER(3)   /* bpf_map_delete_elem */
{
	(void)r3; (void)r4; (void)r5; (void)hf;
	return (u64)ubpf_map_delete((struct ubpf_map_desc *)r1, (const void *)r2);
}

/* bpf_spin_lock on the value's lock word, among the target's threads.  Bounded: a
 * word left non-zero by a plain update that copied it (see write_value) or by a
 * holder that died gives up after UBPF_LOCK_SPINS attempts instead of hanging the
 * target.  (The ptrace path's Python helper locks a striped table instead, so a map
 * locked from both paths at once is not mutually excluded.) */
HELPER(93)
{
	(void)r2; (void)r3; (void)r4; (void)r5; (void)hf;
	value_lock((u32 *)r1, UBPF_LOCK_SPINS);
	return 0;
}

HELPER(94)    /* bpf_spin_unlock */
{
	(void)r2; (void)r3; (void)r4; (void)r5; (void)hf;
	__atomic_store_n((u32 *)r1, 0, __ATOMIC_RELEASE);
	return 0;
}
