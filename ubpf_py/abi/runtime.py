"""Layouts shared by the tracer, the generated trampolines and ``runtime/*.c``.

Memory of an in-target session (see docs/ARCHITECTURE.md, "In-target execution"):

* the **arena**: a memfd mapped ``MAP_SHARED`` at the *same address* in the tracer
  and in the target.  It holds the ``RUNTIME_HEADER`` (at its start), every map's
  storage (so pointers inside maps and descriptors mean the same in both
  processes), the probe blocks and the printk ring.  The tracer reads it without
  stopping the target.
* **code pages**: private, read+exec, in the target only, holding the runtime
  (``runtime/*.c``), the programs compiled for the target and the trampolines;
  trampolines sit within +-2 GiB of the sites they serve.
* the **thread table**: private anonymous memory of the target (a fork copies it,
  so cached facts never leak between processes); one ``THREAD_BLOCK`` slot per
  thread, found by the thread's FS base, holding its runtime stack.

Calling conventions (SysV x86-64):

* program entry: ``u64 entry(u64 ctx, struct ubpf_hit_frame *hf)``; ``ctx`` is the
  kernel-layout ``struct pt_regs`` the trampoline built on the runtime stack;
* runtime helpers: ``u64 ubpf_helper_<kernel id>(u64 r1, .., u64 r5, struct ubpf_hit_frame *hf)``.
"""

from __future__ import annotations

import signal

from ubpf_py.abi.kernel import SIG_BLOCK, SYS_RT_SIGPROCMASK
from ubpf_py.abi.layout import Layout, u8s, u32, u64, u64s

RUNTIME_MAGIC = 0x5542_5046_5254_0001  # "UBPFRT" v1
#: RUNTIME_HEADER.flags
RT_F_FSGSBASE = 1      # rdfsbase works in the target (AT_HWCAP2 & HWCAP2_FSGSBASE)
RT_F_RDPID = 2         # rdpid gives the CPU number

RUNTIME_HEADER = Layout("ubpf_runtime_header", [
    u64("magic", "RUNTIME_MAGIC"),
    u64("arena_base", "address of the arena (same in tracer and target)"),
    u64("arena_size"),
    u64("flags", "RT_F_*"),
    u64("vdso_clock_gettime", "target address of __vdso_clock_gettime, 0: use the syscall"),
    u64("vdso_getcpu", "target address of __vdso_getcpu, 0: use the syscall"),
    u64("thread_table", "target address of the (private) thread table"),
    u64("thread_slots", "number of THREAD_BLOCK slots (a power of two)"),
    u64("thread_slot_size", "bytes per slot: the block, then its runtime stack up to the slot's end"),
    u64("printk_ring", "handle address of the internal ring buffer printk records go to"),
    u64("tracer_pid"),
    u64("generation", "bumped by the tracer when cached per-process facts become stale (fork)"),
    u64("pid", "the target's tgid, written by the tracer (per process: fixed up in a forked child)"),
    u64("ret_trampoline", "address return probes put in place of return addresses: stack walks "
        "report the original from the thread's shadow stack instead"),
    u64("max_stack", "kernel.perf_event_max_stack (0: 127), the deepest stack get_stack(id) returns"),
    u64("hz", "CONFIG_HZ, for bpf_jiffies64 (0: the helper returns 0 jiffies since boot)"),
    u64("jiffies_base", "jiffies at CLOCK_MONOTONIC 0 (helpers/task_helpers.py _jiffies_base)"),
    u64("tid_fs_off", "offset from the FS base of the libc's thread-id word (struct pthread tid), "
        "checked by the tracer on every thread; 0: unknown (gettid() per call)"),
    u64("cpu_owners", "address (in the arena: shared by every process of the session) of ``cpu_ids`` "
        "CPU_OWNER lines; 0: none (a hit uses the CPU it samples, unowned)"),
    u64("cpu_ids", "CPU ids a hit can own: the possible CPUs, the per-CPU maps' ``ncpus``"),
], doc="at the start of the arena")

#: PROBE_BLOCK.flags
PB_F_RETURN = 1        # a return probe: the entry trampoline replaces the return address (so its
                       # site must be the function's first instruction, where [rsp] is that address)
PB_F_AT_ENTRY = 2      # the probed instruction is the function's first: [rsp] is the return address

