/* Loaded late by itarget's dlopen mode: its probe is armed when it appears. */
__attribute__((noinline)) long lib_work(long x)
{
	static volatile long seen;
	seen += x;
	return x * 5 + 2;
}
