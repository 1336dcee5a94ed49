/* CPU ids owned per hit: the in-target form of the kernel's migrate_disable.
 *
 * The kernel runs a uprobe program with migration disabled, so two hits never use
 * one CPU's copy of a per-CPU map at the same time and a plain `*v += 1` on it never
 * loses an update.  Here a thread can be preempted and migrated in the middle of a
 * program, and another thread then running on "its" CPU would share the copy.  So a
 * program that uses per-CPU data (vm/jit/target.py decides) first owns a CPU id for
 * the rest of the hit: a compare-and-swap 0 -> 1 on that id's CPU_OWNER line in the
 * arena (shared by every process of the session, like the maps).  Its own CPU's id
 * first (the line stays in this core's cache), any other free id next (any id is a
 * correct "CPU": users see per-CPU values and their sums), then pause, then
 * sched_yield to let a preempted owner run -- bounded (UBPF_CPU_CLAIM_TSC cycles),
 * because an owner may be stopped (detach stops every thread and steps them out one
 * by one): past the bound the program is skipped and counted missed, as the kernel
 * counts a recursion miss.  The id is released by the entry that claimed it, when
 * the program (and its tail calls) return.  Nothing here calls out of the image (no
 * vDSO): detach single-steps a thread until it leaves our code. */
#include "rt.h"

static inline u64 rdtsc(void)
{
	u32 lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return (u64)hi << 32 | lo;
}

static inline int take(u64 *w)
{
	u64 free = 0;
	return __atomic_compare_exchange_n(w, &free, 1, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED);
}

/* 0: hf->cpu is the hit's CPU id, hf->cpu_owner the word the caller releases (stores 0 to)
 * when its program returns.  -1: no id came free in time; the probe's `missed` counts the
 * skip and its `hits` gives back the count the trampoline adds after the call. */
RT_API s64 ubpf_cpu_claim(struct ubpf_hit_frame *hf)
{
	const struct ubpf_runtime_header *rt = (const void *)hf->runtime;
	u64 n = rt ? rt->cpu_ids : 0;
	u64 me = rt_cpu_sample(rt);
	if (!n || !rt->cpu_owners) {
		/* no owner lines (an old header, a runtime without a session): the sampled CPU,
		 * unowned, as before; the release then clears hf->cpu itself */
		hf->cpu = me;
		hf->cpu_owner = (u64)&hf->cpu;
		return 0;
	}
	struct ubpf_cpu_owner *lines = (struct ubpf_cpu_owner *)rt->cpu_owners;
	u64 start = me < n ? me : me % n;
	if (LIKELY(take(&lines[start].owner))) {
		hf->cpu = start;
		hf->cpu_owner = (u64)&lines[start].owner;
		return 0;
	}
	u64 t0 = rdtsc();
	for (u64 round = 0;; round++) {
		for (u64 i = 0, id = start; i < n; i++, id = id + 1 == n ? 0 : id + 1) {
			if (__atomic_load_n(&lines[id].owner, __ATOMIC_RELAXED) == 0 && take(&lines[id].owner)) {
				hf->cpu = id;
				hf->cpu_owner = (u64)&lines[id].owner;
				return 0;
			}
		}
		if (rdtsc() - t0 > UBPF_CPU_CLAIM_TSC)
			break;
		if (round < UBPF_CPU_CLAIM_SPINS)
			rt_pause();
		else
			rt_syscall0(SYS_sched_yield);   /* let a preempted owner run and release */
	}
	struct ubpf_probe_block *pb = (struct ubpf_probe_block *)hf->probe;
	if (pb) {
		__atomic_add_fetch(&pb->missed, 1, __ATOMIC_RELAXED);
		__atomic_sub_fetch(&pb->hits, 1, __ATOMIC_RELAXED);
	}
	return -1;
}