PROBE_BLOCK = Layout("ubpf_probe_block", [
    # line 0: read by the trampoline on every hit, from every CPU; written by the tracer only
    u64("func_ip", "address of the probed instruction (bpf_get_func_ip, pt_regs ip of entry probes)"),
    u64("cookie", "attach cookie (bpf_get_attach_cookie)"),
    u64("entry", "program entry address; 0: no program (the trampoline only counts)"),
    u64("enabled", "0: the trampoline skips the program (detach in progress)"),
    u64("pcpu_hits", "address of (pcpu_mask + 1) cache lines whose first u64 counts the programs "
        "run on CPU (rdpid & pcpu_mask): threads on different CPUs never share the counter's line; "
        "0: count in ``hits`` (no rdpid)"),
    u64("flags", "PB_F_*"),
    u64("pcpu_mask", "lines of ``pcpu_hits`` - 1 (a power of two minus one)"),
    u64("probe_id", "the tracer's id for this probe"),
    # line 1: counters hits write (atomic adds); on a line of their own, so a counted hit never
    # takes away from the other CPUs the line they read on every hit
    u64("hits", "programs run (atomic add) when ``pcpu_hits`` is 0"),
    u64("missed", "hits skipped: the thread was already inside a program, no thread slot, or no "
        "CPU id free in time (a per-CPU program; it then takes back its count from ``hits``)"),
    u64("ns", "nanoseconds spent in the program when timing is on"),
    u64s("reserved", 5),
], doc="one per probe, in the arena, on cache lines of its own", align=64)

#: PROBE_BLOCK fields the trampolines read on every hit, and those hits write: never on one line
PROBE_BLOCK_READ_PER_HIT = ("func_ip", "cookie", "entry", "enabled", "pcpu_hits", "flags", "pcpu_mask")
PROBE_BLOCK_WRITTEN_PER_HIT = ("hits", "missed", "ns")

SHADOW_ENTRY = Layout("ubpf_shadow_entry", [
    u64("ret_addr", "the return address the entry trampoline replaced"),
    u64("rsp", "the stack pointer at function entry (pointing at the return address)"),
    u64("probe", "the PROBE_BLOCK of the return probe"),
])
SHADOW_DEPTH = 64

