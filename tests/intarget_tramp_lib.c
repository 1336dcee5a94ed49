/* Probe-able functions, test programs and drivers for tests/test_intarget_trampoline.py.
 *
 * Built with -O2 -mgeneral-regs-only (the trampolines save no vector registers: programs
 * must not use them) and with -fcf-protection=none or =full.  Functions whose first
 * instructions matter are written in assembly so that their shape does not depend on
 * the compiler; the C functions show what gcc really emits under each -fcf-protection.
 */
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <time.h>

#include "ubpf_abi.h"

#define NOIPA __attribute__((noipa, noinline))

/* ---- programs: u64 prog(u64 ctx, struct ubpf_hit_frame *hf) ---- */
uint64_t seen_regs[21];      /* pt_regs of the last hit */
uint64_t seen_frame[4];      /* hit frame of the last hit */
uint64_t seen_shadow_depth;  /* THREAD_BLOCK.shadow_depth the last program saw */
uint64_t prog_calls;         /* atomic */
volatile int raise_in_prog;  /* next program run raises SIGUSR1 on its own thread */

NOIPA uint64_t prog_record(uint64_t ctx, struct ubpf_hit_frame *hf)
{
	volatile uint64_t *r = (volatile uint64_t *)ctx;
	for (int i = 0; i < 21; i++)
		seen_regs[i] = r[i];
	seen_frame[0] = hf->ctx;
	seen_frame[1] = hf->probe;
	seen_frame[2] = hf->thread;
	seen_frame[3] = hf->runtime;
	seen_shadow_depth = ((struct ubpf_thread_block *)hf->thread)->shadow_depth;
	__atomic_fetch_add(&prog_calls, 1, __ATOMIC_RELAXED);
	if (raise_in_prog) {
		raise_in_prog = 0;
		raise(SIGUSR1);
	}
	/* clobber every caller-saved register the ABI lets a program clobber */
	__asm__ volatile("" ::: "rax", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11", "cc");
	return 0x5eed;
}

NOIPA uint64_t prog_count(uint64_t ctx, struct ubpf_hit_frame *hf)
{
	(void)ctx;
	(void)hf;
	__atomic_fetch_add(&prog_calls, 1, __ATOMIC_RELAXED);
	return 0;
}

NOIPA uint64_t prog_empty(uint64_t ctx, struct ubpf_hit_frame *hf)
{
	(void)ctx;
	(void)hf;
	return 0;
}

/* at the entry of c_rec(1): a copy of the thread block and of the stack slot of each
 * shadow entry, for the detach helpers to read as if the thread were stopped there */
uint64_t snap_tb[sizeof(struct ubpf_thread_block) / 8];
uint64_t snap_slots[UBPF_SHADOW_DEPTH];
uint64_t snap_taken;
NOIPA uint64_t prog_snapshot(uint64_t ctx, struct ubpf_hit_frame *hf)
{
	struct pt_regs *regs = (struct pt_regs *)ctx;
	struct ubpf_thread_block *tb = (struct ubpf_thread_block *)hf->thread;
	if (regs->rdi != 1)
		return 0;
	for (unsigned i = 0; i < sizeof(*tb) / 8; i++)
		snap_tb[i] = ((uint64_t *)tb)[i];
	struct ubpf_shadow_entry *e = (struct ubpf_shadow_entry *)tb->shadow;
	for (uint64_t i = 0; i < tb->shadow_depth && i < UBPF_SHADOW_DEPTH; i++)
		snap_slots[i] = *(uint64_t *)e[i].rsp;
	snap_taken++;
	return 0;
}

/* ---- C functions: the first instructions depend on -fcf-protection ---- */
NOIPA uint64_t c_mix(uint64_t a, uint64_t b, uint64_t c, uint64_t d, uint64_t e, uint64_t f)
{
	uint64_t s = 0;
	for (uint64_t i = 0; i < (a & 7); i++)
		s += b * i + c;
	return s ^ (d + e * f);
}

NOIPA uint64_t c_rec(uint64_t n)
{
	if (n == 0)
		return 0;
	uint64_t r = c_rec(n - 1);
	__asm__ volatile("" : "+r"(r));
	return r + n;
}

static jmp_buf jb;
NOIPA uint64_t c_jumper(uint64_t depth)
{
	if (depth == 0)
		longjmp(jb, 7);
	uint64_t r = c_jumper(depth - 1);
	__asm__ volatile("" : "+r"(r));
	return r + 1;
}

uint64_t rp_func(uint64_t x);
/* longjmp out of `depth` probed frames, then call rp_func(x) normally */
NOIPA uint64_t longjmp_then(uint64_t depth, uint64_t x)
{
	if (setjmp(jb) == 0)
		c_jumper(depth);
	return rp_func(x);
}

/* ---- assembly functions with exact first instructions ---- */
uint64_t asm_push(uint64_t a, uint64_t b);
uint64_t asm_endbr(uint64_t a, uint64_t b);
uint64_t asm_nop5(uint64_t a, uint64_t b);
uint64_t asm_riprel(uint64_t a);
uint64_t asm_jcc(uint64_t a);
uint64_t asm_call(uint64_t a);
uint64_t asm_callreg(uint64_t a, uint64_t (*fn)(uint64_t));
uint64_t regs_check(void);
uint64_t rz_func(uint64_t a);
uint64_t call_rp(uint64_t x);
uint64_t asm_global = 1000;
uint64_t callee_ret_addr;
uint64_t regs_rsp, regs_flags_after, regs_after[16];
uint64_t call_rp_rsp;

__asm__(
	".text\n"
	/* push rbp; mov rbp, rsp */
	".globl asm_push\n.type asm_push,@function\nasm_push:\n"
	"  push rbp\n  mov rbp, rsp\n  lea rax, [rdi + 2*rsi]\n  pop rbp\n  ret\n"
	".size asm_push, .-asm_push\n"
	/* endbr64 (4 bytes) + a 3-byte instruction */
	".globl asm_endbr\n.type asm_endbr,@function\nasm_endbr:\n"
	"  endbr64\n  mov rax, rdi\n  sub rax, rsi\n  ret\n"
	".size asm_endbr, .-asm_endbr\n"
	/* the 5-byte nop compilers put there for patching (-fpatchable-function-entry style) */
	".globl asm_nop5\n.type asm_nop5,@function\nasm_nop5:\n"
	"  .byte 0x0f, 0x1f, 0x44, 0x00, 0x00\n  lea rax, [rdi + rsi]\n  ret\n"
	".size asm_nop5, .-asm_nop5\n"
	/* a rip-relative load first */
	".globl asm_riprel\n.type asm_riprel,@function\nasm_riprel:\n"
	"  mov rax, qword ptr [rip + asm_global]\n  add rax, rdi\n  ret\n"
	".size asm_riprel, .-asm_riprel\n"
	/* a short jcc inside the displaced bytes */
	".globl asm_jcc\n.type asm_jcc,@function\nasm_jcc:\n"
	"  test rdi, rdi\n  jz 1f\n  mov eax, 11\n  ret\n1:\n  mov eax, 22\n  ret\n"
	".size asm_jcc, .-asm_jcc\n"
	/* a call first: the callee must see the original return address */
	".globl asm_callee\n.type asm_callee,@function\nasm_callee:\n"
	"  mov rax, [rsp]\n  mov [rip + callee_ret_addr], rax\n  lea rax, [rdi + 5]\n  ret\n"
	".size asm_callee, .-asm_callee\n"
	".globl asm_call\n.type asm_call,@function\nasm_call:\n"
	"  call asm_callee\n  add rax, 1\n  ret\n"
	".size asm_call, .-asm_call\n"
	".globl asm_callreg\n.type asm_callreg,@function\nasm_callreg:\n"
	"  .byte 0x0f, 0x1f, 0x40, 0x00\n  call rsi\n  add rax, 2\n  ret\n"
	".size asm_callreg, .-asm_callreg\n"
	/* a short jump back into the first bytes: must be refused */
	".globl asm_jmpback\n.type asm_jmpback,@function\nasm_jmpback:\n"
	"  xor eax, eax\n2:\n  add rax, rdi\n  dec rsi\n  jnz 2b\n  ret\n"
	".size asm_jmpback, .-asm_jmpback\n"
	/* 3 bytes: too short */
	".globl asm_short\n.type asm_short,@function\nasm_short:\n"
	"  mov eax, edi\n  ret\n"
	".size asm_short, .-asm_short\n"
	/* returns before 5 bytes */
	".globl asm_early_ret\n.type asm_early_ret,@function\nasm_early_ret:\n"
	"  xor eax, eax\n  ret\n  .byte 0x0f, 0x1f, 0x44, 0x00, 0x00\n"
	".size asm_early_ret, .-asm_early_ret\n"
	/* refused instructions in the first bytes */
	".globl asm_syscall\n.type asm_syscall,@function\nasm_syscall:\n"
	"  syscall\n  .byte 0x0f, 0x1f, 0x44, 0x00, 0x00\n  ret\n"
	".size asm_syscall, .-asm_syscall\n"
	".globl asm_int3\n.type asm_int3,@function\nasm_int3:\n"
	"  int3\n  .byte 0x0f, 0x1f, 0x44, 0x00, 0x00\n  ret\n"
	".size asm_int3, .-asm_int3\n"
	".globl asm_loop\n.type asm_loop,@function\nasm_loop:\n"
	"  mov rcx, rdi\n3:\n  loop 3b\n  .byte 0x0f, 0x1f, 0x44, 0x00, 0x00\n  ret\n"
	".size asm_loop, .-asm_loop\n"
	/* loop / jrcxz (rel8 only) in the displaced bytes, targets outside them */
	".globl asm_loopfar\n.type asm_loopfar,@function\nasm_loopfar:\n"
	"  mov ecx, edi\n  xor eax, eax\n  loop 4f\n  mov eax, 1\n  ret\n4:\n  mov eax, 2\n  ret\n"
	".size asm_loopfar, .-asm_loopfar\n"
	".globl asm_jrcxz\n.type asm_jrcxz,@function\nasm_jrcxz:\n"
	"  mov rcx, rdi\n  jrcxz 5f\n  mov eax, 1\n  ret\n5:\n  mov eax, 2\n  ret\n"
	".size asm_jrcxz, .-asm_jrcxz\n"
	/* every register and the flags set to known values across a probe site */
	".globl regs_check\n.type regs_check,@function\nregs_check:\n"
	"  push rbx\n  push rbp\n  push r12\n  push r13\n  push r14\n  push r15\n"
	"  push 0xcd7\n  popfq\n"
	"  movabs rax, 0x1111111111111100\n  movabs rcx, 0x1111111111111101\n"
	"  movabs rdx, 0x1111111111111102\n  movabs rbx, 0x1111111111111103\n"
	"  movabs rbp, 0x1111111111111105\n  movabs rsi, 0x1111111111111106\n"
	"  movabs rdi, 0x1111111111111107\n  movabs r8, 0x1111111111111108\n"
	"  movabs r9, 0x1111111111111109\n  movabs r10, 0x111111111111110a\n"
	"  movabs r11, 0x111111111111110b\n  movabs r12, 0x111111111111110c\n"
	"  movabs r13, 0x111111111111110d\n  movabs r14, 0x111111111111110e\n"
	"  movabs r15, 0x111111111111110f\n"
	"  mov [rip + regs_rsp], rsp\n"
	".globl regs_site\nregs_site:\n"
	"  .byte 0x0f, 0x1f, 0x44, 0x00, 0x00\n"
	"  mov [rip + regs_after + 0], rax\n  mov [rip + regs_after + 8], rcx\n"
	"  mov [rip + regs_after + 16], rdx\n  mov [rip + regs_after + 24], rbx\n"
	"  mov [rip + regs_after + 32], rsp\n  mov [rip + regs_after + 40], rbp\n"
	"  mov [rip + regs_after + 48], rsi\n  mov [rip + regs_after + 56], rdi\n"
	"  mov [rip + regs_after + 64], r8\n  mov [rip + regs_after + 72], r9\n"
	"  mov [rip + regs_after + 80], r10\n  mov [rip + regs_after + 88], r11\n"
	"  mov [rip + regs_after + 96], r12\n  mov [rip + regs_after + 104], r13\n"
	"  mov [rip + regs_after + 112], r14\n  mov [rip + regs_after + 120], r15\n"
	"  pushfq\n  pop qword ptr [rip + regs_flags_after]\n  cld\n"
	"  pop r15\n  pop r14\n  pop r13\n  pop r12\n  pop rbp\n  pop rbx\n  xor eax, eax\n  ret\n"
	".size regs_check, .-regs_check\n"
	/* a leaf function keeping data in its red zone across the probe site */
	".globl rz_func\n.type rz_func,@function\nrz_func:\n"
	"  mov [rsp - 8], rdi\n  mov [rsp - 64], rdi\n  mov [rsp - 128], rdi\n"
	".globl rz_site\nrz_site:\n"
	"  .byte 0x0f, 0x1f, 0x44, 0x00, 0x00\n"
	"  mov rax, [rsp - 8]\n  add rax, [rsp - 64]\n  add rax, [rsp - 128]\n  ret\n"
	".size rz_func, .-rz_func\n"
	/* data only below the 56 bytes a no-red-zone trampoline may use */
	".globl rz_far\n.type rz_far,@function\nrz_far:\n"
	"  mov [rsp - 64], rdi\n  mov [rsp - 128], rdi\n"
	".globl rz_far_site\nrz_far_site:\n"
	"  .byte 0x0f, 0x1f, 0x44, 0x00, 0x00\n"
	"  mov rax, [rsp - 64]\n  add rax, [rsp - 128]\n  ret\n"
	".size rz_far, .-rz_far\n"
	/* the return-probed function and a caller that records its rsp and return address */
	".globl rp_func\n.type rp_func,@function\nrp_func:\n"
	"  push rbx\n  lea rax, [rdi + 2*rdi]\n  add rax, 1\n  pop rbx\n  ret\n"
	".size rp_func, .-rp_func\n"
	".globl call_rp\n.type call_rp,@function\ncall_rp:\n"
	"  push rbx\n  mov [rip + call_rp_rsp], rsp\n  call rp_func\n"
	".globl call_rp_ret\ncall_rp_ret:\n"
	"  pop rbx\n  ret\n"
	".size call_rp, .-call_rp\n");

/* ---- signals: a probed function called from a handler while a program runs ---- */
uint64_t handler_result;
static void on_usr1(int sig)
{
	(void)sig;
	handler_result = asm_nop5(40, 2);
}

void install_handler(void)
{
	struct sigaction sa = {0};
	sa.sa_handler = on_usr1;
	sigaction(SIGUSR1, &sa, 0);
}

/* ---- a signal storm: SIGUSR2 at arbitrary instructions of the trampolines ---- */
static volatile uint64_t storm_handler_calls, storm_errors;
static volatile int storm_done;

static void on_usr2(int sig)
{
	(void)sig;
	if (asm_nop5(40, 2) != 42)
		storm_errors++;
	storm_handler_calls++;
}

static volatile uint64_t storm_calls;

static void *storm_worker(void *arg)
{
	uint64_t signals = *(uint64_t *)arg, i = 0;
	for (; storm_handler_calls < signals; i++)
		if (asm_nop5(i, 1) != i + 1)
			storm_errors++;
	storm_calls = i;
	storm_done = 1;
	return 0;
}

/* one thread calls asm_nop5 until `signals` handlers have run while this one signals it
 * without pause; returns the number of asm_nop5 calls made (loop + handlers) */
uint64_t signal_storm(uint64_t signals, uint64_t *errors)
{
	struct sigaction sa = {0};
	pthread_t t;
	sa.sa_handler = on_usr2;
	sigaction(SIGUSR2, &sa, 0);
	storm_handler_calls = storm_errors = 0;
	storm_done = 0;
	pthread_create(&t, 0, storm_worker, &signals);
	while (!storm_done)
		pthread_kill(t, SIGUSR2);
	pthread_join(t, 0);
	*errors = storm_errors;
	return storm_calls + storm_handler_calls;
}

/* ---- drivers ---- */
struct job {
	uint64_t calls;
	uint64_t sum;
};

static void *worker(void *arg)
{
	struct job *j = arg;
	uint64_t s = 0;
	for (uint64_t i = 0; i < j->calls; i++)
		s += asm_nop5(i, 1);
	j->sum = s;
	return 0;
}

/* n threads x calls calls of asm_nop5; returns the sum of all results */
uint64_t run_threads(int n, uint64_t calls)
{
	pthread_t t[64];
	struct job jobs[64];
	uint64_t total = 0;
	for (int i = 0; i < n; i++) {
		jobs[i].calls = calls;
		pthread_create(&t[i], 0, worker, &jobs[i]);
	}
	for (int i = 0; i < n; i++) {
		pthread_join(t[i], 0);
		total += jobs[i].sum;
	}
	return total;
}

/* nanoseconds n calls of fn(i, 1) take */
uint64_t bench_ns(uint64_t (*fn)(uint64_t, uint64_t), uint64_t n)
{
	struct timespec a, b;
	volatile uint64_t sink = 0;
	clock_gettime(CLOCK_MONOTONIC, &a);
	for (uint64_t i = 0; i < n; i++)
		sink += fn(i, 1);
	clock_gettime(CLOCK_MONOTONIC, &b);
	return (uint64_t)(b.tv_sec - a.tv_sec) * 1000000000u + (uint64_t)b.tv_nsec - (uint64_t)a.tv_nsec;
}
