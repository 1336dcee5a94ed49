// SPDX-License-Identifier: GPL-2.0
// The README's example: a log2 histogram of malloc() sizes in any program that
// uses glibc, plus a printk line for every large allocation.  Built with
//   clang -O2 -g -target bpf -D__TARGET_ARCH_x86 -I/usr/include/x86_64-linux-gnu \
//         -c mallocsize.bpf.c -o mallocsize.bpf.o
#include <linux/bpf.h>
#include <linux/ptrace.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

__u64 size_hist[32] = {};   /* slot i counts sizes in [2^i, 2^(i+1)) */
__u64 calls = 0;
__u64 bytes = 0;

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

SEC("uprobe/libc.so.6:malloc")
int BPF_KPROBE(malloc_entry, __u64 size)
{
	__u32 slot = log2_u64(size);

	if (slot < 32)
		__sync_fetch_and_add(&size_hist[slot], 1);
	__sync_fetch_and_add(&calls, 1);
	__sync_fetch_and_add(&bytes, size);
	if (size >= 65536)
		bpf_printk("large malloc(%lu)", size);
	return 0;
}
