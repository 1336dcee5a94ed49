/*
 * ubpf-py native stop loop: the per-hit path of the ptrace probe engine in C.
 *
 * The Python tracer (ubpf_py/probe/tracer.py) owns all policy: it arms the
 * breakpoints, decodes the displaced instructions into plans and handles every
 * unusual stop.  This loop only does what must be fast: waitpid, GETREGS, look
 * the address up, call the probe's handler, finish the displaced instruction
 * (emulate it or resume in its out-of-line slot), SETREGS, CONT.  Anything it
 * does not recognise (events, signals, return trampolines, breakpoints marked
 * slow) is handed back to Python with the wait status.
 *
 * Handlers: a breakpoint may carry a Python callback token (the tracer's
 * ``_native_cb(token, tid, cpu)``, called through the C API with the GIL taken
 * back for the call; cpu is the CPU this loop runs on, the hit's cpu
 * approximation) and/or a native program pointer ``uint64_t prog(uint64_t ctx)``
 * called directly with the pt_regs address, so a JIT-compiled BPF program can
 * run with no Python at all.
 *
 * Native programs may come with (all optional, Python-owned memory):
 *  - a facts block the loop fills before each call: struct ubpf_facts, generated from
 *    ubpf_py/abi/runtime.py (FACTS) into runtime/ubpf_abi.h; the JIT reads the same words
 *    as its runtime block's slots SLOT_CPU.. (ubpf_py/vm/jit/layout.py):
 *      cpu (sched_getcpu() of this loop: the same approximation as the Python path),
 *      tgid << 32 | tid, gid << 32 | uid (per process, set by ub_set_ids),
 *      func_ip (the probe address), the probe's attach cookie
 *  - a status word: non-zero after the call means the program failed (checked-mode
 *    fault, helper exception); the loop stops with the thread held at its breakpoint
 *    and returns 4, Python turns the recorded failure into its error;
 *  - a counter block of two u64: hits and nanoseconds spent in the program.
 * A periodic poll (ub_set_poll) returns 5 after a hit once the interval has passed, so
 * Python can drain ring buffers while hits never enter it.
 *
 * Plan kinds must match ubpf_py/probe/ool.py.  Built as a CPython extension
 * module (setuptools); the loop is entered through the module's run(), the table
 * functions are reached through ctypes (ubpf_py/probe/native.py).
 */
#define _GNU_SOURCE
#include <Python.h> /* first, as CPython asks */
#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <poll.h>
#include <sys/wait.h>
#include <time.h>

#include "../runtime/ubpf_abi.h"

typedef uint64_t u64;

enum { K_SKIP = 1, K_PUSH, K_MOVRBP, K_SUBRSP, K_OOL, K_JMP, K_JCC, K_CALL, K_RET, K_IND };
/* user_regs_struct slots */
enum { R15, R14, R13, R12, RBP, RBX, R11, R10, R9, R8, RAX, RCX, RDX, RSI, RDI, ORIG_RAX, RIP, CS,
       EFLAGS, RSP, SS };

/* UBPF_BP_FAST: this loop may finish the hit; UBPF_BP_PYCB: call the Python callback;
 * UBPF_BP_REWIND: rip back on the int3 at once (see ubpf_py/abi/runtime.py) */
#define BP_FAST UBPF_BP_FAST
#define BP_PYCB UBPF_BP_PYCB
#define BP_REWIND UBPF_BP_REWIND

struct ub_bp {
	u64 addr, next, slot, target, imm, prog;
	u64 facts, status, counter, cookie;   /* native program extras (see top), 0 = none */
	int32_t kind, reg, cond, token, flags, used;
};

struct ub_loop {
	struct ub_bp *bps;
	uint32_t bmask;
	int32_t *tids;
	uint32_t tmask;
	u64 *regs;
	u64 hits, tracer_ns, handler_ns;
	volatile int32_t stop;
	int32_t wakeup_fd;     /* Python's signal wakeup fd (signal.set_wakeup_fd), -1 = none */
	uint32_t since_poll;
	int32_t tgid;          /* process whose threads are in the tid table (facts) */
	u64 uid_gid;           /* gid << 32 | uid of that process (facts) */
	u64 poll_ns, poll_at;  /* periodic return 5 (0 = never) */
};

static inline u64 now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (u64)ts.tv_sec * 1000000000ull + (u64)ts.tv_nsec;
}

static inline uint32_t hash64(u64 a)
{
	a ^= a >> 33;
	a *= 0xff51afd7ed558ccdull;
	a ^= a >> 33;
	return (uint32_t)a;
}

