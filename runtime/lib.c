/* Memory primitives, fault-safe reads of the own process, and facts several
 * helpers need (pid, tid, cpu, clocks).  Built with
 * -fno-tree-loop-distribute-patterns so gcc never turns these loops back into
 * calls of themselves. */
#include "rt.h"

typedef u64 __attribute__((may_alias, aligned(1))) u64_un;

/* gcc may emit calls of these for struct copies even when freestanding */
RT_INTERNAL void *memcpy(void *dst, const void *src, size_t n);
RT_INTERNAL void *memset(void *dst, int c, size_t n);
RT_INTERNAL int memcmp(const void *a, const void *b, size_t n);

void *memcpy(void *dst, const void *src, size_t n)
{
	rt_copy(dst, src, n);
	return dst;
}

void *memset(void *dst, int c, size_t n)
{
	u8 *d = dst;
	while (n--)
		*d++ = (u8)c;
	return dst;
}

int memcmp(const void *a, const void *b, size_t n)
{
	const u8 *x = a, *y = b;
	for (; n; n--, x++, y++)
		if (*x != *y)
			return *x < *y ? -1 : 1;
	return 0;
}

void rt_copy(void *dst, const void *src, u64 n)
{
	u8 *d = dst;
	const u8 *s = src;
	for (; n >= 8; n -= 8, d += 8, s += 8)
		*(u64_un *)d = *(const u64_un *)s;
	while (n--)
		*d++ = *s++;
}

void rt_zero(void *dst, u64 n)
{
	u8 *d = dst;
	for (; n >= 8; n -= 8, d += 8)
		*(u64_un *)d = 0;
	while (n--)
		*d++ = 0;
}

int rt_equal(const void *a, const void *b, u64 n)
{
	const u8 *x = a, *y = b;
	for (; n >= 8; n -= 8, x += 8, y += 8)
		if (*(const u64_un *)x != *(const u64_un *)y)
			return 0;
	while (n--)
		if (*x++ != *y++)
			return 0;
	return 1;
}

/* The tgid is cached in the thread block, which lives in the target's private
 * thread table (a forked child gets a copy), and is trusted only while the block's
 * generation equals the runtime header's: the tracer bumps that on every fork
 * before the child can run a probe, so a child never uses its parent's tgid.
 * The tid is never cached: a new thread can reuse an exited thread's FS base and so
 * its thread block, and nothing cheap tells the two apart. */
u64 rt_getpid(const struct ubpf_hit_frame *hf)
{
	struct ubpf_thread_block *tb = hf ? (struct ubpf_thread_block *)hf->thread : 0;
	const struct ubpf_runtime_header *rt = hf ? (const void *)hf->runtime : 0;
	if (!tb || !rt)
		return (u64)rt_syscall0(SYS_getpid);
	u64 gen = LOAD(&rt->generation);
	if (tb->tgid && tb->generation == gen)
		return tb->tgid;
	u64 pid = (u64)rt_syscall0(SYS_getpid);
	tb->tgid = pid;
	tb->generation = gen;
	return pid;
}

/* The tid without a syscall where the libc keeps it: glibc and musl hold the
 * thread's tid in their struct pthread at a fixed offset from the FS base, and keep
 * it right across fork (the child's word is set to its new tid) and thread-block
 * reuse (a new thread on a recycled TCB gets its own tid there; an exited thread's
 * word is cleared by the kernel through clear_child_tid).  The offset is the one the
 * tracer found on the stopped threads (RUNTIME_HEADER.tid_fs_off), or -- when it
 * found none, as for a command it launched and armed before the libc set up any
 * thread -- one of the known libc offsets that this thread checks for itself.  The
 * thread block caches the tid once it was checked against gettid(), with a safe read
 * of the word, for this FS base; afterwards a hit compares the word with the cache --
 * any change means another thread (or a fork) and falls back to the syscall. */
static int tid_word_is(const struct ubpf_hit_frame *hf, u64 fs, u64 off, u64 tid)
{
	u32 word = 0;
	return !rt_read_user(hf, &word, fs + off, 4) && word == (u32)tid;
}

