/*
 * floor: the minimal C ptrace tracer doing the probe engine's out-of-line
 * scheme, as the floor for per-hit cost comparisons.
 *
 *   floor FILE_OFFSET -- PROGRAM ARGS...
 *
 * Starts PROGRAM stopped at exec, maps a scratch page near it by injecting an
 * mmap system call, plants one int3 at FILE_OFFSET of PROGRAM, then per hit:
 * waitpid, GETREGS, finish the displaced instruction (push %rbp / endbr64 /
 * nopl / sub $imm8,%rsp / jmp rel8 emulated; anything else copied to the
 * scratch slot followed by a jmp back, rip-relative disp32 of a mov re-targeted),
 * SETREGS, CONT.  One stop per hit, no handler.  Prints "hits=N" to stderr.
 * Only the instructions of benchmarks/ptrace_floor/bench_target.c are decoded.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/uio.h>
#include <sys/user.h>
#include <sys/wait.h>
#include <unistd.h>

typedef uint64_t u64;

static void die(const char *m)
{
	perror(m);
	exit(111);
}

static u64 find_addr(pid_t pid, const char *exe, u64 foff, u64 *lowest)
{
	char path[64], line[PATH_MAX + 128], real[PATH_MAX];
	FILE *f;
	u64 addr = 0;

	if (!realpath(exe, real))
		die("realpath");
	snprintf(path, sizeof(path), "/proc/%d/maps", pid);
	f = fopen(path, "r");
	if (!f)
		die("maps");
	*lowest = 0;
	while (fgets(line, sizeof(line), f)) {
		unsigned long lo, hi, off;
		char perms[8], name[PATH_MAX] = "";
		if (sscanf(line, "%lx-%lx %7s %lx %*s %*s %s", &lo, &hi, perms, &off, name) < 4)
			continue;
		if (strcmp(name, real))
			continue;
		if (!*lowest)
			*lowest = lo;
		if (perms[2] == 'x' && foff >= off && foff < off + (hi - lo))
			addr = lo + foff - off;
	}
	fclose(f);
	return addr;
}

static long inject_mmap(pid_t pid, int memfd, u64 hint)
{
	struct user_regs_struct saved, r;
	unsigned char code[8] = { 0xb8, 9, 0, 0, 0, 0x0f, 0x05, 0xcc }, orig[8];
	int st;

	ptrace(PTRACE_GETREGS, pid, 0, &saved);
	r = saved;
	if (pread(memfd, orig, 8, r.rip) != 8 || pwrite(memfd, code, 8, r.rip) != 8)
		die("stub");
	r.rdi = hint;
	r.rsi = 4096;
	r.rdx = 5;                       /* PROT_READ|PROT_EXEC */
	r.r10 = 0x22 | 0x100000;         /* MAP_PRIVATE|MAP_ANONYMOUS|MAP_FIXED_NOREPLACE */
	r.r8 = (u64)-1;
	r.r9 = 0;
	r.orig_rax = (u64)-1;
	ptrace(PTRACE_SETREGS, pid, 0, &r);
	ptrace(PTRACE_CONT, pid, 0, 0);
	waitpid(pid, &st, __WALL);
	ptrace(PTRACE_GETREGS, pid, 0, &r);
	pwrite(memfd, orig, 8, saved.rip);
	ptrace(PTRACE_SETREGS, pid, 0, &saved);
	return (long)r.rax;
}