struct ub_loop *ub_new(uint32_t bp_capacity_pow2, uint32_t tid_capacity_pow2, u64 *regs)
{
	struct ub_loop *s = calloc(1, sizeof(*s));
	if (!s)
		return NULL;
	s->bps = calloc(bp_capacity_pow2, sizeof(struct ub_bp));
	s->tids = calloc(tid_capacity_pow2, sizeof(int32_t));
	if (!s->bps || !s->tids) {
		free(s->bps);
		free(s->tids);
		free(s);
		return NULL;
	}
	s->wakeup_fd = -1;
	s->bmask = bp_capacity_pow2 - 1;
	s->tmask = tid_capacity_pow2 - 1;
	s->regs = regs;
	return s;
}

void ub_free(struct ub_loop *s)
{
	if (!s)
		return;
	free(s->bps);
	free(s->tids);
	free(s);
}

/* bumped whenever an exported signature changes (native.py refuses a stale build) */
int32_t ub_abi(void) { return 3; }
void ub_set_wakeup_fd(struct ub_loop *s, int32_t fd) { s->wakeup_fd = fd; }
void ub_request_stop(struct ub_loop *s) { s->stop = 1; }
void ub_set_ids(struct ub_loop *s, int32_t tgid, u64 uid_gid)
{
	s->tgid = tgid;
	s->uid_gid = uid_gid;
}
void ub_set_poll(struct ub_loop *s, u64 interval_ns)
{
	s->poll_ns = interval_ns;
	s->poll_at = interval_ns ? now_ns() + interval_ns : 0;
}
void ub_stats(struct ub_loop *s, u64 *out3)
{
	out3[0] = s->hits;
	out3[1] = s->tracer_ns;
	out3[2] = s->handler_ns;
}

static struct ub_bp *bp_find(struct ub_loop *s, u64 addr)
{
	uint32_t i = hash64(addr) & s->bmask;
	for (uint32_t n = 0; n <= s->bmask; n++, i = (i + 1) & s->bmask) {
		struct ub_bp *b = &s->bps[i];
		if (!b->used)
			return NULL;
		if (b->used == 1 && b->addr == addr)
			return b;
	}
	return NULL;
}

/* insert or replace; returns 0, or -1 when full (Python rebuilds with a bigger table) */
int ub_bp_put(struct ub_loop *s, u64 addr, int32_t kind, u64 next, u64 slot, u64 target, u64 imm,
	      int32_t reg, int32_t cond, int32_t token, int32_t flags, u64 prog, u64 facts, u64 status,
	      u64 counter, u64 cookie)
{
	struct ub_bp *b = bp_find(s, addr);
	if (!b) {
		uint32_t i = hash64(addr) & s->bmask;
		for (uint32_t n = 0; n <= s->bmask; n++, i = (i + 1) & s->bmask)
			if (s->bps[i].used != 1) {
				b = &s->bps[i];
				break;
			}
		if (!b)
			return -1;
	}
	b->addr = addr;
	b->kind = kind;
	b->next = next;
	b->slot = slot;
	b->target = target;
	b->imm = imm;
	b->reg = reg;
	b->cond = cond;
	b->token = token;
	b->flags = flags;
	b->prog = prog;
	b->facts = facts;
	b->status = status;
	b->counter = counter;
	b->cookie = cookie;
	b->used = 1;
	return 0;
}

void ub_bp_del(struct ub_loop *s, u64 addr)
{
	struct ub_bp *b = bp_find(s, addr);
	if (b)
		b->used = 2; /* tombstone keeps probe chains intact */
}

void ub_bp_clear(struct ub_loop *s) { memset(s->bps, 0, (size_t)(s->bmask + 1) * sizeof(struct ub_bp)); }

static int32_t *tid_slot(struct ub_loop *s, int32_t tid, int for_insert)
{
	uint32_t i = hash64((u64)tid) & s->tmask;
	int32_t *tomb = NULL;
	for (uint32_t n = 0; n <= s->tmask; n++, i = (i + 1) & s->tmask) {
		int32_t v = s->tids[i];
		if (v == tid)
			return &s->tids[i];
		if (v == -1 && !tomb)
			tomb = &s->tids[i];
		if (v == 0)
			return for_insert ? (tomb ? tomb : &s->tids[i]) : NULL;
	}
	return for_insert ? tomb : NULL;
}

int ub_tid_add(struct ub_loop *s, int32_t tid)
{
	int32_t *p = tid_slot(s, tid, 1);
	if (!p)
		return -1;
	*p = tid;
	return 0;
}

void ub_tid_del(struct ub_loop *s, int32_t tid)
{
	int32_t *p = tid_slot(s, tid, 0);
	if (p)
		*p = -1;
}

