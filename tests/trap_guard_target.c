/*
 * trap_guard_target MODE: a target for tests/test_trap_guard.py.
 *   own-int3     call tick() 1000 times, then execute an int3 of its own (must die of SIGTRAP, as
 *                without a tracer)
 *   own-handler  install a SIGTRAP handler, call tick() 1000 times, raise(SIGTRAP) once; print
 *                "kept=1 caught=1" when the handler is still its own and caught the signal
 *   fork         fork; the child (not followed by the tracer) prints its SIGTRAP disposition,
 *                "child dfl=1" when it is the default again; the parent waits
 */
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static volatile sig_atomic_t caught;

__attribute__((noipa)) long tick(long i)
{
	return i * 3 + 1;
}

static void on_trap(int sig)
{
	(void)sig;
	caught = 1;
}

static long ticks(void)
{
	long s = 0;
	for (long i = 0; i < 1000; i++)
		s += tick(i);
	return s;
}

int main(int argc, char **argv)
{
	const char *mode = argc > 1 ? argv[1] : "";
	struct sigaction sa, cur;

	if (!strcmp(mode, "own-int3")) {
		printf("sum=%ld\n", ticks());
		fflush(stdout);
		__asm__ volatile("int3");
		printf("survived an int3\n");
		return 0;
	}
	if (!strcmp(mode, "own-handler")) {
		memset(&sa, 0, sizeof(sa));
		sa.sa_handler = on_trap;
		sigaction(SIGTRAP, &sa, NULL);
		ticks();
		raise(SIGTRAP);
		sigaction(SIGTRAP, NULL, &cur);
		printf("kept=%d caught=%d\n", cur.sa_handler == on_trap, (int)caught);
		return 0;
	}
	if (!strcmp(mode, "fork")) {
		ticks();
		pid_t c = fork();
		if (c == 0) {
			sigaction(SIGTRAP, NULL, &cur);
			printf("child dfl=%d\n", cur.sa_handler == SIG_DFL);
			fflush(stdout);
			_exit(0);
		}
		int st;
		waitpid(c, &st, 0);
		ticks();
		return 0;
	}
	return 2;
}
