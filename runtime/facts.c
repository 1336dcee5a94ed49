/*
 * Facts about the current task and time: ktime (5, 125), prandom (7), cpu (8),
 * pid/tgid (14), uid/gid (15), comm (16), send_signal (109, 117), func_ip (173),
 * attach cookie (174).  Each reads what the kernel reads at the time of the call
 * (credentials after setresuid, the comm after a rename, the tid of this very
 * thread), so nothing here caches per-process facts in shared memory.
 */
#include "rt.h"

HELPER(5)     /* bpf_ktime_get_ns: CLOCK_MONOTONIC */
{
	(void)r1; (void)r2; (void)r3; (void)r4; (void)r5;
	return rt_ktime(hf, CLOCK_MONOTONIC);
}

HELPER(125)   /* bpf_ktime_get_boot_ns: CLOCK_BOOTTIME */
{
	(void)r1; (void)r2; (void)r3; (void)r4; (void)r5;
	return rt_ktime(hf, CLOCK_BOOTTIME);
}

/* per-thread xorshift64* state in the thread block, seeded from the TSC and the tid */
HELPER(7)     /* bpf_get_prandom_u32 */
{
	(void)r1; (void)r2; (void)r3; (void)r4; (void)r5;
	struct ubpf_thread_block *tb = (struct ubpf_thread_block *)hf->thread;
	u64 x = tb->prandom;
	if (!x) {
		u32 lo, hi;
		__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
		x = (((u64)hi << 32) | lo) ^ (rt_gettid(hf) * 0x9e3779b97f4a7c15ull) ^ (u64)tb;
		if (!x)
			x = 1;
	}
	x ^= x >> 12;
	x ^= x << 25;
	x ^= x >> 27;
	tb->prandom = x;
	return (u32)((x * 0x2545f4914f6cdd1dull) >> 32);
}

HELPER(8)     /* bpf_get_smp_processor_id */
{
	(void)r1; (void)r2; (void)r3; (void)r4; (void)r5;
	return rt_cpu(hf);
}

HELPER(14)    /* bpf_get_current_pid_tgid */
{
	(void)r1; (void)r2; (void)r3; (void)r4; (void)r5;
	return rt_getpid(hf) << 32 | rt_gettid(hf);
}

HELPER(15)    /* bpf_get_current_uid_gid: the real ids (cred->uid/gid) at this moment */
{
	(void)r1; (void)r2; (void)r3; (void)r4; (void)r5; (void)hf;
	return (u64)(u32)rt_syscall0(SYS_getgid) << 32 | (u32)rt_syscall0(SYS_getuid);
}

HELPER(16)    /* bpf_get_current_comm(buf, size): strscpy_pad of this thread's comm */
{
	(void)r3; (void)r4; (void)r5; (void)hf;
	char comm[16] = {0};
	u64 size = r2 & 0xffffffff, n = 0;
	u8 *dst = (u8 *)r1;
	if (!size)
		return 0;
	rt_syscall2(SYS_prctl, PR_GET_NAME, comm);
	while (n < 15 && n < size - 1 && comm[n])
		n++;
	rt_copy(dst, comm, n);
	rt_zero(dst + n, size - n);
	return 0;
}

/* bpf_send_signal*: the kernel delivers the signal on the return to user mode, after the
 * hit; a kill() here would deliver it at once, inside the program, on the runtime stack (a
 * handler's own probe hits would then be skipped as nested).  So the signal is blocked for
 * this thread first (the mask before the hit is kept in the thread block) and the
 * trampoline restores the mask once the hit is over: the signal arrives there, on the
 * target's stack.  send_signal is process-directed as in the kernel; while this thread
 * blocks it another thread of the process may take it, where the kernel prefers the
 * current one. */
static u64 defer_and_send(const struct ubpf_hit_frame *hf, u64 sig, int thread)
{
	struct ubpf_thread_block *tb = (struct ubpf_thread_block *)hf->thread;
	if (sig > 64)
		return NEG(UBPF_EINVAL);
	if (sig && tb) {
		u64 set = 1ull << (sig - 1);
		u64 *old = tb->sig_deferred ? 0 : &tb->sig_saved_mask;
		if (rt_syscall6(UBPF_SYS_RT_SIGPROCMASK, UBPF_SIG_BLOCK, (long)&set, (long)old, 8, 0, 0) == 0)
			tb->sig_deferred = 1;
	}
	if (thread)
		return (u64)rt_syscall3(SYS_tgkill, rt_getpid(hf), rt_gettid(hf), sig);
	return (u64)rt_syscall2(SYS_kill, rt_getpid(hf), sig);
}

HELPER(109)   /* bpf_send_signal: the whole process */
{
	(void)r2; (void)r3; (void)r4; (void)r5;
	return defer_and_send(hf, r1 & 0xffffffff, 0);
}

HELPER(117)   /* bpf_send_signal_thread: this thread */
{
	(void)r2; (void)r3; (void)r4; (void)r5;
	return defer_and_send(hf, r1 & 0xffffffff, 1);
}

HELPER(173)   /* bpf_get_func_ip */
{
	(void)r1; (void)r2; (void)r3; (void)r4; (void)r5;
	return ((struct ubpf_probe_block *)hf->probe)->func_ip;
}

HELPER(174)   /* bpf_get_attach_cookie */
{
	(void)r1; (void)r2; (void)r3; (void)r4; (void)r5;
	return ((struct ubpf_probe_block *)hf->probe)->cookie;
}

HELPER(160)   /* bpf_ktime_get_coarse_ns: CLOCK_MONOTONIC_COARSE */
{
	(void)r1; (void)r2; (void)r3; (void)r4; (void)r5;
	return rt_ktime(hf, 6 /* CLOCK_MONOTONIC_COARSE */);
}

HELPER(118)   /* bpf_jiffies64: the tracer's calibration (header hz, jiffies_base) on CLOCK_MONOTONIC */
{
	(void)r1; (void)r2; (void)r3; (void)r4; (void)r5;
	const struct ubpf_runtime_header *rt = (const void *)hf->runtime;
	u64 ns = rt_ktime(hf, CLOCK_MONOTONIC), hz = rt->hz;
	/* floor(ns * hz / 1e9) without a 128-bit product */
	return rt->jiffies_base + ns / 1000000000ull * hz + ns % 1000000000ull * hz / 1000000000ull;
}
