"""The runtime block shared by JIT-compiled code and its Python glue.

Compiled code is cached and shared by every ``JitProgram`` built from the same
bytecode, so nothing instance-specific (stack address, helper closures, region
table) may be baked into it.  Instead every compiled function receives a pointer
to a small per-instance *runtime block*: an array of u64 slots whose indices are
defined here, once, for both the IR generator and the runtime.
"""

from __future__ import annotations

from ubpf_py.abi.runtime import FACTS as _FACTS
from ubpf_py.isa.opcodes import MAX_CALL_DEPTH, STACK_SIZE

#: 0 while running normally; non-zero makes every frame return at once (unwind)
SLOT_STATUS = 0
#: lowest address of the stack buffer (all frames)
SLOT_STACK_LO = 1
#: frame pointer (r10) the entry function starts with: top of the stack, or the
#: frame of a running tail-call site when a program tail-calls itself
SLOT_ENTRY_FP = 2
#: address of the region table: ``count`` rows of (start, end, writable) u64, sorted by start
SLOT_REGIONS = 3
#: number of rows in the region table
SLOT_REGION_COUNT = 4
#: address of the helper table (one native function pointer per helper used, in
#: the compile-time order ``CompiledCode.helper_ids``)
SLOT_HELPERS = 5
#: frame pointer of the frame that made the current helper call (callbacks run below it)
SLOT_CUR_FP = 6
#: set to 1 by the tail-call trampoline when the tail call was taken (the frame then returns)
SLOT_TAIL_HIT = 7
#: native fault notifier ``void(void)``: compiled code fills the FAULT_* slots, sets
#: STATUS and calls it so the Python side learns about the fault without polling
SLOT_FAULT_FN = 8
#: dynamic helper dispatcher for callx: u64(id, r1, r2, r3, r4, r5)
SLOT_CALLX_FN = 9
#: details of the last native fault (written before SLOT_FAULT_FN is called)
SLOT_FAULT_PC = 10
SLOT_FAULT_ADDR = 11
SLOT_FAULT_INFO = 12
#: instruction index of the helper call in progress (helper faults report it)
SLOT_CALL_PC = 13
#: region caches checked inline before ``@bpf_chk``: the last region a read / a write
#: was found in, as (start, length - 8).  ``@bpf_chk`` fills them; the Python side
#: resets them to the stack whenever the region table is re-synced (regions changed)
SLOT_RCACHE_START = 14
SLOT_RCACHE_LIMIT = 15
SLOT_WCACHE_START = 16
SLOT_WCACHE_LIMIT = 17
#: native helper fast paths (``fastpath``): address of the per-instance table of map
#: descriptors (one u64 per ``ProgramLayout.map_consts`` entry: the map's handle address
#: when its lookups may run natively, else 0)
SLOT_FAST_MAPS = 18
#: bit ``fastpath.FAST_BITS[id]`` set: helper ``id`` runs natively in this instance
SLOT_FAST_FLAGS = 19
#: hit facts copied from ``env.hit`` at ``run()`` entry (one pack_into) for native helpers
SLOT_CPU = 20
SLOT_PID_TGID = 21       # tgid << 32 | tid
SLOT_UID_GID = 22        # gid << 32 | uid
SLOT_FUNC_IP = 23
SLOT_COOKIE = 24
#: xorshift64* state of the native bpf_get_prandom_u32
SLOT_RNG = 25
#: address of libc ``clock_gettime`` (per instance: never baked into cached code)
SLOT_CLOCK_FN = 26
#: scratch ``struct timespec`` (2 slots) for the native clock helpers
SLOT_TIMESPEC = 27
#: 1 while the native hit wrapper (``JitProgram.native_entry``) runs the program: the
#: facts slots were filled by the probe engine's C loop, not copied from ``env.hit``, so
#: Python helper trampolines copy the cpu back into ``env.hit`` before calling a helper
SLOT_NATIVE = 29
#: code compiled for the traced process (``vm.jit.target``): the ``struct ubpf_hit_frame``
#: address the trampoline passed, handed to every runtime helper as its sixth argument
SLOT_HIT_FRAME = 30
#: code compiled for the traced process: tail calls taken so far in this hit (limit 33)
SLOT_TAIL_COUNT = 31
#: runaway bound of unverified programs (code compiled with BUDGET): back-edges left in this
#: run, and the budget each entry starts from (0 = unbounded)
SLOT_BUDGET = 32
SLOT_BUDGET_INIT = 33
NUM_SLOTS = 34

#: The facts block of the native hit path: SLOT_CPU..SLOT_COOKIE are five consecutive
#: u64 (cpu, tgid << 32 | tid, gid << 32 | uid, func_ip, cookie) -- exactly the block
#: native/hotloop.c fills before calling a native program (``add_probe(native_facts=)``)
FACTS_FIRST_SLOT = SLOT_CPU
FACTS_WORDS = _FACTS.size // 8
assert tuple(
    FACTS_FIRST_SLOT + _FACTS.word(n) for n in ("cpu", "pid_tgid", "uid_gid", "func_ip", "cookie")) == (SLOT_CPU, SLOT_PID_TGID, SLOT_UID_GID, SLOT_FUNC_IP, SLOT_COOKIE)

#: status values
STATUS_OK = 0
STATUS_FAULT = 1       # memory / call-depth fault raised natively
STATUS_EXCEPTION = 2   # a Python exception from a helper, callback or tail-call target

#: FAULT_INFO encoding: size | write << 8 | kind << 16
FAULT_MEMORY = 0
FAULT_CALL_DEPTH = 1
FAULT_BUDGET = 2

#: the ``checked`` mode bits programs are compiled with (``True`` is CHECK_MEMORY)
CHECK_MEMORY = 1
BUDGET = 2

FRAME_SIZE = STACK_SIZE
STACK_TOTAL = STACK_SIZE * MAX_CALL_DEPTH
