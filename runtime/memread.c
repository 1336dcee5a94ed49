/*
 * Reads of the traced process's memory and of its stack: probe_read_user (112),
 * probe_read_user_str (114), the legacy probe_read (4) / probe_read_str (45)
 * (user memory on x86-64; the program's own memory is the same address space
 * here) and get_stack (67).  Every read goes through process_vm_readv on the own
 * process, so a bad pointer is -EFAULT with the destination zeroed, as in the
 * kernel, and never a fault in the target.
 */
#include "rt.h"

static u64 read_mem(const struct ubpf_hit_frame *hf, u64 dst, u64 size, u64 src, int user)
{
	size &= 0xffffffff;
	if (!size)
		return 0;
	if ((user && rt_prog_mem(hf, src, size)) || rt_read_user(hf, (void *)dst, src, size)) {
		rt_zero((void *)dst, size);
		return NEG(UBPF_EFAULT);
	}
	return 0;
}

static u64 read_str(const struct ubpf_hit_frame *hf, u64 dst, u64 size, u64 src, int user)
{
	size &= 0xffffffff;
	if (!size)
		return 0;
	long n = user && rt_prog_mem(hf, src, 1) ? -(long)UBPF_EFAULT : rt_read_user_str(hf, (char *)dst, src, size);
	if (n < 0)
		rt_zero((void *)dst, size);
	return (u64)n;
}

/* the _user variants refuse the program's own memory (kernel memory to the kernel) */
HELPER(112) { (void)r4; (void)r5; return read_mem(hf, r1, r2, r3, 1); }   /* probe_read_user */
HELPER(4) { (void)r4; (void)r5; return read_mem(hf, r1, r2, r3, 0); }     /* probe_read */
HELPER(114) { (void)r4; (void)r5; return read_str(hf, r1, r2, r3, 1); }   /* probe_read_user_str */
HELPER(45) { (void)r4; (void)r5; return read_str(hf, r1, r2, r3, 0); }    /* probe_read_str */

/* the return address a return probe replaced, for frames that show the trampoline */
static u64 fix_ret(const struct ubpf_hit_frame *hf, u64 a, u64 *si)
{
	const struct ubpf_runtime_header *rt = (const void *)hf->runtime;
	const struct ubpf_thread_block *tb = (const void *)hf->thread;
	if (rt->ret_trampoline && a == rt->ret_trampoline && tb && *si < tb->shadow_depth && *si < UBPF_SHADOW_DEPTH) {
		const struct ubpf_shadow_entry *sh = (const void *)tb->shadow;
		a = sh[tb->shadow_depth - 1 - *si].ret_addr;
		(*si)++;
	}
	return a;
}

/* frame-pointer walk of the user stack, innermost first (ip first), as the ptrace
 * path's HitFiller.unwind: the return address at [rsp] too when the probe is on a
 * function's first instruction; stops at a zero, misaligned, unreadable or
 * non-increasing frame pointer */
u64 rt_unwind(const struct ubpf_hit_frame *hf, u64 *out, u64 max)
{
	const struct pt_regs *regs = (const void *)hf->ctx;
	const struct ubpf_probe_block *pb = (const void *)hf->probe;
	u64 n = 0, si = 0, w[2];
	if (!max)
		return 0;
	out[n++] = regs->rip;
	if (pb && (pb->flags & UBPF_PB_F_AT_ENTRY) && n < max && !rt_read_user(hf, w, regs->rsp, 8))
		out[n++] = fix_ret(hf, w[0], &si);
	u64 fp = regs->rbp;
	while (n < max && fp && !(fp & 7)) {
		if (rt_read_user(hf, w, fp, 16) || !w[1])
			break;
		out[n++] = fix_ret(hf, w[1], &si);
		if (w[0] <= fp)
			break;
		fp = w[0];
	}
	return n;
}

#define STACK_MAX 128   /* frames; perf_event_max_stack is 127 by default */