void ub_tid_clear(struct ub_loop *s) { memset(s->tids, 0, (size_t)(s->tmask + 1) * sizeof(int32_t)); }

static int vm_write8(pid_t pid, u64 addr, u64 val)
{
	struct iovec l = { &val, 8 }, r = { (void *)addr, 8 };
	return process_vm_writev(pid, &l, 1, &r, 1, 0) == 8 ? 0 : -1;
}

static int vm_read8(pid_t pid, u64 addr, u64 *val)
{
	struct iovec l = { val, 8 }, r = { (void *)addr, 8 };
	return process_vm_readv(pid, &l, 1, &r, 1, 0) == 8 ? 0 : -1;
}

#define CF (1u << 0)
#define PF (1u << 2)
#define AF (1u << 4)
#define ZF (1u << 6)
#define SF (1u << 7)
#define OF (1u << 11)

static int cond_true(int cond, u64 fl, u64 rcx)
{
	int r;
	if (cond < 16) {
		switch (cond >> 1) {
		case 0: r = !!(fl & OF); break;
		case 1: r = !!(fl & CF); break;
		case 2: r = !!(fl & ZF); break;
		case 3: r = !!(fl & (CF | ZF)); break;
		case 4: r = !!(fl & SF); break;
		case 5: r = !!(fl & PF); break;
		case 6: r = !!(fl & SF) != !!(fl & OF); break;
		default: r = !!(fl & ZF) || (!!(fl & SF) != !!(fl & OF)); break;
		}
		return r != (cond & 1);
	}
	switch (cond) {
	case 16: return rcx == 0;
	case 17: return (rcx & 0xffffffffu) == 0;
	case 18: return rcx != 0;
	case 19: return rcx != 0 && (fl & ZF);
	default: return rcx != 0 && !(fl & ZF);
	}
}

/* Finish the displaced instruction in regs; 0 ok, -1 memory fault (Python decides). */
static int apply_plan(pid_t tid, const struct ub_bp *b, u64 *r)
{
	u64 sp, v;
	switch (b->kind) {
	case K_OOL: r[RIP] = b->slot; return 0;
	case K_SKIP: r[RIP] = b->next; return 0;
	case K_PUSH:
		sp = r[RSP] - 8;
		if (vm_write8(tid, sp, r[b->reg]))
			return -1;
		r[RSP] = sp;
		r[RIP] = b->next;
		return 0;
	case K_MOVRBP: r[RBP] = r[RSP]; r[RIP] = b->next; return 0;
	case K_SUBRSP: {
		u64 a = r[RSP], c = b->imm, res = a - c, fl = r[EFLAGS];
		fl &= ~(u64)(CF | PF | AF | ZF | SF | OF);
		if (a < c) fl |= CF;
		if (!res) fl |= ZF;
		if (res >> 63) fl |= SF;
		if (((a ^ c) & (a ^ res)) >> 63) fl |= OF;
		if (((a ^ c ^ res) >> 4) & 1) fl |= AF;
		if (!(__builtin_popcount((unsigned)(res & 0xff)) & 1)) fl |= PF;
		r[RSP] = res;
		r[EFLAGS] = fl;
		r[RIP] = b->next;
		return 0;
	}
	case K_JMP: r[RIP] = b->target; return 0;
	case K_JCC:
		if (b->cond >= 18)
			r[RCX] -= 1;
		r[RIP] = cond_true(b->cond, r[EFLAGS], r[RCX]) ? b->target : b->next;
		return 0;
	case K_CALL:
		sp = r[RSP] - 8;
		if (vm_write8(tid, sp, b->next))
			return -1;
		r[RSP] = sp;
		r[RIP] = b->target;
		return 0;
	case K_RET:
		if (vm_read8(tid, r[RSP], &v))
			return -1;
		r[RIP] = v;
		r[RSP] += 8 + b->imm;
		return 0;
	default:
		return -1;
	}
}

/* The Python callback: the GIL is taken back only for the call (the loop runs without it). */
struct py_call {
	PyThreadState *ts;
	PyObject *cb;
	int failed;
};

static int call_py(struct py_call *pc, int32_t token, int32_t tid, int32_t cpu)
{
	PyObject *res;
	long v;

	PyEval_RestoreThread(pc->ts);
	PyObject *args[3] = { PyLong_FromLong(token), PyLong_FromLong(tid), PyLong_FromLong(cpu) };
	res = (args[0] && args[1] && args[2]) ? PyObject_Vectorcall(pc->cb, args, 3, NULL) : NULL;
	Py_XDECREF(args[0]);
	Py_XDECREF(args[1]);
	Py_XDECREF(args[2]);
	if (!res) {
		pc->failed = 1;
		v = 1;
	} else {
		v = PyLong_AsLong(res);
		Py_DECREF(res);
		if (v == -1 && PyErr_Occurred()) {
			pc->failed = 1;
			v = 1;
		}
	}
	pc->ts = PyEval_SaveThread();
	return v != 0;
}