u64 rt_gettid(const struct ubpf_hit_frame *hf)
{
	const struct ubpf_runtime_header *rt = hf ? (const void *)hf->runtime : 0;
	struct ubpf_thread_block *tb = hf ? (struct ubpf_thread_block *)hf->thread : 0;
	if (!rt || !tb || !(rt->flags & UBPF_RT_F_FSGSBASE))
		return (u64)rt_syscall0(SYS_gettid);
	u64 fs;
	__asm__ volatile("rdfsbase %0" : "=r"(fs));
	if (tb->tid && tb->tid_fs == fs) {
		u32 cur;
		__asm__ volatile("movl %%fs:(%1), %0" : "=r"(cur) : "r"(tb->tid_off) : "memory");
		if (cur == (u32)tb->tid)
			return cur;
	}
	u64 tid = (u64)rt_syscall0(SYS_gettid);
	tb->tid = 0;
	if (!fs)
		return tid;          /* no thread pointer yet (the libc is starting up) */
	if (rt->tid_fs_off) {
		if (tid_word_is(hf, fs, rt->tid_fs_off, tid))
			tb->tid_off = rt->tid_fs_off;
		else
			return tid;
	} else if (tid_word_is(hf, fs, UBPF_TID_OFF_GLIBC, tid)) {
		tb->tid_off = UBPF_TID_OFF_GLIBC;
	} else if (tid_word_is(hf, fs, UBPF_TID_OFF_MUSL, tid)) {
		tb->tid_off = UBPF_TID_OFF_MUSL;
	} else {
		return tid;
	}
	tb->tid_fs = fs;
	tb->tid = tid;
	return tid;
}

struct iovec_ { u64 base, len; };

/* Copy n bytes of this process at src: 0, or -EFAULT when any byte is unreadable
 * (process_vm_readv on ourselves: a bad pointer is an error, never a SIGSEGV). */
/* Is [src, src + n) inside a stack page this hit has proved mapped?  At a function's first
 * instruction the call just wrote the return address at [rsp]; after a return probe's ret,
 * [rsp - 8] held it.  That page is the thread's own live stack, so reads there -- a caller's
 * locals, arguments passed on the stack -- are plain copies, with no system call.  Any other
 * site proves nothing about its rsp, and takes the safe path. */
static int in_sp_page(const struct ubpf_hit_frame *hf, u64 src, u64 n)
{
	if (!hf || !hf->ctx || !hf->probe)
		return 0;
	u64 flags = ((const struct ubpf_probe_block *)hf->probe)->flags;
	u64 rsp = ((const struct pt_regs *)hf->ctx)->rsp, anchor;
	if (flags & UBPF_PB_F_RETURN)
		anchor = rsp - 8;
	else if (flags & UBPF_PB_F_AT_ENTRY)
		anchor = rsp;
	else
		return 0;
	u64 page = anchor & ~4095ull;
	if (page < 0x10000)       /* below mmap_min_addr: not a stack (a test's empty frame) */
		return 0;
	return src >= page && n <= 4096 && src - page <= 4096 - n;
}

long rt_read_user(const struct ubpf_hit_frame *hf, void *dst, u64 src, u64 n)
{
	struct iovec_ l = {(u64)dst, n}, r = {src, n};
	if (!n)
		return 0;
	if (in_sp_page(hf, src, n)) {
		rt_copy(dst, (const void *)src, n);
		return 0;
	}
	long got = rt_syscall6(SYS_process_vm_readv, (long)rt_getpid(hf), (long)&l, 1, (long)&r, 1, 0);
	return got == (long)n ? 0 : -(long)UBPF_EFAULT;
}

/* strncpy_from_user: at most size - 1 bytes then a NUL; the length copied including
 * the NUL, or -EFAULT when a byte before the NUL (or the limit) is unreadable.
 * Reads through a small bounce buffer, never across a page boundary in one read
 * (a string ending just before an unmapped page works).  Like the kernel, which
 * copies 8-byte words while 8 bytes remain, the word holding the NUL is stored with
 * its bytes after the NUL zeroed when that whole word is readable and fits in size;
 * nothing else past the NUL is written. */
static void zero_word_tail(const struct ubpf_hit_frame *hf, char *dst, u64 src, u64 nul, u64 size)
{
	u64 word = nul & ~7ull, end = word + 8;
	char probe[8];
	if (end > size || nul + 1 >= end)
		return;
	if ((src + word) >> 12 != (src + end - 1) >> 12 && rt_read_user(hf, probe, src + word, 8))
		return;       /* the word runs into an unreadable page: copied a byte at a time */
	for (u64 i = nul + 1; i < end; i++)
		dst[i] = 0;
}

