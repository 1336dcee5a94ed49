/*
 * Internal header of the in-target runtime (the C files of runtime/): freestanding, no libc.
 *
 * Everything here runs inside the traced process, entered from a trampoline that
 * saves only the general registers: no SSE (-mgeneral-regs-only), no stack
 * protector, no unwind tables, and every failure is an error code, never a
 * fault.  Layouts come from the generated ubpf_abi.h (python -m ubpf_py.abi).
 */
#ifndef UBPF_RT_H
#define UBPF_RT_H
#include <stddef.h>
#include "ubpf_abi.h"

#define RT_API __attribute__((visibility("default")))
#define RT_INTERNAL __attribute__((visibility("hidden")))
#define LIKELY(x) __builtin_expect(!!(x), 1)
#define UNLIKELY(x) __builtin_expect(!!(x), 0)
#define NEG(e) ((uint64_t)-(int64_t)(e))

typedef uint64_t u64;
typedef uint32_t u32;
typedef uint16_t u16;
typedef uint8_t u8;
typedef int64_t s64;

/* syscall numbers (x86-64) */
enum { SYS_getpid = 39, SYS_kill = 62, SYS_getuid = 102, SYS_getgid = 104, SYS_prctl = 157,
       SYS_gettid = 186, SYS_sched_yield = 24, SYS_clock_gettime = 228, SYS_tgkill = 234,
       SYS_getcpu = 309, SYS_process_vm_readv = 310 };
enum { CLOCK_MONOTONIC = 1, CLOCK_BOOTTIME = 7, PR_GET_NAME = 16 };

static inline long rt_syscall6(long n, long a, long b, long c, long d, long e, long f)
{
	register long r10 __asm__("r10") = d;
	register long r8 __asm__("r8") = e;
	register long r9 __asm__("r9") = f;
	long ret;
	__asm__ volatile("syscall" : "=a"(ret) : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
			 : "rcx", "r11", "memory");
	return ret;
}
#define rt_syscall0(n) rt_syscall6((n), 0, 0, 0, 0, 0, 0)
#define rt_syscall2(n, a, b) rt_syscall6((n), (long)(a), (long)(b), 0, 0, 0, 0)
#define rt_syscall3(n, a, b, c) rt_syscall6((n), (long)(a), (long)(b), (long)(c), 0, 0, 0)

static inline void rt_pause(void) { __asm__ volatile("pause" ::: "memory"); }

/* u64 word at word index of a descriptor, accessed atomically */
#define LOAD(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)

/* The map locks: a u64 word, 0 free.  Bounded: a holder that died or is stopped
 * (the tracer killed, a thread held by ptrace) costs an -EBUSY, never a hang. */
static inline int rt_lock(u64 *w)
{
	for (u64 i = 0; i < UBPF_LOCK_SPINS; i++) {
		if (__atomic_load_n(w, __ATOMIC_RELAXED) == 0 &&
		    __atomic_exchange_n(w, 1, __ATOMIC_ACQUIRE) == 0)
			return 0;
		if (i < 64)
			rt_pause();
		else
			rt_syscall0(SYS_sched_yield);   /* let a preempted holder run */
	}
	return -(int)UBPF_EBUSY;
}

static inline void rt_unlock(u64 *w) { __atomic_store_n(w, 0, __ATOMIC_RELEASE); }

/* lib.c */
RT_INTERNAL void rt_copy(void *dst, const void *src, u64 n);
RT_INTERNAL void rt_zero(void *dst, u64 n);
RT_INTERNAL int rt_equal(const void *a, const void *b, u64 n);
RT_INTERNAL long rt_read_user(const struct ubpf_hit_frame *hf, void *dst, u64 src, u64 n);
RT_INTERNAL long rt_read_user_str(const struct ubpf_hit_frame *hf, char *dst, u64 src, u64 size);
RT_INTERNAL u64 rt_getpid(const struct ubpf_hit_frame *hf);
RT_INTERNAL int rt_prog_mem(const struct ubpf_hit_frame *hf, u64 addr, u64 n);
RT_INTERNAL u64 rt_gettid(const struct ubpf_hit_frame *hf);
RT_INTERNAL u64 rt_cpu(const struct ubpf_hit_frame *hf);
RT_INTERNAL u64 rt_cpu_sample(const struct ubpf_runtime_header *rt);
RT_INTERNAL u64 rt_ktime(const struct ubpf_hit_frame *hf, int clock);
RT_INTERNAL u64 rt_unwind(const struct ubpf_hit_frame *hf, u64 *out, u64 max);

