/*
 * bpf_trace_printk (6) and bpf_trace_vprintk (177): a record in the printk ring
 * (RUNTIME_HEADER.printk_ring, a RINGBUF map in the arena) that the tracer
 * formats with helpers/printk_format.py, so the text is exactly the ptrace
 * path's.  Formatting stays in one place (Python); this side only records what
 * cannot be read later: the format bytes, the raw arguments, the task facts, and
 * the memory that %s / %pks / %pus / %pI4 / %pI6 arguments point at *now* (read
 * safely: a bad pointer is recorded as a fault, which formats as the kernel's
 * empty string).  The scan below only decides which arguments are pointers to
 * copy; whether the format is valid is decided by the formatter.
 *
 * Return value: 0 once queued (-EINVAL for bad vprintk arguments, as the kernel
 * checks those before formatting).  The kernel returns the formatted length,
 * which needs the formatter: programs that use the return value stay on the
 * ptrace path (the compiler sees that r0 is read after the call).
 */
#include "rt.h"

#define REC_MAX (sizeof(struct ubpf_printk_record) + UBPF_PRINTK_MAX_FMT + \
		 UBPF_PRINTK_MAX_ARGS * (sizeof(struct ubpf_printk_blob) + 24) + UBPF_PRINTK_MAX_STR + 8)

enum { ARG_INT, ARG_STR, ARG_MEM4, ARG_MEM16 };

/* which arguments the format's conversions read memory through, in order */
static u64 scan(const u8 *fmt, u64 n, u64 nargs, u8 *kind)
{
	u64 a = 0;
	for (u64 i = 0; i < n && fmt[i] && a < nargs; i++) {
		if (fmt[i] != '%')
			continue;
		if (i + 1 < n && fmt[i + 1] == '%') {
			i++;
			continue;
		}
		i++;
		while (i < n && (fmt[i] == '0' || fmt[i] == '+' || fmt[i] == '-' || fmt[i] == ' '))
			i++;
		while (i < n && fmt[i] >= '0' && fmt[i] <= '9')
			i++;
		u8 c = i < n ? fmt[i] : 0, c1 = i + 1 < n ? fmt[i + 1] : 0, c2 = i + 2 < n ? fmt[i + 2] : 0;
		kind[a] = ARG_INT;
		if (c == 's')
			kind[a] = ARG_STR;
		else if (c == 'p' && (c1 == 'k' || c1 == 'u') && c2 == 's')
			kind[a] = ARG_STR;
		else if (c == 'p' && (c1 == 'i' || c1 == 'I') && (c2 == '4' || c2 == '6'))
			kind[a] = c2 == '4' ? ARG_MEM4 : ARG_MEM16;
		a++;
	}
	return a;
}

static u64 emit(struct ubpf_hit_frame *hf, u64 helper, const u8 *fmt, u64 fmt_size, const u64 *args, u64 nargs)
{
	const struct ubpf_runtime_header *rt = (const void *)hf->runtime;
	struct ubpf_map_desc *ring = (struct ubpf_map_desc *)rt->printk_ring;
	u64 buf[REC_MAX / 8 + 1];
	struct ubpf_printk_record *r = (struct ubpf_printk_record *)buf;
	u8 kind[UBPF_PRINTK_MAX_ARGS] = {0};
	u64 fl = 0;

	if (!ring)
		return NEG(UBPF_ENOENT);
	while (fl < fmt_size && fl < UBPF_PRINTK_MAX_FMT && fmt[fl])
		fl++;
	if (fl < fmt_size && fl < UBPF_PRINTK_MAX_FMT)
		fl++;                       /* keep the NUL: the formatter checks it is there */
	r->helper = helper;
	r->pid_tgid = rt_getpid(hf) << 32 | rt_gettid(hf);
	r->uid_gid = (u64)(u32)rt_syscall0(SYS_getgid) << 32 | (u32)rt_syscall0(SYS_getuid);
	r->cpu = rt_cpu(hf);
	r->ktime = rt_ktime(hf, CLOCK_MONOTONIC);
	rt_zero(r->comm, 16);
	rt_syscall2(SYS_prctl, PR_GET_NAME, r->comm);
	r->nargs = nargs;
	rt_zero(r->args, sizeof(r->args));
	rt_copy(r->args, args, nargs * 8);
	r->fmt_len = fl;
	r->blobs = 0;
	u8 *p = (u8 *)(r + 1);
	rt_copy(p, fmt, fl);
	rt_zero(p + fl, ((fl + 7) & ~7ull) - fl);
	p += (fl + 7) & ~7ull;

	u64 n = scan(fmt, fl, nargs, kind), str_room = UBPF_PRINTK_MAX_STR;
	for (u64 a = 0; a < n; a++) {
		if (kind[a] == ARG_INT)
			continue;
		struct ubpf_printk_blob *b = (struct ubpf_printk_blob *)p;
		u8 *data = (u8 *)(b + 1);
		long got;
		b->addr = args[a];
		if (kind[a] == ARG_STR) {
			if (!str_room)
				continue;
			got = rt_read_user_str(hf, (char *)data, args[a], str_room);
			b->kind = UBPF_PK_BLOB_STR;
			if (got > 0) {
				got--;                  /* the bytes before the NUL */
				str_room -= (u64)got + 1;
			}
		} else {
			u64 size = kind[a] == ARG_MEM4 ? 4 : 16;
			got = rt_read_user(hf, data, args[a], size) ? -1 : (long)size;
			b->kind = UBPF_PK_BLOB_MEM;
		}
		if (rt_prog_mem(hf, args[a], 1))
			b->kind |= UBPF_PK_BLOB_PROG;
		if (got < 0) {
			b->kind |= UBPF_PK_BLOB_FAULT;
			got = 0;
		}
		b->len = (u32)got;
		rt_zero(data + got, (((u64)got + 7) & ~7ull) - (u64)got);
		p = data + (((u64)got + 7) & ~7ull);
		r->blobs++;
	}
	ubpf_rb_output(ring, r, (u64)(p - (u8 *)r));
	return 0;
}

HELPER(6)     /* bpf_trace_printk(fmt, fmt_size, a1, a2, a3) */
{
	u64 args[3] = {r3, r4, r5};
	return emit(hf, 6, (const u8 *)r1, r2 & 0xffffffff, args, 3);
}

HELPER(177)   /* bpf_trace_vprintk(fmt, fmt_size, args, data_len) */
{
	(void)r5;
	u64 len = r4 & 0xffffffff;
	if ((len & 7) || len > UBPF_PRINTK_MAX_ARGS * 8 || (len && !r3))
		return NEG(UBPF_EINVAL);
	return emit(hf, 177, (const u8 *)r1, r2 & 0xffffffff, (const u64 *)r3, len / 8);
}
