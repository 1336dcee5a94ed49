/* Target for tests/test_intarget_e2e.py: one binary, many call patterns (argv[1] picks one).
 * Built as a dynamic glibc, a static glibc and a musl binary.  Every probed function is
 * noinline and used, so it keeps its symbol and its call sites. */
#define _GNU_SOURCE
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>
#ifndef NO_DLOPEN
#include <dlfcn.h>
#endif

#define PROBED __attribute__((noinline, used))

volatile long sink;

/* first instruction RIP-relative (relocated into the trampoline) */
PROBED long work(long x)
{
	sink += x;
	return x * 3 + 1;
}

PROBED long fact(long n)
{
	return n <= 1 ? 1 : n * fact(n - 1);
}

static jmp_buf env;

PROBED long dive(long depth)
{
	if (depth == 0)
		longjmp(env, 1);
	return dive(depth - 1) + (long)sink;
}

/* probed with a read of its first argument: the target never dereferences it */
PROBED long take(const void *p, long idx)
{
	sink += idx;
	return (long)(uintptr_t)p & 1;
}

/* refused sites: a loop whose head is inside the first 5 bytes, and a 3-byte function
 * followed at once by another (no alignment padding the jump could extend into) */
__asm__(".text\n"
	".globl branchy\n.type branchy,@function\n"
	"branchy:\n"
	"\txor %eax,%eax\n"
	"1:\tinc %eax\n"
	"\tcmp %edi,%eax\n"
	"\tjl 1b\n"
	"\tret\n"
	".size branchy,.-branchy\n"
	".globl tiny\n.type tiny,@function\n"
	"tiny:\n"
	"\tmov %edi,%eax\n"
	"\tret\n"
	".size tiny,.-tiny\n"
	".globl tiny_next\n.type tiny_next,@function\n"
	"tiny_next:\n"
	"\tlea 1(%rdi),%eax\n"
	"\tret\n"
	".size tiny_next,.-tiny_next\n");
long branchy(long n);
long tiny(long n);
long tiny_next(long n);

static long loop(long n)
{
	long s = 0;
	for (long i = 0; i < n; i++)
		s += work(i);
	return s;
}

static void wait_file(const char *path)
{
	while (access(path, F_OK) != 0)
		usleep(1000);
}

struct worker {
	pthread_t t;
	long n, sum, tid;
	const char *stop;
};

static void *thread_loop(void *p)
{
	struct worker *w = p;
	w->tid = syscall(SYS_gettid);
	w->sum = loop(w->n);
	return 0;
}

static volatile int stop_now;

/* where the spinning threads sleep: a return probe here has its return address replaced
 * while the thread is blocked in the kernel (detach must put it back) */
PROBED void nap(void)
{
	usleep(1000);
	__asm__ volatile("");
}

/* until stop_now: bursts of 10 checked calls, 1 ms apart (a corrupted register,
 * return value or return address shows) */
static void *thread_spin(void *p)
{
	struct worker *w = p;
	for (long i = 0; !stop_now; i++) {
		if (work(i) != i * 3 + 1 || fact(5) != 120) {
			w->sum = -1;
			return 0;
		}
		w->n++;
		if (i % 10 == 9)
			nap();
	}
	return 0;
}

static int threads(int nthreads, long n, const char *tidfile)
{
	struct worker w[64] = {0};
	long total = 0;
	for (int i = 0; i < nthreads; i++) {
		w[i].n = n;
		pthread_create(&w[i].t, 0, thread_loop, &w[i]);
	}
	for (int i = 0; i < nthreads; i++) {
		pthread_join(w[i].t, 0);
		total += w[i].sum;
	}
	FILE *f = fopen(tidfile, "w");
	for (int i = 0; i < nthreads; i++)
		fprintf(f, "%ld\n", w[i].tid);
	fclose(f);
	printf("threads=%d total=%ld\n", nthreads, total);
	return 0;
}

/* spin STOPFILE NTHREADS: print "ready", call until STOPFILE exists, print "ok" */
static int spin(const char *stop, int nthreads)
{
	struct worker w[64] = {0};
	for (int i = 0; i < nthreads; i++)
		pthread_create(&w[i].t, 0, thread_spin, &w[i]);
	printf("ready\n");        /* every mapping of the run exists now */
	wait_file(stop);
	stop_now = 1;
	int bad = 0;
	long calls = 0;
	for (int i = 0; i < nthreads; i++) {
		pthread_join(w[i].t, 0);
		bad |= w[i].sum < 0;
		calls += w[i].n;
	}
	fprintf(stderr, "calls=%ld\n", calls);
	printf(bad ? "BAD\n" : "ok\n");
	return bad;
}

static void recurse(void)
{
	for (long n = 0; n <= 12; n++)
		printf("fact(%ld)=%ld\n", n, fact(n));
	for (int i = 0; i < 3; i++)
		if (setjmp(env) == 0)
			dive(4 + i);
		else
			printf("longjmp %d\n", i);
	printf("fact(6)=%ld\n", fact(6));
}

