/* Map-in-map lookups (tests/test_intarget_mapinmap.py, test_intarget_helpers_e2e.py): bump(slot, j)
 * looks `slot` up in an ARRAY_OF_MAPS and a HASH_OF_MAPS (slots 0/2 and 1/3 hold maps, the others
 * are empty), then uses the inner map: adds to an array element, inserts or increments a hash
 * element, and walks the inner array with bpf_for_each_map_elem. */
#include <linux/bpf.h>
#include <linux/ptrace.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

struct inner_array {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 4);
	__type(key, __u32);
	__type(value, __u64);
} a0 SEC(".maps"), a1 SEC(".maps");

struct inner_hash {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 8);
	__type(key, __u32);
	__type(value, __u64);
} h0 SEC(".maps"), h1 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, 4);
	__type(key, __u32);
	__array(values, struct inner_array);
} outer_a SEC(".maps") = { .values = { [0] = &a0, [2] = &a1 } };

struct {
	__uint(type, BPF_MAP_TYPE_HASH_OF_MAPS);
	__uint(max_entries, 4);
	__type(key, __u32);
	__array(values, struct inner_hash);
} outer_h SEC(".maps") = { .values = { [1] = &h0, [3] = &h1 } };

struct stats { __u64 array_hits, array_misses, hash_hits, hash_misses, inserts, walked, sum; };
struct { __uint(type, BPF_MAP_TYPE_ARRAY); __uint(max_entries, 1); __type(key, __u32);
	__type(value, struct stats); } stats SEC(".maps");

struct walk { __u64 walked, sum; };

static long sum_cb(void *map, __u32 *key, __u64 *val, struct walk *w)
{
	w->walked++;
	w->sum += *val;
	return 0;
}

SEC("uprobe") int bump(struct pt_regs *ctx)
{
	__u32 zero = 0, slot = PT_REGS_PARM1(ctx), j = PT_REGS_PARM2(ctx) & 7;
	__u64 one = 1;
	struct stats *s = bpf_map_lookup_elem(&stats, &zero);
	if (!s)
		return 0;
	void *inner = bpf_map_lookup_elem(&outer_a, &slot);
	if (inner) {
		__u32 aj = j & 3;
		__u64 *v = bpf_map_lookup_elem(inner, &aj);
		if (v)
			*v += j + 1;
		s->array_hits++;
		struct walk w = {};
		bpf_for_each_map_elem(inner, sum_cb, &w, 0);
		s->walked += w.walked;
		s->sum += w.sum;
	} else {
		s->array_misses++;
	}
	inner = bpf_map_lookup_elem(&outer_h, &slot);
	if (inner) {
		__u64 *v = bpf_map_lookup_elem(inner, &j);
		if (v)
			*v += 1;
		else if (bpf_map_update_elem(inner, &j, &one, BPF_NOEXIST) == 0)
			s->inserts++;
		s->hash_hits++;
	} else {
		s->hash_misses++;
	}
	return 0;
}
