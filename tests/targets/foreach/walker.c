/* Target for tests/test_intarget_helpers_e2e.py: pinned to one CPU (per-CPU maps then hold
 * the same values under every backend), it calls fill(k, v) / walk(stop) / prune(odd) in a
 * fixed pseudo-random order.  Hash keys are 16..39 (no map fills up, so no backend evicts or
 * refuses) and walks stop at keys below 16 (arrays stop, hash maps -- whose order differs
 * between the kernel and ubpf-py -- are walked whole). */
#define _GNU_SOURCE
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>

#define PROBED __attribute__((noinline, used))
volatile unsigned long sink;

PROBED void fill(unsigned long k, unsigned long v) { sink += k ^ v; }
PROBED void walk(unsigned long stop) { sink += stop * 3; }
PROBED void prune(unsigned long odd) { sink += odd * 5; }

int main(int argc, char **argv)
{
	cpu_set_t set;
	CPU_ZERO(&set);
	CPU_SET(argc > 1 ? atoi(argv[1]) : 0, &set);
	if (sched_setaffinity(0, sizeof(set), &set))
		perror("sched_setaffinity");
	unsigned long x = 88172645463325252ull;
	for (int i = 0; i < 400; i++) {
		x ^= x << 13; x ^= x >> 7; x ^= x << 17;
		unsigned r = x % 10;
		if (r < 6)
			fill(16 + (x >> 8) % 24, (x >> 16) & 0xffffffffff);
		else if (r < 9)
			walk((x >> 8) % 16);
		else
			prune((x >> 8) & 1);
	}
	printf("done %lu\n", sink);
	return 0;
}
