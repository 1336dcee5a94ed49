/* Target for the LPM end-to-end test: route(op, prefixlen, addr) in a fixed pseudo-random
 * order over addresses 10.x.y.z with a few bits varying, prefixes /0 to /33. */
#include <stdio.h>

#define PROBED __attribute__((noinline, used))
volatile unsigned long sink;

PROBED void route(unsigned op, unsigned plen, unsigned addr) { sink += op + plen * 3 + addr; }

int main(void)
{
	static const unsigned plens[] = { 0, 8, 12, 16, 20, 24, 28, 32, 33 };
	unsigned long x = 0x2545F4914F6CDD1Dull;
	for (int i = 0; i < 600; i++) {
		x ^= x << 13; x ^= x >> 7; x ^= x << 17;
		unsigned r = x % 10, addr = 10u | ((x >> 8) & 0x3) << 8 | ((x >> 12) & 0x7) << 16 | ((x >> 20) & 0x3) << 24;
		unsigned op = r < 4 ? 0 : r < 9 ? 1 : 2;
		route(op, op == 1 ? 32 : plens[(x >> 30) % 9], addr);
	}
	printf("done %lu\n", sink);
	return 0;
}
