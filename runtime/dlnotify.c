/* The dynamic linker's notification, in the target: no int3.
 *
 * glibc's ld.so calls _dl_debug_state() around every change of its library list (dlopen,
 * dlclose).  The tracer patches that function's entry with a jump like any in-target probe,
 * with this function as the "program" (never a BPF program: no verifier involved, it is part
 * of the runtime).  It tells the tracer that libraries came or went and waits, bounded, for
 * the tracer to arm the new library's probes, so the library's first calls are probed -- what
 * the int3 on _dl_debug_state did, without stopping the thread under ptrace (a thread the
 * tracer does not trace would die of that int3).
 *
 * The probe block's cookie is the address of two u64 words in the shared arena: [0] requests
 * (bumped here), [1] answers (set by the tracer to the requests it handled, then FUTEX_WAKE).
 * The tracer is woken with UBPF_DL_NOTIFY_SIGNAL, SIGURG (ignored by default: harmless if the tracer is not
 * listening); a tracer that never answers costs the thread at most WAIT_MS. */
#include "rt.h"

enum { SYS_futex = 202, FUTEX_WAIT = 0, WAIT_MS = 2000, SLICE_MS = 20 };

struct rt_timespec { long sec, nsec; };

RT_API u64 ubpf_dl_notify(u64 ctx, const struct ubpf_hit_frame *hf)
{
	(void)ctx;
	const struct ubpf_probe_block *pb = (const struct ubpf_probe_block *)(uintptr_t)hf->probe;
	const struct ubpf_runtime_header *h = (const struct ubpf_runtime_header *)(uintptr_t)hf->runtime;
	u64 *words = (u64 *)(uintptr_t)pb->cookie;
	u64 seq = __atomic_add_fetch(&words[0], 1, __ATOMIC_SEQ_CST);
	if (h->tracer_pid)
		rt_syscall2(SYS_kill, h->tracer_pid, UBPF_DL_NOTIFY_SIGNAL);
	struct rt_timespec slice = { 0, SLICE_MS * 1000000L };
	for (int waited = 0; waited < WAIT_MS; waited += SLICE_MS) {
		u64 ack = LOAD(&words[1]);
		if (ack >= seq)
			break;
		/* the low half of the answer word: changes with every answer (little endian) */
		rt_syscall6(SYS_futex, (long)&words[1], FUTEX_WAIT, (long)(u32)ack, (long)&slice, 0, 0);
	}
	return 0;
}
