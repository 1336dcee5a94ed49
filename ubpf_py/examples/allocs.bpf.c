// SPDX-License-Identifier: GPL-2.0
// The Python API's example (README "Python API"): per-process malloc() counts in a hash map
// with a struct key, a libbpf-tools style log2 histogram (struct hist { slots[] }), and a ring
// buffer record for every allocation of at least min_size bytes.
#include <linux/bpf.h>
#include <linux/ptrace.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

#define MAX_SLOTS 32

struct key {
	__u32 tgid;
	char comm[16];
};

struct hist {
	__u32 slots[MAX_SLOTS];
};

struct event {
	__u64 size;
	__u32 tgid;
	__u32 pad;
};

const volatile __u64 min_size = 65536;
__u64 big = 0;

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16);
	__type(key, struct key);
	__type(value, __u64);
} counts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct hist);
} sizes SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 64 * 1024);
} events SEC(".maps");

static __always_inline __u32 log2_u64(__u64 v)
{
	__u32 r = 0;

	if (v >> 32) { v >>= 32; r += 32; }
	if (v >> 16) { v >>= 16; r += 16; }
	if (v >> 8)  { v >>= 8;  r += 8; }
	if (v >> 4)  { v >>= 4;  r += 4; }
	if (v >> 2)  { v >>= 2;  r += 2; }
	if (v >> 1)  { r += 1; }
	return r;
}

SEC("uprobe")
int BPF_KPROBE(malloc_entry, __u64 size)
{
	struct key k = {};
	__u64 one = 1, *n;
	__u32 zero = 0, slot;
	struct hist *h;

	k.tgid = bpf_get_current_pid_tgid() >> 32;
	bpf_get_current_comm(k.comm, sizeof(k.comm));
	n = bpf_map_lookup_elem(&counts, &k);
	if (n)
		__sync_fetch_and_add(n, 1);
	else
		bpf_map_update_elem(&counts, &k, &one, BPF_NOEXIST);

	h = bpf_map_lookup_elem(&sizes, &zero);
	slot = log2_u64(size);
	if (h && slot < MAX_SLOTS)
		__sync_fetch_and_add(&h->slots[slot], 1);

	if (size >= min_size) {
		struct event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);

		__sync_fetch_and_add(&big, 1);
		if (e) {
			e->size = size;
			e->tgid = k.tgid;
			e->pad = 0;
			bpf_ringbuf_submit(e, 0);
		}
	}
	return 0;
}
