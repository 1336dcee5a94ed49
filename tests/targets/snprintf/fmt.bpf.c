/* bpf_snprintf from a program (test_intarget_helpers_e2e.py): say(name, n) formats the target's
 * string, numbers, a character and an address on the program's stack into a map value. */
#include <linux/bpf.h>
#include <linux/ptrace.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

struct line { __s64 ret, ret_small; char text[96]; char small[8]; };
struct { __uint(type, BPF_MAP_TYPE_HASH); __uint(max_entries, 64); __type(key, __u64);
	__type(value, struct line); } lines SEC(".maps");

SEC("uprobe") int say(struct pt_regs *ctx)
{
	const char *name = (const char *)PT_REGS_PARM1(ctx);
	__u64 n = PT_REGS_PARM2(ctx);
	__u8 ip[4] = { 10, (__u8)n, 0, 1 };
	struct line l = {};
	l.ret = BPF_SNPRINTF(l.text, sizeof(l.text), "%s has %ld (%5d|%-4x|%c|%pI4|%pus|%+03d|%%)",
			     name, n, (int)n, (unsigned)n * 7, 'a' + (char)(n % 26), ip, name, -(int)n);
	l.ret_small = BPF_SNPRINTF(l.small, sizeof(l.small), "%08lx", n * 0x1234567);
	bpf_map_update_elem(&lines, &n, &l, 0);
	return 0;
}
