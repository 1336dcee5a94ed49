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
// usage: target FUNC N [--cpu K] [--threads T] [--result FILE]
//   -> one JSON line {"func", "n", "threads", "calls", "ns_total", "ns_per_call",
//      "calls_per_s", "checksum"} on stdout, or in FILE (so a tracer that shares our
//      stdout cannot mix its output into it).
// With --threads T, T threads (the main thread waits) each call FUNC N times, all
// released together by a barrier, so the probed function is hit concurrently:
//   ns_total    wall time from the release to the last thread's end
//   calls       T x N
//   calls_per_s calls / ns_total: the throughput the threads got together
//   ns_per_call the mean over threads of (that thread's time / N): what one call cost
//               its caller, comparable with the single-thread figure
//   faults      page faults the calling threads took in their loops (a probe's first touch of
//               memory, e.g. ring buffer pages, shows here)
//   cpu_ns_total the CPU time the calling threads got in their loops together
//               (CLOCK_THREAD_CPUTIME_ID): cpu_ns_total / (ns_total x min(T, CPUs)) is the
//               share of the CPUs the run got, which tells a run slowed by other work on
//               the machine (a low share) from one slowed by the probe itself (full share,
//               more CPU time per call)
#define _GNU_SOURCE
#include <alloca.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
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

static long long clock_ns(clockid_t clock)
{
	struct timespec ts;
	clock_gettime(clock, &ts);
	return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static long long now_ns(void) { return clock_ns(CLOCK_MONOTONIC); }
static long long cpu_ns(void) { return clock_ns(CLOCK_THREAD_CPUTIME_ID); }

/* one timed loop of n calls: wall-clock bounds and this thread's CPU time */
struct loop_out {
	long sum;
	long long t0, t1, cpu;
	long faults;     /* page faults this thread took in its loop */
};

static long thread_faults(void)
{
	struct rusage ru;
	return getrusage(RUSAGE_THREAD, &ru) ? 0 : ru.ru_minflt + ru.ru_majflt;
}

static __attribute__((noinline)) void timed_loop(long (*fn)(long, const char *), long n, struct loop_out *o)
{
	long (*volatile f)(long, const char *) = fn;
	char buf[256];
	for (int i = 0; i < 256; i++)
		buf[i] = (char)(i * 7 + 1);
	long sum = 0;
	/* the CPU-time reads (system calls) inside the wall-clock bounds: cpu <= wall */
	o->t0 = now_ns();
	long f0 = thread_faults();
	long long c0 = cpu_ns();
	for (long i = 0; i < n; i++)
		sum += f(i, buf);
	o->cpu = cpu_ns() - c0;
	o->faults = thread_faults() - f0;
	o->t1 = now_ns();
	o->sum = sum;
}

/* The read programs copy 256 bytes above rsp at the probed function's entry.  The in-target
 * runtime copies a read inside rsp's own page directly and makes a system call for one that
 * reaches the next page, so where ASLR puts rsp in its page would decide (about one run in
 * sixteen) whether a run measures the copy or the syscall.  The loop's frame is placed in the
 * middle of a page instead: every run measures the same (the copy) case. */
void *volatile stack_pad;

static void timed_loop_mid_page(long (*fn)(long, const char *), long n, struct loop_out *o)
{
	char here;
	size_t pad = ((uintptr_t)&here - 0x800) & 4095;
	stack_pad = alloca(pad + 16);
	timed_loop(fn, n, o);
}

struct worker {
	pthread_t tid;
	long (*fn)(long, const char *);
	long n;
	struct loop_out out;
};

static pthread_barrier_t start_line, finish_line;

static void *work(void *arg)
{
	struct worker *w = arg;
	pthread_barrier_wait(&start_line);
	timed_loop_mid_page(w->fn, w->n, &w->out);
	/* no thread exits while another is still timed: a traced thread's exit stops it for the
	 * tracer, whose handling of that stop would take CPU time from the threads still running */
	pthread_barrier_wait(&finish_line);
	return NULL;
}

/* T threads calling fn n times each, concurrently; returns 0 or an errno */
static int run_threads(long (*fn)(long, const char *), long n, int threads,
		       long long *wall, double *per_call, long long *cpu, long *faults, long *sum)
{
	struct worker *w = calloc((size_t)threads, sizeof(*w));
	if (!w)
		return 12;
	int err = pthread_barrier_init(&start_line, NULL, (unsigned)threads);
	if (!err)
		err = pthread_barrier_init(&finish_line, NULL, (unsigned)threads);
	int started = 0;
	for (; !err && started < threads; started++) {
		w[started].fn = fn;
		w[started].n = n;
		err = pthread_create(&w[started].tid, NULL, work, &w[started]);
		if (err)
			break;
	}
	if (err) {
		/* the barrier never opens: the started threads cannot be joined, exit */
		free(w);
		return err;
	}
	long long first = 0, last = 0;
	double per = 0;
	*sum = 0;
	*cpu = 0;
	*faults = 0;
	for (int i = 0; i < threads; i++) {
		pthread_join(w[i].tid, NULL);
		struct loop_out *o = &w[i].out;
		if (!i || o->t0 < first)
			first = o->t0;
		if (!i || o->t1 > last)
			last = o->t1;
		per += n ? (double)(o->t1 - o->t0) / n : 0.0;
		*sum += o->sum;
		*cpu += o->cpu;
		*faults += o->faults;
	}
	*wall = last - first;
	*per_call = per / threads;
	free(w);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: %s FUNC N [--cpu K] [--threads T] [--result FILE]\n", argv[0]);
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
	int threads = 0;
	FILE *out = stdout;
	for (int a = 3; a + 1 < argc; a += 2) {
		if (!strcmp(argv[a], "--cpu")) {
			cpu_set_t set;
			CPU_ZERO(&set);
			CPU_SET(atoi(argv[a + 1]), &set);
			if (sched_setaffinity(0, sizeof(set), &set))
				perror("sched_setaffinity");
		} else if (!strcmp(argv[a], "--threads")) {
			threads = atoi(argv[a + 1]);
			if (threads < 1 || threads > 1024) {
				fprintf(stderr, "--threads takes 1..1024, not %s\n", argv[a + 1]);
				return 2;
			}
		} else if (!strcmp(argv[a], "--result")) {
			out = fopen(argv[a + 1], "w");
			if (!out) {
				perror(argv[a + 1]);
				return 2;
			}
		}
	}
	long long wall, cpu;
	double per_call;
	long sum, faults;
	int nthreads = threads ? threads : 1;
	if (threads) {
		int err = run_threads(fn, n, threads, &wall, &per_call, &cpu, &faults, &sum);
		if (err) {
			fprintf(stderr, "cannot start %d threads: %s\n", threads, strerror(err));
			return 1;
		}
	} else {
		struct loop_out o;
		timed_loop_mid_page(fn, n, &o);
		sum = o.sum;
		wall = o.t1 - o.t0;
		cpu = o.cpu;
		faults = o.faults;
		per_call = n ? (double)wall / n : 0.0;
	}
	long calls = n * nthreads;
	fprintf(out, "{\"func\": \"%s\", \"n\": %ld, \"threads\": %d, \"calls\": %ld, \"ns_total\": %lld, "
		"\"ns_per_call\": %.3f, \"calls_per_s\": %.1f, \"cpu_ns_total\": %lld, \"faults\": %ld, \"checksum\": %ld}\n",
		argv[1], n, nthreads, calls, wall, per_call, wall > 0 ? calls * 1e9 / (double)wall : 0.0, cpu, faults, sum);
	if (out != stdout)
		fclose(out);
	return 0;
}