HELPER(67)    /* bpf_get_stack(ctx, buf, size, flags) */
{
	(void)r1; (void)r5;
	u64 buf = r2, size = r3 & 0xffffffff, flags = r4;
	u64 user = flags & UBPF_BPF_F_USER_STACK;
	s64 err = -(s64)UBPF_EINVAL;
	const struct ubpf_runtime_header *rt = (const void *)hf->runtime;
	if (flags & UBPF_BPF_F_USER_BUILD_ID) {
		/* build ids need the target's mappings: the tracer keeps such programs on the
		 * ptrace path (runtime_obj.UNSUPPORTED_FLAGS) */
		err = -(s64)UBPF_EOPNOTSUPP;
	} else if (!(flags & ~(UBPF_BPF_F_SKIP_FIELD_MASK | UBPF_BPF_F_USER_STACK)) && !(size % 8)) {
		u64 skip = flags & UBPF_BPF_F_SKIP_FIELD_MASK, num = size / 8;
		u64 max_stack = rt->max_stack ? rt->max_stack : 127;
		u64 depth = num + skip < max_stack ? num + skip : max_stack;
		u64 trace[STACK_MAX];
		u64 n = 0;
		if (depth > STACK_MAX)
			depth = STACK_MAX;
		if (user)
			n = rt_unwind(hf, trace, depth);
		if (n < skip) {
			err = -(s64)UBPF_EFAULT;
		} else {
			u64 k = n - skip < num ? n - skip : num;
			rt_copy((void *)buf, trace + skip, k * 8);
			rt_zero((u8 *)buf + k * 8, size - k * 8);
			return k * 8;
		}
	}
	if (size)
		rt_zero((void *)buf, size);
	return (u64)err;
}

/* ---- "kernel" memory: the program's own (arena, runtime stacks) ----------------------- */

#define TASK_SIZE 0x00007ffffffff000ull

/* the kernel's error for an unreadable kernel address: user-space addresses are
 * refused with -ERANGE before any access, others fault (helpers/context.py) */
static s64 kernel_err(u64 addr)
{
	return addr < TASK_SIZE ? -34 /* ERANGE */ : -(s64)UBPF_EFAULT;
}

HELPER(113)   /* bpf_probe_read_kernel(dst, size, src) */
{
	(void)r4; (void)r5;
	u64 size = r2 & 0xffffffff;
	if (!size)
		return 0;
	if (!rt_prog_mem(hf, r3, size)) {
		rt_zero((void *)r1, size);
		return (u64)kernel_err(r3);
	}
	rt_copy((void *)r1, (const void *)r3, size);
	return 0;
}

/* the bytes of program memory left from addr (0 when addr is not program memory) */
static u64 prog_room(const struct ubpf_hit_frame *hf, u64 addr)
{
	const struct ubpf_runtime_header *rt = (const void *)hf->runtime;
	if (addr >= rt->arena_base && addr - rt->arena_base < rt->arena_size)
		return rt->arena_size - (addr - rt->arena_base);
	u64 tsz = rt->thread_slots * rt->thread_slot_size;
	if (rt->thread_table && addr >= rt->thread_table && addr - rt->thread_table < tsz)
		return tsz - (addr - rt->thread_table);
	return 0;
}

HELPER(115)   /* bpf_probe_read_kernel_str(dst, size, src) */
{
	(void)r4; (void)r5;
	u64 size = r2 & 0xffffffff, room = prog_room(hf, r3);
	const u8 *s = (const u8 *)r3;
	u8 *d = (u8 *)r1;
	if (!size)
		return 0;
	if (!room) {
		rt_zero(d, size);
		return (u64)kernel_err(r3);
	}
	u64 n = size - 1 < room ? size - 1 : room;
	for (u64 i = 0; i < n; i++) {
		if (!s[i]) {
			rt_copy(d, s, i + 1);
			return i + 1;
		}
	}
	if (n < size - 1) {            /* ran out of program memory before a NUL */
		rt_zero(d, size);
		return (u64)kernel_err(r3);
	}
	rt_copy(d, s, n);
	d[n] = 0;
	return size;
}

HELPER(36)    /* bpf_probe_write_user(dst, src, size) */
{
	(void)r4; (void)r5;
	u64 size = r3 & 0xffffffff;
	struct { u64 base, len; } l = {r2, size}, r = {r1, size};
	if (!size)
		return 0;
	if (rt_prog_mem(hf, r1, size))
		return NEG(UBPF_EFAULT);
	long got = rt_syscall6(311 /* process_vm_writev */, (long)rt_getpid(hf), (long)&l, 1, (long)&r, 1, 0);
	return got == (long)size ? 0 : NEG(UBPF_EFAULT);
}

HELPER(182)   /* bpf_strncmp(s1, s1_sz, s2): s2 a constant string of the program */
{
	(void)r4; (void)r5; (void)hf;
	u64 size = r2 & 0xffffffff;
	const u8 *a = (const u8 *)r1, *b = (const u8 *)r3;
	int b_done = 0;
	for (u64 i = 0; i < size; i++) {
		u8 c1 = a[i], c2 = b_done ? 0 : b[i];
		if (!c2)
			b_done = 1;
		if (c1 != c2)
			return c1 < c2 ? (u64)-1 : 1;
		if (!c1)
			break;
	}
	return 0;
}