/*
 * Run until a stop this loop does not handle.  Returns 1 with *tid and *status set
 * (*regs_valid = 1 when regs already hold that thread's registers), 0 when a
 * stop was requested or a signal interrupted waitpid, 2 when a Python callback
 * failed (thread *tid is stopped at its breakpoint, regs valid, ip set
 * to the probe address), 3 when handlers ran but the emulated instruction
 * faulted (Python finishes it), 4 when a native program reported a failure in its
 * status word (thread *tid held at its breakpoint as for 2), 5 when the poll
 * interval has passed (after a completed hit), -errno on error (-ECHILD: nothing to wait for).
 */
/* 1. The next stop.  Why peek first (WNOWAIT): reaping a stop clears its SIGTRAP in the
 * kernel, so a tracer killed between the reap and the rewind of a hit left the thread with
 * no signal, right after our int3 -- in the middle of the instruction once the guardian had
 * put the byte back (seen: 1 kill of 60 under load, SIGSEGV).  So a SIGTRAP stop of a known
 * thread on a BP_REWIND breakpoint is rewound while the kernel still holds its SIGTRAP, and
 * reaped only then: killed at any point, the thread either traps again into the trap guard
 * (which takes a SIGTRAP at the int3 as well as just after it) or runs from the int3.
 * *have_regs: s->regs holds the stop's registers as they were (rip after the int3). */
static pid_t collect(struct ub_loop *s, int *st, int nohang, int *have_regs)
{
	siginfo_t si;
	*have_regs = 0;
	si.si_pid = 0;
	if (waitid(P_ALL, 0, &si, WEXITED | WSTOPPED | __WALL | WNOWAIT | (nohang ? WNOHANG : 0)) < 0)
		return -1;
	if (si.si_pid == 0)
		return 0;
	if (si.si_code == CLD_TRAPPED && si.si_status == SIGTRAP && tid_slot(s, si.si_pid, 0) &&
	    ptrace(PTRACE_GETREGS, si.si_pid, 0, s->regs) == 0) {
		struct ub_bp *b = bp_find(s, s->regs[RIP] - 1);
		*have_regs = 1;
		if (b && (b->flags & BP_REWIND))
			ptrace(PTRACE_POKEUSER, si.si_pid, (void *)(uintptr_t)(RIP * sizeof(u64)),
			       (void *)(uintptr_t)b->addr);
	}
	return waitpid(si.si_pid, st, __WALL);
}