/* maps.c / ringbuf.c (tracer entry points, also used by the helpers) */
RT_API u64 ubpf_map_lookup(struct ubpf_map_desc *d, const void *key, s64 cpu);
RT_API s64 ubpf_map_update(struct ubpf_map_desc *d, const void *key, const void *value, u64 flags, s64 cpu);
RT_API s64 ubpf_map_delete(struct ubpf_map_desc *d, const void *key);
RT_API u64 ubpf_rb_reserve(struct ubpf_map_desc *d, u64 size);
RT_API s64 ubpf_rb_commit(u64 sample, u64 discard);
RT_API s64 ubpf_rb_output(struct ubpf_map_desc *d, const void *data, u64 size);
RT_API s64 ubpf_perf_output(struct ubpf_map_desc *d, u64 cpu, const void *data, u64 size, u64 flags);

static inline u32 rol32(u32 x, int k) { return (x << k) | (x >> (32 - k)); }

#define JHASH_MIX(a, b, c) do { \
	a -= c; a ^= rol32(c, 4); c += b; \
	b -= a; b ^= rol32(a, 6); a += c; \
	c -= b; c ^= rol32(b, 8); b += a; \
	a -= c; a ^= rol32(c, 16); c += b; \
	b -= a; b ^= rol32(a, 19); a += c; \
	c -= b; c ^= rol32(b, 4); b += a; } while (0)

#define JHASH_FINAL(a, b, c) do { \
	c ^= b; c -= rol32(b, 14); \
	a ^= c; a -= rol32(c, 11); \
	b ^= a; b -= rol32(a, 25); \
	c ^= b; c -= rol32(b, 16); \
	a ^= c; a -= rol32(c, 4); \
	b ^= a; b -= rol32(a, 14); \
	c ^= b; c -= rol32(b, 24); } while (0)

/* the kernel's jhash2 (lookup3) over n u32 words */
static inline u32 jhash2(const u32 *k, u64 n, u32 initval)
{
	u32 a, b, c;
	a = b = c = 0xdeadbeef + ((u32)n << 2) + initval;
	while (n > 3) {
		a += k[0]; b += k[1]; c += k[2];
		JHASH_MIX(a, b, c);
		n -= 3;
		k += 3;
	}
	switch (n) {
	case 3: c += k[2]; /* fall through */
	case 2: b += k[1]; /* fall through */
	case 1: a += k[0];
		JHASH_FINAL(a, b, c);
		break;
	default: break;
	}
	return c;
}

/* the kernel's jhash over bytes (little-endian loads, tail added byte by byte) */
static inline u32 jhash(const u8 *k, u64 len, u32 initval)
{
	u32 a, b, c;
	a = b = c = 0xdeadbeef + (u32)len + initval;
	while (len > 12) {
		a += k[0] | k[1] << 8 | k[2] << 16 | (u32)k[3] << 24;
		b += k[4] | k[5] << 8 | k[6] << 16 | (u32)k[7] << 24;
		c += k[8] | k[9] << 8 | k[10] << 16 | (u32)k[11] << 24;
		JHASH_MIX(a, b, c);
		len -= 12;
		k += 12;
	}
	if (!len)
		return c;
	u8 t[12] = {0};
	for (u64 i = 0; i < len; i++)
		t[i] = k[i];
	a += t[0] | t[1] << 8 | t[2] << 16 | (u32)t[3] << 24;
	b += t[4] | t[5] << 8 | t[6] << 16 | (u32)t[7] << 24;
	c += t[8] | t[9] << 8 | t[10] << 16 | (u32)t[11] << 24;
	JHASH_FINAL(a, b, c);
	return c;
}

#define HELPER(id) RT_API u64 ubpf_helper_##id(u64 r1, u64 r2, u64 r3, u64 r4, u64 r5, \
					       struct ubpf_hit_frame *hf)
#define UNUSED_ARGS(...) (void)0
#endif
