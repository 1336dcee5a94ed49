// Overhead benchmark target: four probed functions that do the same work and differ
// only in their first instruction, because that is what decides how a uprobe runs
// the displaced instruction (kernel: emulate or single-step out of line; ubpf-py:
// out-of-line execution):
//   f_push    push %rbp            (the common prologue; the kernel emulates it)
//   f_endbr   endbr64              (CET binaries)
//   f_nop5    5-byte nop           (patchable entries, -fpatchable-function-entry)
//   f_riprel  mov g_zero(%rip),%rax (RIP-relative: must be relocated when run out of line)
// Each returns a + buf[0] (+ g_zero), so every probe kind has an argument, a pointer
// and a return value to look at.
//
// usage: target FUNC N [--cpu K] [--result FILE]
//   -> one JSON line {"func", "n", "ns_total", "ns_per_call", "checksum"} on stdout, or in
//      FILE (so a tracer that shares our stdout cannot mix its output into it)
#define _GNU_SOURCE
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

long g_zero = 0;

__asm__(
	"	.text\n"
	"	.globl f_push\n	.type f_push, @function\n	.p2align 4\n"
	"f_push:\n"
	"	push %rbp\n"
	"	mov %rsp, %rbp\n"
	"	movzbl (%rsi), %eax\n"
	"	add %rdi, %rax\n"
	"	pop %rbp\n"
	"	ret\n"
	"	.size f_push, .-f_push\n"
	"	.globl f_endbr\n	.type f_endbr, @function\n	.p2align 4\n"
	"f_endbr:\n"
	"	endbr64\n"
	"	movzbl (%rsi), %eax\n"
	"	add %rdi, %rax\n"
	"	ret\n"
	"	.size f_endbr, .-f_endbr\n"
	"	.globl f_nop5\n	.type f_nop5, @function\n	.p2align 4\n"
	"f_nop5:\n"
	"	.byte 0x0f, 0x1f, 0x44, 0x00, 0x00\n"   /* nopl 0x0(%rax,%rax,1) */
	"	movzbl (%rsi), %eax\n"
	"	add %rdi, %rax\n"
	"	ret\n"
	"	.size f_nop5, .-f_nop5\n"
	"	.globl f_riprel\n	.type f_riprel, @function\n	.p2align 4\n"
	"f_riprel:\n"
	"	mov g_zero(%rip), %rax\n"
	"	add %rdi, %rax\n"
	"	movzbl (%rsi), %ecx\n"
	"	add %rcx, %rax\n"
	"	ret\n"
	"	.size f_riprel, .-f_riprel\n");

long f_push(long a, const char *buf);
long f_endbr(long a, const char *buf);
long f_nop5(long a, const char *buf);
long f_riprel(long a, const char *buf);

static const struct { const char *name; long (*fn)(long, const char *); } funcs[] = {
	{ "f_push", f_push }, { "f_endbr", f_endbr }, { "f_nop5", f_nop5 }, { "f_riprel", f_riprel },
};

static long long now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: %s FUNC N [--cpu K]\n", argv[0]);
		return 2;
	}
	long (*volatile fn)(long, const char *) = NULL;
	for (size_t i = 0; i < sizeof(funcs) / sizeof(funcs[0]); i++)
		if (!strcmp(argv[1], funcs[i].name))
			fn = funcs[i].fn;
	if (!fn) {
		fprintf(stderr, "unknown function %s\n", argv[1]);
		return 2;
	}
	long n = atol(argv[2]);
	FILE *out = stdout;
	for (int a = 3; a + 1 < argc; a += 2) {
		if (!strcmp(argv[a], "--cpu")) {
			cpu_set_t set;
			CPU_ZERO(&set);
			CPU_SET(atoi(argv[a + 1]), &set);
			if (sched_setaffinity(0, sizeof(set), &set))
				perror("sched_setaffinity");
		} else if (!strcmp(argv[a], "--result")) {
			out = fopen(argv[a + 1], "w");
			if (!out) {
				perror(argv[a + 1]);
				return 2;
			}
		}
	}
	char buf[256];
	for (int i = 0; i < 256; i++)
		buf[i] = (char)(i * 7 + 1);
	long sum = 0;
	long long t0 = now_ns();
	for (long i = 0; i < n; i++)
		sum += fn(i, buf);
	long long t1 = now_ns();
	fprintf(out, "{\"func\": \"%s\", \"n\": %ld, \"ns_total\": %lld, \"ns_per_call\": %.3f, \"checksum\": %ld}\n",
	       argv[1], n, t1 - t0, n ? (double)(t1 - t0) / n : 0.0, sum);
	if (out != stdout)
		fclose(out);
	return 0;
}