THREAD_BLOCK = Layout("ubpf_thread_block", [
    u64("key", "the thread's FS base; 0: free slot (claimed with a compare-and-swap)"),
    u64("busy", "non-zero while a program runs on this thread (no nesting, like the kernel)"),
    u64("tid", "cached gettid(), trusted while the libc's tid word (RUNTIME_HEADER.tid_fs_off) "
        "still holds it; 0: unknown"),
    u64("generation", "RUNTIME_HEADER.generation the cached facts belong to"),
    u64("prandom", "xorshift state of bpf_get_prandom_u32"),
    u64("shadow_depth", "entries in use in ``shadow``"),
    u64("tgid", "cached getpid(), valid while ``generation`` equals RUNTIME_HEADER.generation "
        "(the tracer bumps that on fork before the child runs a probe); 0: unknown"),
    u64("tid_fs", "the FS base ``tid`` was checked against"),
    u64("tid_off", "offset from the FS base of the tid word this thread checked itself (one of "
        "TID_OFFSETS), used while RUNTIME_HEADER.tid_fs_off is 0: a target launched by the tracer "
        "is armed before its libc has set up any thread"),
    u64("sig_deferred", "1: a program sent a signal; the trampoline restores ``sig_saved_mask`` when "
        "the hit is over, and the signal, blocked meanwhile, arrives then (as the kernel's arrives on "
        "the return to user mode, never inside the probe)"),
    u64("sig_saved_mask", "the thread's signal mask before the first deferred signal of this hit"),
    u64("sig_delivering", "non-zero while the trampoline's mask-restoring syscall runs: a handler of "
        "the deferred signal runs then, and returns into the trampoline (detach keeps our mappings)"),
    u64s("shadow", SHADOW_DEPTH * SHADOW_ENTRY.size // 8, "return-probe shadow stack (ubpf_shadow_entry)"),
], doc="one per thread in the thread table; the runtime stack follows up to the slot's end", align=64)

SITE_MAX_PROBES = 8
#: at most this many per-CPU hit-counter lines per probe (CPUs beyond share lines, atomically)
PCPU_HIT_LINES_MAX = 64
CACHE_LINE = 64

#: where libcs keep the thread's tid in their struct pthread (offset from the FS base):
#: glibc x86-64, musl x86-64.  The tracer checks them on stopped threads, the runtime on itself.
TID_OFFSETS = (0x2D0, 0x30)
# runtime/lib.c checks each offset by its header name (UBPF_TID_OFF_GLIBC, _MUSL, below): a new
# libc needs a name there too, not just an entry here
assert len(TID_OFFSETS) == 2, "add the new offset to CONSTANTS and to rt_gettid in runtime/lib.c"

SITE = Layout("ubpf_site", [
    u64("addr", "the patched address: pt_regs ip of the site's entry probes"),
    u64("length", "bytes the patch covers; the relocated code resumes at addr + length"),
    u64("trampoline", "address of the site's entry trampoline"),
    u64("nprobes", "entries of ``probes`` in use: the tracer fills probes[n], then stores n + 1"),
    u64s("probes", SITE_MAX_PROBES, "PROBE_BLOCK addresses, run in order (return probes: shadow push)"),
], doc="one per patched site, in the arena, on cache lines of its own (read on every hit of the site); "
       "its entry trampoline runs every probe listed here", align=64)

#: the facts block of a native program run from the tracer's C stop loop (native/hotloop.c fills it,
#: the JIT reads it as its runtime block's slots SLOT_CPU.., Python paths fill it with ``pack_into``)
FACTS = Layout("ubpf_facts", [
    u64("cpu", "CPU the hit is accounted to"),
    u64("pid_tgid", "tgid << 32 | tid"),
    u64("uid_gid", "gid << 32 | uid"),
    u64("func_ip", "the probe address"),
    u64("cookie", "the probe's attach cookie"),
], doc="five u64 the native hit path fills before calling a native program")

HIT_FRAME = Layout("ubpf_hit_frame", [
    u64("ctx", "the pt_regs built by the trampoline"),
    u64("probe", "PROBE_BLOCK"),
    u64("thread", "THREAD_BLOCK"),
    u64("runtime", "RUNTIME_HEADER"),
    u64("cpu", "the CPU id this hit owns (valid while ``cpu_owner`` is non-zero)"),
    u64("cpu_owner", "the CPU_OWNER.owner word the hit holds, released (stored 0) when the program "
        "that claimed it returns; 0: no CPU id claimed yet (the trampoline zeroes it per hit). "
        "Without owner lines it points at ``cpu`` itself: the release then clears a dead word"),
], doc="on the runtime stack; the second argument of a program entry, the sixth of a helper "
       "(a multiple of 16 bytes: the trampoline calls programs with it on top of the stack)")

#: CPU_OWNER lines in the arena (RUNTIME_HEADER.cpu_owners): a hit of a program that uses per-CPU
#: data owns one id for its whole run (tail calls and callbacks included), so no two hits ever use
#: one CPU's copies at once -- the kernel gets this from running programs with migration disabled;
#: here a thread can be preempted and migrated in the middle of a program
CPU_OWNER = Layout("ubpf_cpu_owner", [
    u64("owner", "0: free; 1: a hit owns this id (compare-and-swap 0 -> 1, released with a store)"),
    u64s("reserved", 7),
], doc="one per CPU id, a cache line each (a thread takes its own CPU's line; others only when "
       "that one is taken)", align=64)
#: TSC cycles a hit waits for a free id (spinning, then sched_yield) before it skips its program
#: and counts it missed: a stopped owner (detach stops every thread) must never hang a spinner
CPU_CLAIM_TSC = 1 << 26
#: rounds over the ids with ``pause`` before the claim yields the CPU between rounds
CPU_CLAIM_SPINS = 16

#: PRINTK_RECORD: most arguments bpf_trace_vprintk takes, most format bytes recorded
PRINTK_MAX_ARGS = 12
PRINTK_MAX_FMT = 1024
#: string bytes recorded per call: the kernel's bpf_bprintf_prepare has 512 for all of them
PRINTK_MAX_STR = 512
#: PRINTK_BLOB.kind
PK_BLOB_STR = 1        # a NUL-less string read at the argument's address (%s, %pks, %pus)
PK_BLOB_MEM = 2        # raw bytes read at the argument's address (%pI4, %pI6)
PK_BLOB_FAULT = 0x80   # or-ed in: the read faulted (no bytes follow)
PK_BLOB_PROG = 0x40    # or-ed in: the address is the program's own memory (arena, runtime stack):
                       # "kernel" memory to the kernel's %pks, not "user" memory for %pus

PRINTK_RECORD = Layout("ubpf_printk_record", [
    u64("helper", "6 (trace_printk) or 177 (trace_vprintk)"),
    u64("pid_tgid"),
    u64("uid_gid"),
    u64("cpu"),
    u64("ktime", "CLOCK_MONOTONIC ns at the call"),
    u8s("comm", 16),
    u64("nargs"),
    u64s("args", PRINTK_MAX_ARGS),
    u64("fmt_len", "format bytes that follow (up to and including its NUL), padded to 8"),
    u64("blobs", "PRINTK_BLOB entries after the format"),
], doc="one bpf_trace_printk call, in the printk ring (RUNTIME_HEADER.printk_ring); the tracer "
       "formats it with helpers/printk_format.py")

PRINTK_BLOB = Layout("ubpf_printk_blob", [
    u64("addr", "the argument the bytes were read at"),
    u32("kind", "PK_BLOB_*"),
    u32("len", "bytes that follow, padded to 8"),
], doc="memory a printk argument pointed at, copied at call time")

ALL = [RUNTIME_HEADER, PROBE_BLOCK, SHADOW_ENTRY, THREAD_BLOCK, SITE, FACTS, HIT_FRAME, CPU_OWNER, PRINTK_RECORD,
       PRINTK_BLOB]
#: the signal ``ubpf_dl_notify`` (runtime/dlnotify.c) sends the tracer, whose loop it wakes
#: (ignored by default: harmless to a tracer that is not listening)
DL_NOTIFY_SIGNAL = int(signal.SIGURG)

#: flags of a breakpoint row in the tracer's C stop loop (native/hotloop.c, probe/native.py):
#: BP_FAST the loop finishes the hit itself; BP_PYCB it calls Python's callback; BP_REWIND it puts
#: the thread's rip back on the int3 as soon as it has collected the stop (that collection clears
#: the stop's signal in the kernel: a tracer killed while handling the hit would otherwise leave
#: the thread to run on from inside the instruction; from the int3 it traps again, into the trap
#: guard, probe/trapguard.py)
BP_FAST, BP_PYCB, BP_REWIND = 1, 2, 4

CONSTANTS = {
    "UBPF_BP_FAST": BP_FAST,
    "UBPF_BP_PYCB": BP_PYCB,
    "UBPF_BP_REWIND": BP_REWIND,
    "UBPF_RUNTIME_MAGIC": RUNTIME_MAGIC,
    "UBPF_RT_F_FSGSBASE": RT_F_FSGSBASE,
    "UBPF_RT_F_RDPID": RT_F_RDPID,
    "UBPF_PB_F_RETURN": PB_F_RETURN,
    "UBPF_PB_F_AT_ENTRY": PB_F_AT_ENTRY,
    "UBPF_SHADOW_DEPTH": SHADOW_DEPTH,
    "UBPF_CPU_CLAIM_TSC": CPU_CLAIM_TSC,
    "UBPF_CPU_CLAIM_SPINS": CPU_CLAIM_SPINS,
    "UBPF_SITE_MAX_PROBES": SITE_MAX_PROBES,
    "UBPF_SYS_RT_SIGPROCMASK": SYS_RT_SIGPROCMASK,
    "UBPF_SIG_BLOCK": SIG_BLOCK,
    "UBPF_DL_NOTIFY_SIGNAL": DL_NOTIFY_SIGNAL,
    "UBPF_TID_OFF_GLIBC": TID_OFFSETS[0],
    "UBPF_TID_OFF_MUSL": TID_OFFSETS[1],
    "UBPF_PRINTK_MAX_ARGS": PRINTK_MAX_ARGS,
    "UBPF_PRINTK_MAX_FMT": PRINTK_MAX_FMT,
    "UBPF_PRINTK_MAX_STR": PRINTK_MAX_STR,
    "UBPF_PK_BLOB_STR": PK_BLOB_STR,
    "UBPF_PK_BLOB_MEM": PK_BLOB_MEM,
    "UBPF_PK_BLOB_FAULT": PK_BLOB_FAULT,
    "UBPF_PK_BLOB_PROG": PK_BLOB_PROG,
}

assert HIT_FRAME.size % 16 == 0, "the trampolines call programs with the hit frame on top of a 16-aligned stack"
