/* Target for tests/test_untraced_threads.py: threads created after the tracer armed its
 * probes (GATE appears once it has), each calling the probed functions; one of them forks,
 * one dlopens a library.  Every thread writes "tid TracerPid" to OUT.
 *
 *   late NTHREADS CALLS GATE OUT [LIB]   threads call work CALLS times; thread 0 forks a child
 *                                        (CALLS calls of work, then exit); thread 1 dlopens LIB
 *                                        and calls lib_work CALLS times
 *   spin NTHREADS GATE STOP              after GATE: threads call work/fact and sleep in nap
 *                                        until STOP exists; prints "ok" (or "BAD")
 *   exec CALLS GATE OUT                  after GATE: a new thread calls work CALLS times, then
 *                                        execs this binary as "late 2 CALLS GATE.exec OUT"
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>
#ifndef NO_DLOPEN
#include <dlfcn.h>
#endif

#define PROBED __attribute__((noinline, used))

volatile long sink;

PROBED long work(long x)
{
	sink += x;
	return x * 3 + 1;
}

PROBED long fact(long n)
{
	return n <= 1 ? 1 : n * fact(n - 1);
}

PROBED void nap(void)
{
	usleep(1000);
	__asm__ volatile("");
}

static void wait_file(const char *path)
{
	while (access(path, F_OK) != 0)
		usleep(1000);
}

static long tracer_of(long tid)
{
	char path[64], line[256];
	long t = -1;
	snprintf(path, sizeof path, "/proc/self/task/%ld/status", tid);
	FILE *f = fopen(path, "r");
	if (!f)
		return -1;
	while (fgets(line, sizeof line, f))
		if (!strncmp(line, "TracerPid:", 10))
			t = atol(line + 10);
	fclose(f);
	return t;
}

struct worker {
	pthread_t t;
	int index;
	long calls, tid, tracer, bad;
	const char *lib, *stop;
};

static long loop(long n)
{
	long bad = 0;
	for (long i = 0; i < n; i++)
		bad |= work(i) != i * 3 + 1;
	return bad;
}

static void *late_thread(void *p)
{
	struct worker *w = p;
	w->tid = syscall(SYS_gettid);
	w->tracer = tracer_of(w->tid);
	w->bad = loop(w->calls);
	if (w->index == 0) {
		pid_t c = fork();
		if (c == 0)
			_exit(loop(w->calls) ? 3 : 0);
		int st = 0;
		waitpid(c, &st, 0);
		w->bad |= !WIFEXITED(st) || WEXITSTATUS(st) != 0;
	}
#ifndef NO_DLOPEN
	if (w->index == 1 && w->lib) {
		void *h = dlopen(w->lib, RTLD_NOW);
		long (*lw)(long) = h ? (long (*)(long))dlsym(h, "lib_work") : 0;
		if (!lw)
			w->bad = 1;
		for (long i = 0; lw && i < w->calls; i++)
			w->bad |= lw(i) != i * 5 + 2;
	}
#endif
	return 0;
}

static int late(int n, long calls, const char *gate, const char *out, const char *lib)
{
	struct worker w[64] = {0};
	wait_file(gate);
	for (int i = 0; i < n; i++) {
		w[i].index = i;
		w[i].calls = calls;
		w[i].lib = lib;
		pthread_create(&w[i].t, 0, late_thread, &w[i]);
	}
	long bad = 0;
	FILE *f = fopen(out, "w");
	for (int i = 0; i < n; i++) {
		pthread_join(w[i].t, 0);
		bad |= w[i].bad;
		fprintf(f, "%ld %ld\n", w[i].tid, w[i].tracer);
	}
	fclose(f);
	printf(bad ? "BAD\n" : "ok\n");
	return bad != 0;
}

static volatile int stop_now;

static void *spin_thread(void *p)
{
	struct worker *w = p;
	w->tid = syscall(SYS_gettid);
	for (long i = 0; !stop_now; i++) {
		if (work(i) != i * 3 + 1 || fact(5) != 120)
			w->bad = 1;
		w->calls++;
		if (i % 10 == 9)
			nap();
	}
	return 0;
}

static int spin(int n, const char *gate, const char *stop)
{
	struct worker w[64] = {0};
	printf("ready\n");
	fflush(stdout);
	wait_file(gate);
	for (int i = 0; i < n; i++)
		pthread_create(&w[i].t, 0, spin_thread, &w[i]);
	printf("started\n");
	fflush(stdout);
	wait_file(stop);
	stop_now = 1;
	long bad = 0;
	for (int i = 0; i < n; i++) {
		pthread_join(w[i].t, 0);
		bad |= w[i].bad;
	}
	printf(bad ? "BAD\n" : "ok\n");
	return bad != 0;
}

static const char *exec_argv[7];

static void *exec_thread(void *p)
{
	(void)p;
	loop(atol(exec_argv[3]));
	execv("/proc/self/exe", (char **)exec_argv);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc >= 5 && !strcmp(argv[1], "exec")) {
		pthread_t t;
		static char gate2[4096];  /* the new image waits for GATE.exec: the tracer arms it first */
		snprintf(gate2, sizeof gate2, "%s.exec", argv[3]);
		const char *a[7] = {argv[0], "late", "2", argv[2], gate2, argv[4], 0};
		memcpy(exec_argv, a, sizeof a);
		wait_file(argv[3]);
		pthread_create(&t, 0, exec_thread, 0);
		pthread_join(t, 0);
		return 9;                 /* not reached: the exec replaces the process */
	}
	if (argc >= 6 && !strcmp(argv[1], "late"))
		return late(atoi(argv[2]), atol(argv[3]), argv[4], argv[5], argc > 6 ? argv[6] : 0);
	if (argc >= 5 && !strcmp(argv[1], "spin"))
		return spin(atoi(argv[2]), argv[3], argv[4]);
	fprintf(stderr, "usage: late|spin ...\n");
	return 2;
}