long rt_read_user_str(const struct ubpf_hit_frame *hf, char *dst, u64 src, u64 size)
{
	char tmp[256];
	u64 want, got = 0;
	if (!size)
		return 0;
	want = size - 1;
	while (got < want) {
		u64 a = src + got;
		u64 chunk = 4096 - (a & 4095);
		if (chunk > want - got)
			chunk = want - got;
		if (chunk > sizeof(tmp))
			chunk = sizeof(tmp);
		if (rt_read_user(hf, tmp, a, chunk))
			return -(long)UBPF_EFAULT;
		for (u64 i = 0; i < chunk; i++) {
			dst[got + i] = tmp[i];
			if (!tmp[i]) {
				zero_word_tail(hf, dst, src, got + i, size);
				return (long)(got + i + 1);
			}
		}
		got += chunk;
	}
	dst[want] = 0;
	return (long)size;
}

/* Is [addr, addr + n) the program's own memory -- what the kernel would call kernel
 * memory: maps and everything else in the arena, and the runtime stacks in the
 * thread table?  probe_read_user refuses it and %pus prints it empty, like the
 * kernel does with kernel addresses; the target's own memory is user memory. */
int rt_prog_mem(const struct ubpf_hit_frame *hf, u64 addr, u64 n)
{
	const struct ubpf_runtime_header *rt = hf ? (const void *)hf->runtime : 0;
	if (!rt)
		return 0;
	if (addr >= rt->arena_base && addr - rt->arena_base < rt->arena_size &&
	    n <= rt->arena_size - (addr - rt->arena_base))
		return 1;
	u64 tsz = rt->thread_slots * rt->thread_slot_size;
	return rt->thread_table && addr >= rt->thread_table && addr - rt->thread_table < tsz &&
	       n <= tsz - (addr - rt->thread_table);
}

/* The CPU this thread runs on now: rdpid when the tracer found it usable, else
 * rdtscp's TSC_AUX (Linux keeps the CPU number in its low 12 bits), which every
 * x86-64 CPU Linux supports has; getcpu() only without a runtime header.  A thread
 * can be migrated right after: per-CPU data goes by the hit's owned id (rt_cpu). */
u64 rt_cpu_sample(const struct ubpf_runtime_header *rt)
{
	if (rt && (rt->flags & UBPF_RT_F_RDPID)) {
		u64 v;
		__asm__ volatile("rdpid %0" : "=r"(v));
		return v & 0xfff;
	}
	if (rt) {
		u32 lo, hi, aux;
		__asm__ volatile("rdtscp" : "=a"(lo), "=d"(hi), "=c"(aux));
		return aux & 0xfff;
	}
	unsigned cpu = 0;
	rt_syscall3(SYS_getcpu, &cpu, 0, 0);
	return cpu;
}

/* The hit's CPU: the id it owns (cpuclaim.c) while a program using per-CPU data runs,
 * so bpf_get_smp_processor_id, per-CPU map copies, for_each and printk agree for the
 * whole hit, as under the kernel's migrate_disable; else the CPU sampled now. */
u64 rt_cpu(const struct ubpf_hit_frame *hf)
{
	if (hf && hf->cpu_owner)
		return hf->cpu;
	return rt_cpu_sample(hf ? (const void *)hf->runtime : 0);
}

struct timespec_ { long sec, nsec; };

/* CLOCK_MONOTONIC / CLOCK_BOOTTIME in ns: the target's vDSO when the tracer found
 * it (no syscall), else the syscall. */
u64 rt_ktime(const struct ubpf_hit_frame *hf, int clock)
{
	struct timespec_ ts = {0, 0};
	const struct ubpf_runtime_header *rt = hf ? (const void *)hf->runtime : 0;
	if (rt && rt->vdso_clock_gettime) {
		int (*fn)(long, struct timespec_ *) = (void *)rt->vdso_clock_gettime;
		if (fn(clock, &ts) == 0)
			return (u64)ts.sec * 1000000000ull + (u64)ts.nsec;
	}
	rt_syscall2(SYS_clock_gettime, clock, &ts);
	return (u64)ts.sec * 1000000000ull + (u64)ts.nsec;
}

/* the digest of the sources this object was built from (runtime_build.py) */
#ifdef UBPF_RT_DIGEST
RT_API const char UBPF_RT_DIGEST[] = "ubpf-runtime";
#endif
