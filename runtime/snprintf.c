/*
 * bpf_snprintf (165): the kernel's bpf_bprintf_prepare checks and bstr_printf
 * formatting, conversion for conversion what helpers/printk_format.py bprintf does
 * on the ptrace path (its docstring lists the rules), written into the program's
 * buffer at the call -- the result is the program's to read, so no tracer can do it
 * later as it does for trace_printk.
 *
 * Two passes over the format: the first only validates and measures (a refused
 * format leaves the buffer untouched, as the kernel's early return does), the
 * second writes.  Strings are read safely (process_vm_readv on the own pid, a fault
 * prints empty): %s any memory, %pks only the program's (arena, runtime stacks:
 * the "kernel" memory of the rules), %pus only the target's; %pI4/%pI6 read the
 * program's memory only (elsewhere: zeroes).  %p and %pK (kptr_restrict 0) print a
 * keyed 32-bit hash of the pointer as the kernel does; the key is this run's (the
 * arena address and the tracer's pid), not the kernel's boot key, so the digits
 * differ from the ptrace path's, whose key is the tracer's own -- as they differ
 * between two boots of a kernel.
 */
#include "rt.h"

enum { SYS_read = 0, SYS_open = 2, SYS_close = 3 };
enum { MAX_BIN = 512, MAX_ARGS = 12, FIELD_WIDTH_MAX = (1 << 23) - 1, FMT_MAX = 1 << 16 };
enum { F_MINUS = 1, F_PLUS = 2, F_SPACE = 4, F_ZERO = 8 };

struct out {
	u8 *buf;     /* 0: measure only */
	u64 size;    /* bytes of buf, the last one for the NUL */
	u64 len;     /* bytes the full output has so far */
};

static void put(struct out *o, const u8 *s, u64 n)
{
	if (o->buf && o->size) {
		for (u64 i = 0; i < n && o->len + i < o->size - 1; i++)
			o->buf[o->len + i] = s[i];
	}
	o->len += n;
}

static void put_fill(struct out *o, u8 c, u64 n)
{
	if (o->buf && o->size) {
		for (u64 i = 0; i < n && o->len + i < o->size - 1; i++)
			o->buf[o->len + i] = c;
	}
	o->len += n;
}

static int is_space(u8 c) { return c == ' ' || (c >= '\t' && c <= '\r'); }
static int is_punct(u8 c)
{
	return (c >= '!' && c <= '/') || (c >= ':' && c <= '@') || (c >= '[' && c <= '`') || (c >= '{' && c <= '~');
}
/* the kernel's ctype is Latin-1: 0xc0-0xff are letters but for the multiplication and
 * division signs */
static int is_alnum(u8 c)
{
	return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
	       (c >= 0xc0 && c != 0xd7 && c != 0xf7);
}
/* what may follow %s / plain %p: the end, white space or punctuation */
static int term_ok(u8 c) { return !c || is_space(c) || is_punct(c); }

/* widen_string: space padding, left or right */
static void padded(struct out *o, const u8 *s, u64 n, u32 flags, s64 width)
{
	u64 w = width < 0 ? 0 : (u64)width;
	if (!(flags & F_MINUS) && w > n)
		put_fill(o, ' ', w - n);
	put(o, s, n);
	if ((flags & F_MINUS) && w > n)
		put_fill(o, ' ', w - n);
}

/* printf's d/u/x/X of a value already sign-extended or masked: sign, zero or space
 * padding to the width, left or right */
static void number(struct out *o, u64 v, int negative, int base, int upper, u32 flags, s64 width)
{
	u8 digits[24];
	u64 n = 0;
	const char *set = upper ? "0123456789ABCDEF" : "0123456789abcdef";
	do {
		digits[n++] = (u8)set[v % (u64)base];
		v /= (u64)base;
	} while (v);
	u8 sign = negative ? '-' : (flags & F_PLUS) ? '+' : (flags & F_SPACE) ? ' ' : 0;
	u64 len = n + (sign ? 1 : 0), w = width < 0 ? 0 : (u64)width;
	if (!(flags & (F_MINUS | F_ZERO)) && w > len)
		put_fill(o, ' ', w - len);
	if (sign)
		put(o, &sign, 1);
	if ((flags & F_ZERO) && !(flags & F_MINUS) && w > len)
		put_fill(o, '0', w - len);
	while (n)
		put(o, &digits[--n], 1);
	if ((flags & F_MINUS) && w > len)
		put_fill(o, ' ', w - len);
}

