// SPDX-License-Identifier: GPL-2.0
// Programs of the overhead benchmark, one entry and one return variant of each:
//   count_*  trivial: one array counter increment
//   hash_*   map-heavy: hash lookup, then update or in-place increment, per hit
//   read_*   probe_read_user-heavy: 4 x 64 bytes of the target's stack per hit
//   ring_*   ring buffer output of a 32-byte event per hit
//   pcount_entry  the multi-thread run's program: a PERCPU_ARRAY counter, so threads on
//                 different CPUs share no written line and the run measures the probe,
//                 not the program's own contended atomic (count_entry shows that case)
// Every program counts its hits in hits[0] (entry) or hits[1] (return) -- pcount in
// phits[0], summed over CPUs -- so the driver can check that each run saw exactly N
// hits; hits[2] counts ring buffer records the kernel could not reserve.
#include <linux/bpf.h>
#include <linux/ptrace.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 4);
	__type(key, __u32);
	__type(value, __u64);
} hits SEC(".maps");

/* pcount's counter: one copy per CPU, so threads on different CPUs write different lines */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 4);
	__type(key, __u32);
	__type(value, __u64);
} phits SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u64);
	__type(value, __u64);
} table SEC(".maps");

/* room for every record of a run without a consumer: 'both' on 200,000 in-target calls
 * writes 400,000 records of 40 bytes (header included) */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 32 << 20);
} events SEC(".maps");

struct event {
	__u64 ts;
	__u64 arg;
	__u32 pid;
	__u32 slot;
	__u64 pad;
};

static __always_inline void count(__u32 slot)
{
	__u64 *v = bpf_map_lookup_elem(&hits, &slot);
	if (v)
		__sync_fetch_and_add(v, 1);
}

static __always_inline void hash_work(__u64 x)
{
	__u64 key = x & 1023, one = 1;
	__u64 *v = bpf_map_lookup_elem(&table, &key);
	if (v)
		*v += 1;
	else
		bpf_map_update_elem(&table, &key, &one, BPF_ANY);
}

static __always_inline void read_work(struct pt_regs *ctx, __u32 slot)
{
	char buf[64];
	__u64 acc = 0;
	const char *p = (const char *)PT_REGS_SP(ctx);
#pragma unroll
	for (int i = 0; i < 4; i++) {
		if (bpf_probe_read_user(buf, sizeof(buf), p + i * 64) == 0)
			acc += buf[i];
	}
	/* keep the reads live: the sum lands in a slot nobody checks */
	__u32 k = 3;
	__u64 *v = bpf_map_lookup_elem(&hits, &k);
	if (v)
		*v ^= acc;
}

static __always_inline void ring_work(__u64 arg, __u32 slot)
{
	struct event e = {
		.ts = bpf_ktime_get_ns(),
		.arg = arg,
		.pid = bpf_get_current_pid_tgid() >> 32,
		.slot = slot,
	};
	if (bpf_ringbuf_output(&events, &e, sizeof(e), 0))
		count(2);
}

SEC("uprobe") int count_entry(struct pt_regs *ctx) { count(0); return 0; }
SEC("uprobe") int pcount_entry(struct pt_regs *ctx)
{
	__u32 slot = 0;
	__u64 *v = bpf_map_lookup_elem(&phits, &slot);
	if (v)
		*v += 1;
	return 0;
}
SEC("uretprobe") int count_exit(struct pt_regs *ctx) { count(1); return 0; }

SEC("uprobe") int hash_entry(struct pt_regs *ctx) { hash_work(PT_REGS_PARM1(ctx)); count(0); return 0; }
SEC("uretprobe") int hash_exit(struct pt_regs *ctx) { hash_work(PT_REGS_RC(ctx)); count(1); return 0; }

SEC("uprobe") int read_entry(struct pt_regs *ctx) { read_work(ctx, 0); count(0); return 0; }
SEC("uretprobe") int read_exit(struct pt_regs *ctx) { read_work(ctx, 1); count(1); return 0; }

SEC("uprobe") int ring_entry(struct pt_regs *ctx) { ring_work(PT_REGS_PARM1(ctx), 0); count(0); return 0; }
SEC("uretprobe") int ring_exit(struct pt_regs *ctx) { ring_work(PT_REGS_RC(ctx), 1); count(1); return 0; }
