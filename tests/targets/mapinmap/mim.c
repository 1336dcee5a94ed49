/* Target for the map-in-map end-to-end test: bump(slot, j) in a fixed pseudo-random order. */
#include <stdio.h>

#define PROBED __attribute__((noinline, used))
volatile unsigned long sink;

PROBED void bump(unsigned long slot, unsigned long j) { sink += slot * 7 + j; }

int main(void)
{
	unsigned long x = 2463534242ull;
	for (int i = 0; i < 300; i++) {
		x ^= x << 13; x ^= x >> 7; x ^= x << 17;
		bump((x >> 4) % 5, (x >> 12) % 11);
	}
	printf("done %lu\n", sink);
	return 0;
}