static void integer(struct out *o, u64 arg, u8 conv, u64 size, u32 flags, s64 width)
{
	if (size == 4)
		arg &= 0xffffffffull;
	if (conv == 'd' || conv == 'i') {
		s64 s = size == 4 ? (s64)(int32_t)(u32)arg : (s64)arg;
		number(o, s < 0 ? (u64)0 - (u64)s : (u64)s, s < 0, 10, 0, flags, width);
		return;
	}
	flags &= ~(u32)(F_PLUS | F_SPACE);   /* sign flags need a signed conversion */
	number(o, arg, 0, conv == 'u' ? 10 : 16, conv == 'X', flags, width);
}

/* pointer_string: 16 zero-padded hex digits unless a width was given */
static void pointer_string(struct out *o, u64 v, u32 flags, s64 width)
{
	flags &= ~(u32)(F_PLUS | F_SPACE);   /* hex: unsigned */
	if (width < 0) {
		flags |= F_ZERO;
		width = 16;
	}
	number(o, v, 0, 16, 0, flags, width);
}

/* kallsyms has no symbol for a user address: 0x<hex> */
static u64 symbol(u8 *buf, u64 v)
{
	u8 d[16];
	u64 n = 0;
	do {
		d[n++] = (u8)"0123456789abcdef"[v & 15];
		v >>= 4;
	} while (v);
	buf[0] = '0';
	buf[1] = 'x';
	for (u64 i = 0; i < n; i++)
		buf[2 + i] = d[n - 1 - i];
	return n + 2;
}

static u64 ptr_hash(const struct ubpf_hit_frame *hf, u64 v)
{
	const struct ubpf_runtime_header *rt = (const void *)hf->runtime;
	u64 h = v ^ (rt ? rt->arena_base * 0x9e3779b97f4a7c15ull ^ rt->tracer_pid : 0);
	h ^= h >> 30;
	h *= 0xbf58476d1ce4e5b9ull;
	h ^= h >> 27;
	h *= 0x94d049bb133111ebull;
	h ^= h >> 31;
	return h & 0xffffffffull;
}

static void hashed(struct out *o, const struct ubpf_hit_frame *hf, u64 v, u32 flags, s64 width)
{
	if (v && v < (u64)-4095)      /* IS_ERR_OR_NULL pointers are shown as they are */
		v = ptr_hash(hf, v);
	pointer_string(o, v, flags, width);
}

/* /proc/sys/kernel/kptr_restrict (0 when unreadable), read when a %pK needs it */
static int kptr_restrict(void)
{
	char c = '0';
	long fd = rt_syscall3(SYS_open, "/proc/sys/kernel/kptr_restrict", 0, 0);
	if (fd < 0)
		return 0;
	rt_syscall3(SYS_read, fd, &c, 1);
	rt_syscall3(SYS_close, fd, 0, 0);
	return c >= '0' && c <= '9' ? c - '0' : 0;
}

/* the %s / %pks / %pus copy of bpf_bprintf_prepare; 1: -EINVAL, 2: -ENOSPC */
static int string_arg(struct out *o, const struct ubpf_hit_frame *hf, u64 addr, u8 kind, u8 following,
		      s64 *bin, u32 flags, s64 width)
{
	u8 text[MAX_BIN];
	if (!term_ok(following))
		return 1;
	s64 room = MAX_BIN - *bin;
	if (room <= 0)
		return 2;
	long got = -1;
	int prog = rt_prog_mem(hf, addr, 1);
	if (!(kind == 'k' && !prog) && !(kind == 'u' && prog))
		got = rt_read_user_str(hf, (char *)text, addr, (u64)room);
	u64 n = got > 0 ? (u64)got - 1 : 0;     /* the bytes before the NUL (room - 1 at most) */
	*bin += (s64)n + 1;
	padded(o, text, n, flags, width);
	return 0;
}

