// SPDX-License-Identifier: GPL-2.0
// funclatency for ubpf-run: a log2 histogram of one function's latency, like libbpf-tools'
// funclatency.  Attach both programs to the function you measure:
//   ubpf-run funclatency.bpf.c -a func_entry=libc.so.6:malloc -a func_exit=libc.so.6:malloc -i 1 --clear --pid PID
// --set units=0 (ns), 1 (us, default) or 2 (ms); --set targ_tgid=PID filters one process.
#include <linux/bpf.h>
#include <linux/ptrace.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

#define MAX_SLOTS 32

struct hist {
	__u32 slots[MAX_SLOTS];
};

const volatile __u32 targ_tgid = 0;
const volatile __u32 units = 1;

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 10240);
	__type(key, __u32);
	__type(value, __u64);
} starts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct hist);
} latency SEC(".maps");

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
int BPF_KPROBE(func_entry)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u32 tid = (__u32)id;
	__u64 ts;

	if (targ_tgid && (id >> 32) != targ_tgid)
		return 0;
	ts = bpf_ktime_get_ns();
	bpf_map_update_elem(&starts, &tid, &ts, BPF_ANY);
	return 0;
}

SEC("uretprobe")
int BPF_KRETPROBE(func_exit)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	__u32 zero = 0, slot;
	__u64 *tsp, delta;
	struct hist *h;

	tsp = bpf_map_lookup_elem(&starts, &tid);
	if (!tsp)
		return 0;
	delta = bpf_ktime_get_ns() - *tsp;
	bpf_map_delete_elem(&starts, &tid);
	if (units == 1)
		delta /= 1000;
	else if (units == 2)
		delta /= 1000000;
	slot = log2_u64(delta);
	if (slot >= MAX_SLOTS)
		slot = MAX_SLOTS - 1;
	h = bpf_map_lookup_elem(&latency, &zero);
	if (h)
		__sync_fetch_and_add(&h->slots[slot], 1);
	return 0;
}