static void badptr(void)
{
	static const char good[16] = "hello, target!";
	void *gone = mmap(0, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	munmap(gone, 4096);
	take(0, 0);
	take(gone, 1);
	take((void *)0xffffffff81000000ul, 2);
	take(good, 3);
	take((void *)1, 4);
	printf("survived\n");
}

static pthread_barrier_t all_alive;

static void *thread_once(void *p)
{
	pthread_barrier_wait(&all_alive);
	*(long *)p = work(1);
	pthread_barrier_wait(&all_alive);
	return 0;
}

/* many T: T threads alive at once, each calls work once */
static int many(int nthreads)
{
	pthread_t t[1024];
	long r[1024], total = 0;
	pthread_attr_t a;
	pthread_attr_init(&a);
	pthread_attr_setstacksize(&a, 64 * 1024);
	pthread_barrier_init(&all_alive, 0, nthreads);
	for (int i = 0; i < nthreads; i++)
		if (pthread_create(&t[i], &a, thread_once, &r[i]))
			return 1;
	for (int i = 0; i < nthreads; i++) {
		pthread_join(t[i], 0);
		total += r[i];
	}
	printf("many=%d total=%ld\n", nthreads, total);
	return 0;
}

static volatile long handled;

static void on_signal(int sig)
{
	(void)sig;
	work(-1);               /* a probed call from a handler that may interrupt a probed call */
	handled++;
}

/* signal N FILE: n calls of work; a program may send SIGUSR1 from a hit, and the handler
 * calls work too; FILE gets "CALLS HANDLED" */
static int signals(long n, const char *file)
{
	long i, bad = 0;
	signal(SIGUSR1, on_signal);
	for (i = 0; i < n; i++)
		bad |= work(i) != i * 3 + 1;
	signal(SIGUSR1, SIG_IGN);
	FILE *f = fopen(file, "w");
	fprintf(f, "%ld %ld\n", i, (long)handled);
	fclose(f);
	printf(bad ? "signal BAD\n" : "signal ok\n");
	return 0;
}

/* probed with a return probe too: the child returns from it through the original address */
PROBED int forks(long n, const char *gate, const char *pidfile)
{
	long s = loop(n);
	pid_t c = fork();
	if (c == 0) {
		FILE *f = fopen(pidfile, "w");
		fprintf(f, "%d\n", getpid());
		fclose(f);
		wait_file(gate);
		printf("child sum=%ld\n", loop(n));
		return 0;
	}
	int st;
	waitpid(c, &st, 0);
	s += loop(n);
	printf("parent sum=%ld child status=%d\n", s, st);
	return 0;
}

int main(int argc, char **argv)
{
	setvbuf(stdout, 0, _IOLBF, 0);
	const char *mode = argc > 1 ? argv[1] : "loop";
	long n = argc > 2 ? atol(argv[2]) : 1000;
	if (!strcmp(mode, "loop")) {
		printf("sum=%ld\n", loop(n));
	} else if (!strcmp(mode, "gate")) {       /* gate N FILE: wait for FILE, then loop */
		printf("ready\n");
		wait_file(argv[3]);
		printf("sum=%ld\n", loop(n));
	} else if (!strcmp(mode, "refuse")) {     /* n calls of each refused function and of work */
		long s = 0;
		for (long i = 0; i < n; i++)
			s += branchy(i % 7) + tiny(i) + tiny_next(i) + work(i);
		printf("refuse sum=%ld\n", s);
	} else if (!strcmp(mode, "threads")) {    /* threads N NTHREADS TIDFILE */
		return threads(atoi(argv[3]), n, argv[4]);
	} else if (!strcmp(mode, "spin")) {       /* spin NTHREADS STOPFILE */
		return spin(argv[3], (int)n);
	} else if (!strcmp(mode, "oracle")) {     /* oracle N NTHREADS TIDFILE: what the kernel is compared on */
		threads(atoi(argv[3]), n, argv[4]);
		recurse();
		badptr();
	} else if (!strcmp(mode, "fork")) {       /* fork N GATE PIDFILE */
		return forks(n, argv[3], argv[4]);
	} else if (!strcmp(mode, "exec")) {       /* exec N: loop, then run itself with loop N */
		printf("before exec sum=%ld\n", loop(n));
		execl("/proc/self/exe", argv[0], "loop", argv[2], (char *)0);
		perror("execl");
		return 1;
	} else if (!strcmp(mode, "many")) {       /* many NTHREADS */
		return many((int)n);
	} else if (!strcmp(mode, "signal")) {     /* signal N FILE */
		return signals(n, argv[3]);
#ifndef NO_DLOPEN
	} else if (!strcmp(mode, "dlopen")) {     /* dlopen N LIB: n calls; twice: open, n calls, close */
		long s = loop(n);
		for (int round = 0; round < 2; round++) {
			void *h = dlopen(argv[3], RTLD_NOW);
			long (*f)(long) = h ? (long (*)(long))dlsym(h, "lib_work") : 0;
			if (!f) {
				fprintf(stderr, "dlopen: %s\n", dlerror());
				return 1;
			}
			for (long i = 0; i < n; i++)
				s += f(i);
			dlclose(h);
		}
		printf("dlopen sum=%ld\n", s);
#endif
	} else {
		fprintf(stderr, "unknown mode %s\n", mode);
		return 2;
	}
	return 0;
}
