/* Programs for tests/test_intarget_e2e.py: counters, return-value and argument tallies,
 * per-thread keys and bad-pointer reads, attached with --no-auto -a NAME=BINARY:FUNC. */
#include <linux/bpf.h>
#include <linux/ptrace.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

/* counts[i]: hits of program e<i> (entry) or r<i> (return), atomically */
struct { __uint(type, BPF_MAP_TYPE_ARRAY); __uint(max_entries, 8); __type(key, __u32); __type(value, __u64); } counts SEC(".maps");
/* return value -> how often (r0), first argument -> how often (a0) */
struct { __uint(type, BPF_MAP_TYPE_HASH); __uint(max_entries, 256); __type(key, __u64); __type(value, __u64); } rets SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_HASH); __uint(max_entries, 256); __type(key, __u64); __type(value, __u64); } args SEC(".maps");
/* thread id -> calls */
struct { __uint(type, BPF_MAP_TYPE_HASH); __uint(max_entries, 64); __type(key, __u32); __type(value, __u64); } per_tid SEC(".maps");

struct read_result { __s64 ret, ret_str; __u8 buf[16], str[16]; };
struct { __uint(type, BPF_MAP_TYPE_ARRAY); __uint(max_entries, 8); __type(key, __u32); __type(value, struct read_result); } reads SEC(".maps");

static __always_inline void bump(__u32 i)
{
	__u64 *v = bpf_map_lookup_elem(&counts, &i);
	if (v)
		__sync_fetch_and_add(v, 1);
}

static __always_inline void tally(void *map, __u64 key)
{
	__u64 one = 1, *v = bpf_map_lookup_elem(map, &key);
	if (v)
		__sync_fetch_and_add(v, 1);
	else if (bpf_map_update_elem(map, &key, &one, BPF_NOEXIST) && (v = bpf_map_lookup_elem(map, &key)))
		__sync_fetch_and_add(v, 1);
}

SEC("uprobe") int e0(struct pt_regs *ctx) { bump(0); return 0; }
SEC("uprobe") int e1(struct pt_regs *ctx) { bump(1); return 0; }
SEC("uprobe") int e2(struct pt_regs *ctx) { bump(2); return 0; }
SEC("uretprobe") int r3(struct pt_regs *ctx) { bump(3); return 0; }
SEC("uretprobe") int r4(struct pt_regs *ctx) { bump(4); return 0; }

SEC("uretprobe") int r0(struct pt_regs *ctx)
{
	bump(5);
	tally(&rets, PT_REGS_RC(ctx));
	return 0;
}

SEC("uprobe") int a0(struct pt_regs *ctx)
{
	bump(6);
	tally(&args, PT_REGS_PARM1(ctx));
	return 0;
}

SEC("uprobe") int tid(struct pt_regs *ctx)
{
	__u32 key = (__u32)bpf_get_current_pid_tgid();
	__u64 one = 1, *v = bpf_map_lookup_elem(&per_tid, &key);
	if (v)
		*v += 1;        /* only this thread writes its key */
	else
		bpf_map_update_elem(&per_tid, &key, &one, BPF_NOEXIST);
	return 0;
}

SEC("uprobe") int rd(struct pt_regs *ctx)
{
	struct read_result r;
	__u32 idx = PT_REGS_PARM2(ctx);
	const void *p = (const void *)PT_REGS_PARM1(ctx);
	__builtin_memset(&r, 0xaa, sizeof(r));
	r.ret = bpf_probe_read_user(r.buf, sizeof(r.buf), p);
	r.ret_str = bpf_probe_read_user_str(r.str, sizeof(r.str), p);
	if (idx < 8)
		bpf_map_update_elem(&reads, &idx, &r, BPF_ANY);
	return 0;
}

/* every call but the handler's own (argument -1) sends SIGUSR1 to this thread; the kernel
 * delivers it when the hit is over, and the handler's call of the function is a hit too */
SEC("uprobe") int sig(struct pt_regs *ctx)
{
	bump(7);
	if ((long)PT_REGS_PARM1(ctx) != -1)
		bpf_send_signal(10);
	return 0;
}