static u64 ip_string(u8 *buf, const u8 *raw, u64 size, u8 conv)
{
	u64 n = 0;
	if (size == 4) {
		for (u64 i = 0; i < 4; i++) {
			u8 b = raw[i];
			if (i)
				buf[n++] = '.';
			if (conv == 'i') {
				buf[n++] = (u8)('0' + b / 100);
				buf[n++] = (u8)('0' + b / 10 % 10);
			} else {
				if (b >= 100)
					buf[n++] = (u8)('0' + b / 100);
				if (b >= 10)
					buf[n++] = (u8)('0' + b / 10 % 10);
			}
			buf[n++] = (u8)('0' + b % 10);
		}
		return n;
	}
	for (u64 g = 0; g < 8; g++) {
		if (g && conv == 'I')
			buf[n++] = ':';
		u32 v = (u32)raw[2 * g] << 8 | raw[2 * g + 1];
		for (int s = 12; s >= 0; s -= 4)
			buf[n++] = (u8)"0123456789abcdef"[(v >> s) & 15];
	}
	return n;
}

/* one pass over the format: 0 or -errno; o->len is the full output length */
static s64 format(struct out *o, const struct ubpf_hit_frame *hf, const u8 *fmt, const u64 *args, u64 nargs)
{
	s64 bin = 0;    /* bytes of the kernel's 512-byte argument buffer in use (%pB may overshoot) */
	u64 nspec = 0, i = 0, lit = 0, n = 0;
	while (n < FMT_MAX && fmt[n])
		n++;
#define AT(k) ((k) < n ? fmt[k] : 0)
	while (i < n) {
		u8 c = fmt[i];
		if (c < 0x80 && !((c >= 0x20 && c < 0x7f) || is_space(c)))
			return NEG(UBPF_EINVAL);
		if (c != '%') {
			i++;
			continue;
		}
		if (AT(i + 1) == '%') {
			put(o, fmt + lit, i + 1 - lit);
			i += 2;
			lit = i;
			continue;
		}
		if (nspec >= nargs)
			return NEG(UBPF_EINVAL);
		put(o, fmt + lit, i - lit);
		i++;
		u32 flags = 0;
		for (;; i++) {
			u8 f = AT(i);
			if (f == '0') flags |= F_ZERO;
			else if (f == '+') flags |= F_PLUS;
			else if (f == '-') flags |= F_MINUS;
			else if (f == ' ') flags |= F_SPACE;
			else break;
		}
		if (flags & F_MINUS)
			flags &= ~(u32)F_ZERO;
		s64 width = -1;
		if (AT(i) >= '1' && AT(i) <= '9') {
			width = 0;
			while (AT(i) >= '0' && AT(i) <= '9') {
				if (width <= FIELD_WIDTH_MAX)
					width = width * 10 + (AT(i) - '0');
				i++;
			}
			if (width > FIELD_WIDTH_MAX)
				width = FIELD_WIDTH_MAX;
		}
		u64 arg = nspec < nargs ? args[nspec] : 0;
		u8 ch = AT(i);
		if (ch == 'p') {
			u8 nx = AT(i + 1), nx2 = AT(i + 2);
			u8 tmp[48];
			if ((nx == 'k' || nx == 'u') && nx2 == 's') {
				i += 3;
				int rc = string_arg(o, hf, arg, nx, AT(i), &bin, flags, width);
				if (rc)
					return rc == 1 ? NEG(UBPF_EINVAL) : NEG(UBPF_ENOSPC);
			} else if (term_ok(nx) || nx == 'K' || nx == 'x' || nx == 's' || nx == 'S') {
				u8 kind = (nx == 'K' || nx == 'x' || nx == 's' || nx == 'S') ? nx : 0;
				i += kind ? 2 : 1;
				bin = (bin + 3) & ~3ll;
				if (MAX_BIN - bin < 8)
					return NEG(UBPF_ENOSPC);
				bin += 8;
				if (kind == 'x') {
					pointer_string(o, arg, flags, width);
				} else if (kind == 's' || kind == 'S') {
					padded(o, tmp, symbol(tmp, arg), flags, width);
				} else if (kind == 'K') {
					int level = kptr_restrict();
					if (!level) {
						hashed(o, hf, arg, flags, width);
					} else {
						if (level >= 2 || rt_syscall0(SYS_getuid) != 0)
							arg = 0;
						pointer_string(o, arg, flags, width);
					}
				} else {
					hashed(o, hf, arg, flags, width);
				}
			} else if (nx == 'B') {
				i += 2;
				u64 len = symbol(tmp, arg);
				s64 room = MAX_BIN - bin;
				if (room > 0)
					put(o, tmp, len < (u64)room - 1 ? len : (u64)room - 1);
				bin += (s64)len + 1;
			} else if ((nx == 'i' || nx == 'I') && (nx2 == '4' || nx2 == '6')) {
				u64 size = nx2 == '4' ? 4 : 16;
				s64 room = MAX_BIN - bin;
				u8 raw[16] = {0};
				i += 3;
				if (room < (s64)size)
					return NEG(UBPF_ENOSPC);
				if (rt_prog_mem(hf, arg, size))
					rt_copy(raw, (const void *)arg, size);
				u64 len = ip_string(tmp, raw, size, nx);
				if (len > (u64)room - 1)
					len = (u64)room - 1;
				bin += (s64)len + 1;
				put(o, tmp, len);
			} else {
				return NEG(UBPF_EINVAL);
			}
			while (i < n && is_alnum(fmt[i]))   /* bstr_printf skips what follows a %p */
				i++;
			nspec++;
			lit = i;
			continue;
		}
		if (ch == 's') {
			i++;
			int rc = string_arg(o, hf, arg, 's', AT(i), &bin, flags, width);
			if (rc)
				return rc == 1 ? NEG(UBPF_EINVAL) : NEG(UBPF_ENOSPC);
			nspec++;
			lit = i;
			continue;
		}
		if (ch == 'c') {
			u8 b = (u8)arg;
			i++;
			if (bin >= MAX_BIN)
				return NEG(UBPF_ENOSPC);
			bin++;
			padded(o, &b, 1, flags, width);
			nspec++;
			lit = i;
			continue;
		}
		u64 size = 4;
		if (ch == 'l') {
			size = 8;
			i++;
			if (AT(i) == 'l')
				i++;
		}
		u8 conv = AT(i);
		if (conv != 'i' && conv != 'd' && conv != 'u' && conv != 'x' && conv != 'X')
			return NEG(UBPF_EINVAL);
		i++;
		bin = (bin + 3) & ~3ll;
		if (MAX_BIN - bin < (s64)size)
			return NEG(UBPF_ENOSPC);
		bin += (s64)size;
		integer(o, arg, conv, size, flags, width);
		nspec++;
		lit = i;
	}
	put(o, fmt + lit, n - lit);
	return 0;
#undef AT
}

HELPER(165)   /* bpf_snprintf(str, str_size, fmt, data, data_len) */
{
	u64 size = r2 & 0xffffffff, len = r5 & 0xffffffff;
	const u64 *args = (const u64 *)r4;
	if ((len & 7) || len > MAX_ARGS * 8 || (len && !r4))
		return NEG(UBPF_EINVAL);
	if (!r3)
		return NEG(UBPF_EINVAL);
	struct out measure = {0, 0, 0};
	s64 rc = format(&measure, hf, (const u8 *)r3, args, len / 8);
	if (rc)
		return (u64)rc;
	if (size) {
		struct out o = {(u8 *)r1, size, 0};
		format(&o, hf, (const u8 *)r3, args, len / 8);
		o.buf[o.len < size - 1 ? o.len : size - 1] = 0;
	}
	return measure.len + 1;
}
