/*
 * exit_edge MODE: targets that end (or change) in awkward ways while threads sit in a
 * probed function (tests/test_target_edges.py probes work() with entry and return probes).
 * Every mode prints lines that only come out right if the target ran unharmed, and ends
 * with a status of its own so the test can compare it with an unprobed run.
 *
 *   mainexit      main calls exit(5) while 3 threads loop calling work()
 *   threadexit    a non-main thread calls exit(9) (exit_group) while main loops in work()
 *   pthreadexit   main calls pthread_exit; the last worker calls exit(6)
 *   threadexec    a non-main thread execs /bin/echo while others are in work()
 *   segv          work() dereferences NULL on its 3rd call (SIGSEGV inside the probed function)
 *   sigtrap       the target's own SIGTRAP handler, raise(SIGTRAP) and int3 around work()
 *   forkstorm     40 children fork, each calls work() and exits with its index
 *   vforkexec     a vfork child calls work() then execs /bin/echo
 *   spin          threads call work() until killed (the test sends SIGKILL)
 *   zombieleader  main calls pthread_exit; 2 threads call work() until killed
 *   sigint        calls work() until SIGINT, whose handler prints and exits 42
 *   zombiesleep   work() once; main calls pthread_exit; a thread sleeps (no more hits)
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static volatile long sink;
static volatile int traps;
static volatile int go;

__attribute__((noipa)) long work(long x)
{
	long s = 0;
	for (long i = 0; i < 200; i++)
		s += i ^ x;
	__asm__ volatile("" : "+r"(s));
	if (x == -3)
		*(volatile int *)0 = 1;     /* segv mode */
	return s;
}

static void *spinner(void *arg)
{
	long n = (long)arg;
	for (;;)
		sink += work(n++);
	return NULL;
}

static void *exiter(void *arg)
{
	(void)arg;
	for (int i = 0; i < 2000; i++)
		sink += work(i);
	printf("thread exits 9\n");
	fflush(stdout);
	exit(9);
}

static void *execer(void *arg)
{
	(void)arg;
	for (int i = 0; i < 2000; i++)
		sink += work(i);
	fflush(stdout);
	execl("/bin/echo", "echo", "exec from a thread", (char *)NULL);
	_exit(127);
}

static void *last_worker(void *arg)
{
	(void)arg;
	while (!go)
		sink += work(1);
	for (int i = 0; i < 3000; i++)
		sink += work(i);
	printf("last worker exits 6\n");
	fflush(stdout);
	exit(6);
}

static void *sleeper(void *arg)
{
	(void)arg;
	for (;;)
		pause();
	return NULL;
}

static void on_int(int sig)
{
	(void)sig;
	static const char msg[] = "got SIGINT\n";
	if (write(1, msg, sizeof(msg) - 1) < 0)
		_exit(43);
	_exit(42);
}

static void on_trap(int sig)
{
	(void)sig;
	traps++;
}

static void start(void *(*fn)(void *), long arg)
{
	pthread_t t;
	if (pthread_create(&t, NULL, fn, (void *)arg))
		abort();
}

int main(int argc, char **argv)
{
	const char *mode = argc > 1 ? argv[1] : "";

	setvbuf(stdout, NULL, _IOLBF, 0);
	if (!strcmp(mode, "mainexit")) {
		for (long i = 0; i < 3; i++)
			start(spinner, i * 1000);
		for (int i = 0; i < 3000; i++)
			sink += work(i);
		printf("main exits 5\n");
		exit(5);
	} else if (!strcmp(mode, "threadexit")) {
		start(exiter, 0);
		for (;;)
			sink += work(7);
	} else if (!strcmp(mode, "pthreadexit")) {
		start(spinner, 1);
		start(last_worker, 0);
		for (int i = 0; i < 1000; i++)
			sink += work(i);
		printf("main leaves\n");
		go = 1;
		pthread_exit(NULL);
	} else if (!strcmp(mode, "threadexec")) {
		start(spinner, 5);
		start(execer, 0);
		for (;;)
			sink += work(3);
	} else if (!strcmp(mode, "segv")) {
		for (long i = 0; i < 5; i++) {
			printf("call %ld\n", i);
			sink += work(i == 3 ? -3 : i);
		}
		return 0;
	} else if (!strcmp(mode, "sigtrap")) {
		signal(SIGTRAP, on_trap);
		raise(SIGTRAP);
		long s = work(1);
		__asm__ volatile("int3");
		s += work(2);
		raise(SIGTRAP);
		printf("traps=%d s=%ld\n", traps, s);
		return 3;
	} else if (!strcmp(mode, "forkstorm")) {
		int n = 40, sum = 0;
		pid_t kids[40];
		for (int i = 0; i < n; i++) {
			kids[i] = fork();
			if (kids[i] == 0) {
				for (int k = 0; k < 50; k++)
					sink += work(k);
				_exit(i);
			}
			sink += work(i);
		}
		for (int i = 0; i < n; i++) {
			int st = 0;
			waitpid(kids[i], &st, 0);
			sum += WIFEXITED(st) ? WEXITSTATUS(st) : 1000;
		}
		printf("forkstorm sum=%d\n", sum);
		return 4;
	} else if (!strcmp(mode, "vforkexec")) {
		long s = work(1);
		pid_t p = vfork();
		if (p == 0) {
			work(2);
			execl("/bin/echo", "echo", "vfork child", (char *)NULL);
			_exit(127);
		}
		int st = 0;
		waitpid(p, &st, 0);
		s += work(3);
		printf("vforkexec s=%ld status=%d\n", s, st);
		return 8;
	} else if (!strcmp(mode, "spin")) {
		for (long i = 0; i < 3; i++)
			start(spinner, i);
		printf("spinning\n");
		for (;;)
			sink += work(9);
	} else if (!strcmp(mode, "sigint")) {
		signal(SIGINT, on_int);
		printf("spinning\n");
		for (;;)
			sink += work(4);
	} else if (!strcmp(mode, "zombiesleep")) {
		sink += work(1);
		start(sleeper, 0);
		pthread_exit(NULL);
	} else if (!strcmp(mode, "zombieleader")) {
		start(spinner, 1);
		start(spinner, 2);
		printf("leader leaves\n");
		pthread_exit(NULL);
	}
	return 2;
}