static int run_loop(struct ub_loop *s, int32_t *out_tid, int32_t *out_status, int32_t *regs_valid,
		    struct py_call *pc)
{
	u64 *r = s->regs;
	*regs_valid = 0;
	s->stop = 0;
	while (!s->stop) {
		int st, have_regs;
		/* a signal that arrived while we were busy (not in waitpid) leaves no EINTR behind:
		 * Python's wakeup fd tells us, checked every 64 hits */
		if (s->wakeup_fd >= 0 && ++s->since_poll >= 64) {
			struct pollfd p = { s->wakeup_fd, POLLIN, 0 };
			s->since_poll = 0;
			if (poll(&p, 1, 0) > 0)
				return 0;
		}
		/* 1. waitpid (steps as in ubpf_py/probe/tracer.py's hit section) */
		pid_t tid = collect(s, &st, 1, &have_regs);
		if (tid == 0) {
			/* about to block: a signal that arrived while we handled the last stop (its
			 * Python handler has not run: we hold no GIL) must not wait for the next stop,
			 * which may never come -- e.g. Ctrl-C while every thread sleeps */
			if (s->wakeup_fd >= 0) {
				struct pollfd p = { s->wakeup_fd, POLLIN, 0 };
				if (poll(&p, 1, 0) > 0)
					return 0;
			}
			if (s->stop)
				return 0;
			tid = collect(s, &st, 0, &have_regs);
		}
		if (tid < 0)
			return errno == EINTR ? 0 : -errno;
		if ((st & 0xffff) != ((SIGTRAP << 8) | 0x7f) || (st >> 16) != 0 || !tid_slot(s, tid, 0)) {
			*out_tid = tid;
			*out_status = st;
			return 1;
		}
		u64 t0 = now_ns();
		if (!have_regs && ptrace(PTRACE_GETREGS, tid, 0, r) < 0) { /* 2. registers */
			*out_tid = tid;
			*out_status = st;
			return 1;
		}
		struct ub_bp *b = bp_find(s, r[RIP] - 1); /* 3. the breakpoint (int3 has run) */
		if (!have_regs && b && (b->flags & BP_REWIND)) /* killed from here on, it traps again */
			ptrace(PTRACE_POKEUSER, tid, (void *)(uintptr_t)(RIP * sizeof(u64)), (void *)(uintptr_t)b->addr);
		if (!b || !(b->flags & BP_FAST)) {
			*out_tid = tid;
			*out_status = st;
			*regs_valid = 1;
			return 1;
		}
		r[RIP] = b->addr; /* 4. programs see ip = probe address */
		if (b->prog || (b->flags & BP_PYCB)) {
			u64 h0 = now_ns();
			if (b->prog) { /* 5. a native-only program, facts filled here */
				if (b->facts) {
					struct ubpf_facts *f = (struct ubpf_facts *)(uintptr_t)b->facts;
					int cpu = sched_getcpu();
					f->cpu = cpu < 0 ? 0 : (u64)cpu;
					f->pid_tgid = (u64)(uint32_t)s->tgid << 32 | (uint32_t)tid;
					f->uid_gid = s->uid_gid;
					f->func_ip = b->addr;
					f->cookie = b->cookie;
				}
				((u64(*)(u64))b->prog)((u64)(uintptr_t)r);
				if (b->counter) {
					u64 *c = (u64 *)(uintptr_t)b->counter;
					c[0]++;
					c[1] += now_ns() - h0;
				}
				if (b->status && *(volatile u64 *)(uintptr_t)b->status) {
					s->handler_ns += now_ns() - h0;
					*out_tid = tid;
					*out_status = st;
					*regs_valid = 1;
					return 4;
				}
			}
			/* 5. else Python: _native_cb -> run_entry_probes (6. fill, 7. call) */
			if ((b->flags & BP_PYCB) && call_py(pc, b->token, tid, sched_getcpu())) {
				s->handler_ns += now_ns() - h0;
				*out_tid = tid;
				*out_status = st;
				*regs_valid = 1;
				return 2;
			}
			s->handler_ns += now_ns() - h0;
		}
		if (apply_plan(tid, b, r)) { /* 9. finish the displaced instruction */
			/* handlers ran; Python finishes the instruction (it delivers the fault) */
			r[RIP] = b->addr;
			*out_tid = tid;
			*out_status = st;
			*regs_valid = 1;
			return 3;
		}
		ptrace(PTRACE_SETREGS, tid, 0, r);
		ptrace(PTRACE_CONT, tid, 0, 0);
		s->hits++;
		s->tracer_ns += now_ns() - t0;
		if (s->poll_ns && t0 >= s->poll_at) {
			s->poll_at = t0 + s->poll_ns;
			return 5;
		}
	}
	return 0;
}

/*
 * run(state_address, callback) -> (rc, tid, status, regs_valid): the loop above, with the GIL
 * released while it waits and handles stops, taken back only to call ``callback(token, tid,
 * cpu) -> int`` (non-zero: it failed, rc 2).  A callback that raises ends the loop and the
 * exception propagates.
 */
static PyObject *py_run(PyObject *self, PyObject *args)
{
	unsigned long long addr;
	struct py_call pc = { NULL, NULL, 0 };
	int32_t tid = 0, st = 0, rv = 0;
	int r;

	(void)self;
	if (!PyArg_ParseTuple(args, "KO", &addr, &pc.cb))
		return NULL;
	pc.ts = PyEval_SaveThread();
	r = run_loop((struct ub_loop *)(uintptr_t)addr, &tid, &st, &rv, &pc);
	PyEval_RestoreThread(pc.ts);
	if (pc.failed && PyErr_Occurred())
		return NULL;
	return Py_BuildValue("(iiii)", r, tid, st, rv);
}

static PyMethodDef hotloop_methods[] = {
	{ "run", py_run, METH_VARARGS, "run(state_address, callback) -> (rc, tid, status, regs_valid)" },
	{ NULL, NULL, 0, NULL },
};

/* A real extension module so that setuptools builds and installs it; the table functions
 * above are reached through ctypes (ubpf_py/probe/native.py). */
static struct PyModuleDef hotloop_module = {
	PyModuleDef_HEAD_INIT, "_hotloop", "ubpf-py native ptrace stop loop", -1, hotloop_methods,
	NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__hotloop(void) { return PyModule_Create(&hotloop_module); }