int main(int argc, char **argv)
{
	u64 foff, addr, lowest, slot = 0, next;
	unsigned char insn[16], cc = 0xcc;
	int kind, len, memfd, st;
	long hits = 0;
	char mp[64];
	pid_t pid;

	if (argc < 4 || strcmp(argv[2], "--"))
		return fprintf(stderr, "usage: floor FILE_OFFSET -- PROGRAM ARGS...\n"), 2;
	foff = strtoull(argv[1], NULL, 0);
	pid = fork();
	if (pid == 0) {
		ptrace(PTRACE_TRACEME, 0, 0, 0);
		execvp(argv[3], argv + 3);
		_exit(127);
	}
	waitpid(pid, &st, 0);             /* SIGTRAP after exec */
	ptrace(PTRACE_SETOPTIONS, pid, 0, PTRACE_O_EXITKILL);
	addr = find_addr(pid, argv[3], foff, &lowest);
	if (!addr)
		return fprintf(stderr, "offset not mapped\n"), 2;
	snprintf(mp, sizeof(mp), "/proc/%d/mem", pid);
	memfd = open(mp, O_RDWR);
	if (memfd < 0 || pread(memfd, insn, 16, addr) != 16)
		die("mem");
	/* decode the few first instructions of bench_target */
	if (insn[0] == 0x55) { kind = 1; len = 1; }
	else if (!memcmp(insn, "\xf3\x0f\x1e\xfa", 4)) { kind = 2; len = 4; }
	else if (!memcmp(insn, "\x0f\x1f\x04\x00", 4)) { kind = 2; len = 4; }
	else if (!memcmp(insn, "\x48\x83\xec", 3)) { kind = 3; len = 4; }
	else if (insn[0] == 0xeb) { kind = 4; len = 2; }
	else if (!memcmp(insn, "\x48\x8d\x04\x37", 4)) { kind = 5; len = 4; }
	else if (!memcmp(insn, "\x48\x8b\x05", 3)) { kind = 6; len = 7; }
	else return fprintf(stderr, "instruction not known to the floor tracer\n"), 2;
	next = addr + len;
	if (kind >= 5) {
		unsigned char code[32];
		long page = -1;
		for (int k = 1; k < 64 && page < 0; k++)
			page = inject_mmap(pid, memfd, (lowest - (u64)k * 65536) & ~4095ull);
		if (page < 0)
			return fprintf(stderr, "no scratch page\n"), 2;
		slot = (u64)page + 64;
		memcpy(code, insn, len);
		if (kind == 6) {
			int32_t d;
			memcpy(&d, insn + 3, 4);
			d += (int32_t)(addr - slot);
			memcpy(code + 3, &d, 4);
		}
		code[len] = 0xe9;
		int32_t rel = (int32_t)(next - (slot + len + 5));
		memcpy(code + len + 1, &rel, 4);
		if (pwrite(memfd, code, len + 5, slot) != len + 5)
			die("slot");
	}
	if (pwrite(memfd, &cc, 1, addr) != 1)
		die("int3");
	ptrace(PTRACE_CONT, pid, 0, 0);
	for (;;) {
		struct user_regs_struct r;
		pid_t t = waitpid(-1, &st, __WALL);
		if (t < 0)
			break;
		if (WIFEXITED(st) || WIFSIGNALED(st)) {
			if (t == pid)
				break;
			continue;
		}
		int sig = WSTOPSIG(st);
		if (sig != SIGTRAP) {
			ptrace(PTRACE_CONT, t, 0, sig);
			continue;
		}
		ptrace(PTRACE_GETREGS, t, 0, &r);
		if (r.rip - 1 != addr) {
			ptrace(PTRACE_CONT, t, 0, sig);
			continue;
		}
		hits++;
		switch (kind) {
		case 1: {
			u64 v = r.rbp, sp = r.rsp - 8;
			struct iovec l = { &v, 8 }, rm = { (void *)sp, 8 };
			if (process_vm_writev(t, &l, 1, &rm, 1, 0) != 8)
				die("push");
			r.rsp = sp;
			r.rip = next;
			break;
		}
		case 2: r.rip = next; break;
		case 3: r.rsp -= (u64)(int8_t)insn[3]; r.rip = next; break;  /* flags not needed by bench */
		case 4: r.rip = next + (int8_t)insn[1]; break;
		default: r.rip = slot; break;
		}
		ptrace(PTRACE_SETREGS, t, 0, &r);
		ptrace(PTRACE_CONT, t, 0, 0);
	}
	fprintf(stderr, "hits=%ld\n", hits);
	if (WIFEXITED(st))
		return WEXITSTATUS(st);
	return 128 + WTERMSIG(st);
}
