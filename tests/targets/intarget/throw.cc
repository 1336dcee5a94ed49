// C++ target for tests/test_intarget_e2e.py: exceptions thrown through return-probed frames.
#include <cstdio>
#include <stdexcept>

volatile long sink;

extern "C" __attribute__((noinline, used)) long thrower(long depth)
{
	if (depth == 0)
		throw std::runtime_error("boom");
	long r = thrower(depth - 1);
	sink += r;
	return r + 1;
}

int main()
{
	int caught = 0;
	for (int i = 0; i < 100; i++) {
		try {
			thrower(3);
		} catch (const std::exception &) {
			caught++;
		}
	}
	std::printf("caught=%d\n", caught);
	return 0;
}
