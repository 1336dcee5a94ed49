/* Target for the bpf_snprintf end-to-end test: say(name, n) with names of every length. */
#include <stdio.h>
#include <string.h>

#define PROBED __attribute__((noinline, used))
volatile unsigned long sink;

PROBED void say(const char *name, unsigned long n) { sink += strlen(name) + n; }

int main(void)
{
	static const char *names[] = { "", "a", "ubpf", "a much longer name than fits in the line buffer" };
	for (unsigned long i = 0; i < 40; i++)
		say(names[i % 4], i * 37 % 1000);
	printf("done %lu\n", sink);
	return 0;
}
