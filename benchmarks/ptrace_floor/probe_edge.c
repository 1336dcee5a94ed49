/*
 * probe_edge MODE: targets for the probe engine's hard cases (used by
 * tests/test_probe_*.py).  Every mode prints a result line that only comes out
 * right if registers, stack and control flow survived the probes.
 *
 *   recurse N   fact(N) recursively (nested return probes)
 *   longjmp     leaf() longjmps out of mid() and outer(): abandoned return frames
 *   tail        tail_a() tail-jumps into tail_b() (chained return probes)
 *   sigtrap     the target raises SIGTRAP and executes int3 itself, with a handler
 *   forkret     fork() inside a function with a pending return probe; the child
 *               returns through its copy of the stack
 *   vfork       a vfork child calls a probed function, then execs /bin/true
 *   exec PROG   calls leaf() then execs PROG
 *   sema        calls leaf(probe_sema): a USDT-style semaphore the tracer increments
 */
#define _GNU_SOURCE
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static jmp_buf env;
volatile unsigned short probe_sema __attribute__((section(".data"))) = 0;
static volatile int traps;

__attribute__((noipa)) long fact(long n)
{
	long r;

	if (n <= 1)
		return 1;
	r = fact(n - 1);
	__asm__ volatile("" : "+r"(r));   /* keeps gcc from turning the recursion into a loop */
	return n * r;
}

__attribute__((noipa)) long leaf(long x)
{
	if (x < 0)
		longjmp(env, 1);
	return x + 1;
}

__attribute__((noipa)) long mid(long x)
{
	return leaf(x) * 2;
}

__attribute__((noipa)) long outer(long x)
{
	return mid(x) + 3;
}

long tail_a(long);
long tail_b(long);
__asm__(".text\n"
	".globl tail_b\n.type tail_b,@function\ntail_b:\n lea 100(%rdi),%rax\n ret\n.size tail_b,.-tail_b\n"
	".globl tail_a\n.type tail_a,@function\ntail_a:\n add $1,%rdi\n jmp tail_b\n.size tail_a,.-tail_a\n");

static void on_trap(int sig, siginfo_t *si, void *uc)
{
	(void)sig;
	(void)si;
	(void)uc;
	traps++;
}

__attribute__((noipa)) long forker(long x)
{
	pid_t p = fork();
	if (p == 0)
		return -x;          /* the child returns through the probed frame */
	int st = 0;
	waitpid(p, &st, 0);
	return WIFEXITED(st) && WEXITSTATUS(st) == 42 ? x : 1000 + st;
}

int main(int argc, char **argv)
{
	const char *mode = argc > 1 ? argv[1] : "";

	if (!strcmp(mode, "recurse")) {
		long n = argc > 2 ? atol(argv[2]) : 10;
		printf("fact(%ld)=%ld\n", n, fact(n));
	} else if (!strcmp(mode, "longjmp")) {
		long s = 0;
		for (int i = 0; i < 3; i++) {
			if (setjmp(env) == 0)
				s += outer(-1);     /* longjmps: outer/mid never return */
			else
				s += 1000;
			s += outer(i);          /* normal returns after abandoned frames */
		}
		printf("longjmp s=%ld\n", s);
	} else if (!strcmp(mode, "tail")) {
		long s = 0;
		for (int i = 0; i < 3; i++)
			s += tail_a(i);
		printf("tail s=%ld\n", s);
	} else if (!strcmp(mode, "sigtrap")) {
		struct sigaction sa;
		memset(&sa, 0, sizeof(sa));
		sa.sa_sigaction = on_trap;
		sa.sa_flags = SA_SIGINFO;
		sigaction(SIGTRAP, &sa, NULL);
		raise(SIGTRAP);
		__asm__ volatile("int3");
		long s = leaf(1);
		raise(SIGTRAP);
		printf("traps=%d leaf=%ld\n", traps, s);
	} else if (!strcmp(mode, "forkret")) {
		long r = forker(7);
		if (r < 0)
			_exit(42);          /* child: returned correctly through the hijacked frame */
		printf("forkret r=%ld\n", r);
	} else if (!strcmp(mode, "vfork")) {
		long s = leaf(1);
		pid_t p = vfork();
		if (p == 0) {
			leaf(2);
			execl("/bin/true", "true", (char *)NULL);
			_exit(127);
		}
		int st = 0;
		waitpid(p, &st, 0);
		s += leaf(3);
		printf("vfork s=%ld status=%d\n", s, st);
	} else if (!strcmp(mode, "exec")) {
		long s = leaf(5);
		printf("before exec %ld\n", s);
		fflush(stdout);
		execv(argv[2], argv + 2);
		return 127;
	} else if (!strcmp(mode, "sema")) {
		long s = leaf(probe_sema);
		printf("sema leaf=%ld\n", s);
	} else {
		return 2;
	}
	return 0;
}
