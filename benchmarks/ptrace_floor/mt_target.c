/*
 * mt_target THREADS CALLS [SLEEP_US]: THREADS pthreads each call tick(thread, i) CALLS times.
 * Prints the per-thread checksums; exits 0 only if every thread computed the
 * expected value (a corrupted register or stack under probing shows up here).
 * With CALLS = 0 the threads call tick() forever with a short sleep between calls,
 * (SLEEP_US, default 200), with CALLS < 0 in a tight loop (attach/detach and kill
 * targets), until SIGTERM;
 * then they report whether every call returned the right value.
 */
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static long calls, sleep_us = 200;
static volatile sig_atomic_t done;
static long counts[64];

__attribute__((noipa)) long tick(long idx, long i)
{
	return idx * 1000003 + i;
}

static void *worker(void *arg)
{
	long idx = (long)arg, acc = 0, expect = 0;
	struct timespec ts = { sleep_us / 1000000, (sleep_us % 1000000) * 1000 };

	if (calls <= 0) {
		long bad = 0;
		while (!done) {
			bad |= tick(idx, counts[idx]) != idx * 1000003 + counts[idx];
			counts[idx]++;
			if (calls == 0)
				nanosleep(&ts, NULL);
		}
		return (void *)bad;
	}
	for (long i = 0; i < calls; i++) {
		acc += tick(idx, i);
		expect += idx * 1000003 + i;
	}
	return (void *)(acc == expect ? 0L : 1L);
}

static void on_term(int sig)
{
	(void)sig;
	done = 1;
}

int main(int argc, char **argv)
{
	int n = argc > 1 ? atoi(argv[1]) : 8;
	pthread_t th[64];
	int bad = 0;

	calls = argc > 2 ? atol(argv[2]) : 100000;
	if (argc > 3)
		sleep_us = atol(argv[3]);
	if (n < 1 || n > 64)
		return 2;
	signal(SIGTERM, on_term);
	printf("ready\n");
	fflush(stdout);
	for (long i = 0; i < n; i++)
		pthread_create(&th[i], NULL, worker, (void *)i);
	for (int i = 0; i < n; i++) {
		void *r;
		pthread_join(th[i], &r);
		bad += r != 0;
	}
	if (calls <= 0) {
		long total = 0;
		for (int i = 0; i < n; i++)
			total += counts[i];
		printf("stopped total>0=%d bad=%d\n", total > 0, bad);
	} else {
		printf("threads=%d calls=%ld bad=%d\n", n, (long)n * calls, bad);
	}
	return bad ? 1 : 0;
}
