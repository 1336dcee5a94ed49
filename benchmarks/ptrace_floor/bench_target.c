/*
 * bench_target MODE N: calls one function N times; each function starts with a
 * different first instruction so the probe engine takes a different path:
 *   push   push %rbp            (emulated: stack write + regs)
 *   endbr  endbr64              (emulated: skip)
 *   nop    nopl 0(%rax,%rax)    (emulated: skip)
 *   sub    sub $8,%rsp          (emulated: flags + regs)
 *   jmp    jmp rel8             (emulated branch)
 *   lea    lea (%rdi,%rsi),%rax (out of line, jump back)
 *   riprel mov g(%rip),%rax     (out of line with the displacement re-targeted)
 * Prints the sum so a wrong emulation shows as a wrong result.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

long g_val = 5;

long f_push(long, long);
long f_endbr(long, long);
long f_nop(long, long);
long f_sub(long, long);
long f_jmp(long, long);
long f_lea(long, long);
long f_riprel(long, long);

__asm__(".text\n"
	".globl f_push\n.type f_push,@function\nf_push:\n push %rbp\n mov %rsp,%rbp\n lea (%rdi,%rsi),%rax\n pop %rbp\n ret\n.size f_push,.-f_push\n"
	".globl f_endbr\n.type f_endbr,@function\nf_endbr:\n endbr64\n lea (%rdi,%rsi),%rax\n ret\n.size f_endbr,.-f_endbr\n"
	".globl f_nop\n.type f_nop,@function\nf_nop:\n nopl 0x0(%rax,%rax,1)\n lea (%rdi,%rsi),%rax\n ret\n.size f_nop,.-f_nop\n"
	".globl f_sub\n.type f_sub,@function\nf_sub:\n sub $8,%rsp\n lea (%rdi,%rsi),%rax\n add $8,%rsp\n ret\n.size f_sub,.-f_sub\n"
	".globl f_jmp\n.type f_jmp,@function\nf_jmp:\n jmp 1f\n nop\n1:\n lea (%rdi,%rsi),%rax\n ret\n.size f_jmp,.-f_jmp\n"
	".globl f_lea\n.type f_lea,@function\nf_lea:\n lea (%rdi,%rsi),%rax\n ret\n.size f_lea,.-f_lea\n"
	".globl f_riprel\n.type f_riprel,@function\nf_riprel:\n mov g_val(%rip),%rax\n add %rdi,%rax\n add %rsi,%rax\n ret\n.size f_riprel,.-f_riprel\n");

int main(int argc, char **argv)
{
	static const struct { const char *name; long (*fn)(long, long); } fns[] = {
		{ "push", f_push }, { "endbr", f_endbr }, { "nop", f_nop }, { "sub", f_sub },
		{ "jmp", f_jmp }, { "lea", f_lea }, { "riprel", f_riprel },
	};
	long (*volatile fn)(long, long) = NULL;
	long n, sum = 0;

	if (argc < 3)
		return 2;
	for (unsigned i = 0; i < sizeof(fns) / sizeof(fns[0]); i++)
		if (!strcmp(argv[1], fns[i].name))
			fn = fns[i].fn;
	if (!fn)
		return 2;
	n = atol(argv[2]);
	for (long i = 0; i < n; i++)
		sum += fn(i, 1);
	printf("sum=%ld\n", sum);
	return 0;
}
