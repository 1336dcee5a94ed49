"""LLVM IR for loads, stores and atomics, with the checked-mode memory guard.

Checked mode (the default) guards every access *before* it happens:

1. ``[r10 + off]`` with a constant ``off`` inside the current 512-byte frame is
   safe by construction (r10 is read-only and always points at a live frame), so
   it gets no check at all -- this covers almost every stack access compilers emit.
2. Otherwise two region caches in the runtime block are tested inline: the last
   region a read / a write was found in, kept as (start, length - 8) so the test
   is one sub and one unsigned compare (regions shorter than 8 bytes are never
   cached).  They start as the whole stack; loops over a map value or the context
   hit after their first access.  The Python side resets them to the stack
   whenever it re-syncs the region table (``MemoryMap.version`` changed), so a
   cached region can never outlive its registration.
3. A miss calls ``@bpf_chk``: a range test against the stack, then a binary search
   of the per-instance region table (rows of start, end, writable, mirrored from
   ``env.memory``), refilling the cache.  On failure it records pc/address/size
   in the runtime block, sets STATUS, calls the Python notifier and returns
   false; the access is skipped and every frame returns at once, after which
   ``run()`` raises ``VMFault``.

Unchecked mode emits the bare access and trusts the verifier.
Loads and stores use ``align 1``: BPF allows unaligned access and x86 does it at
full speed.  Atomics use natural alignment (what LLVM needs to emit ``lock``-prefixed
instructions instead of libcalls).
"""

from __future__ import annotations

from ubpf_py.errors import InvalidInstructionError, NotSupportedError
from ubpf_py.isa.instruction import Instruction
from ubpf_py.isa.opcodes import (
    ATOMIC_ADD,
    ATOMIC_AND,
    ATOMIC_OR,
    ATOMIC_XOR,
    BPF_ATOMIC,
    BPF_CMPXCHG,
    BPF_DW,
    BPF_FETCH,
    BPF_LDX,
    BPF_MEM,
    BPF_MEMSX,
    BPF_ST,
    BPF_STX,
    BPF_W,
    BPF_XCHG,
    SIZE_BYTES,
)
from ubpf_py.vm.jit import layout
from ubpf_py.vm.jit.emit import FunctionEmitter, s64

_ATOMIC_OPS = {ATOMIC_ADD: "add", ATOMIC_OR: "or", ATOMIC_AND: "and", ATOMIC_XOR: "xor"}


def emit_mem(f: FunctionEmitter, ins: Instruction) -> None:
    """Translate one LDX/ST/STX instruction (including atomics) into IR."""
    cls = ins.opcode & 0x07
    mode = ins.opcode & 0xE0
    size = SIZE_BYTES[ins.opcode & 0x18]
    bits = size * 8
    if cls == BPF_LDX:
        if mode not in (BPF_MEM, BPF_MEMSX) or (mode == BPF_MEMSX and size == 8):
            raise InvalidInstructionError(f.pc, f"unknown load opcode 0x{ins.opcode:02x}")
        ptr = _address(f, ins.src, ins.off, size, write=False)
        value = f.op(f"load i{bits}, ptr {ptr}, align 1")
        if size != 8:
            value = f.op(f"{'sext' if mode == BPF_MEMSX else 'zext'} i{bits} {value} to i64")
        f.put(ins.dst, value)
        return
    if mode == BPF_ATOMIC and cls == BPF_STX:
        _emit_atomic(f, ins, size)
        return
    if mode != BPF_MEM:
        if cls == BPF_ST and mode in (0x20, 0x40):
            raise NotSupportedError("legacy packet access (ld_abs/ld_ind)")
        raise InvalidInstructionError(f.pc, f"unknown store opcode 0x{ins.opcode:02x}")
    if cls == BPF_ST:
        value = str(s64(ins.imm) if size == 8 else _trunc_const(ins.imm, bits))
    else:
        value = f.get(ins.src)
        if size != 8:
            value = f.op(f"trunc i64 {value} to i{bits}")
    ptr = _address(f, ins.dst, ins.off, size, write=True)
    f.emit(f"  store i{bits} {value}, ptr {ptr}, align 1")


def _trunc_const(imm: int, bits: int) -> int:
    value = imm & ((1 << bits) - 1)
    return value - (1 << bits) if value >> (bits - 1) else value


def _emit_atomic(f: FunctionEmitter, ins: Instruction, size: int) -> None:
    if ins.opcode & 0x18 not in (BPF_W, BPF_DW):
        raise InvalidInstructionError(f.pc, "atomic operations need size W or DW")
    ty = f"i{size * 8}"
    ptr = _address(f, ins.dst, ins.off, size, write=True)
    src = f.get(ins.src)
    if size == 4:
        src = f.op(f"trunc i64 {src} to i32")
    imm = ins.imm
    if imm == BPF_CMPXCHG:
        expected = f.get(0)
        if size == 4:
            expected = f.op(f"trunc i64 {expected} to i32")
        pair = f.op(f"cmpxchg ptr {ptr}, {ty} {expected}, {ty} {src} seq_cst seq_cst")
        old = f.op(f"extractvalue {{ {ty}, i1 }} {pair}, 0")
        f.put(0, old if size == 8 else f.op(f"zext i32 {old} to i64"))
        return
    if imm == BPF_XCHG:
        name, fetch = "xchg", True
    elif imm & ~BPF_FETCH in _ATOMIC_OPS:
        name, fetch = _ATOMIC_OPS[imm & ~BPF_FETCH], bool(imm & BPF_FETCH)
    else:
        raise InvalidInstructionError(f.pc, f"unknown atomic operation 0x{imm & 0xFFFFFFFF:x}")
    old = f.op(f"atomicrmw {name} ptr {ptr}, {ty} {src} seq_cst")
    if fetch:
        f.put(ins.src, old if size == 8 else f.op(f"zext i32 {old} to i64"))


def _address(f: FunctionEmitter, base: int, off: int, size: int, *, write: bool) -> str:
    """A ``ptr`` operand for ``[base + off]``, guarded in checked mode."""
    base_val = f.get(base)
    addr = f.op(f"add i64 {base_val}, {off}") if off else base_val
    if f.checked and not (base == 10 and -layout.FRAME_SIZE <= off <= -size):
        f.n += 1
        n = f.n
        c = "w" if write else "r"
        start = f.op(f"load i64, ptr %{c}cs")
        limit = f.op(f"load i64, ptr %{c}cl")
        d = f.op(f"sub i64 {addr}, {start}")
        if size != 8:
            limit = f.op(f"add i64 {limit}, {8 - size}")
        hit = f.op(f"icmp ule i64 {d}, {limit}")
        f.emit(f"  br i1 {hit}, label %ok{n}, label %chk{n}, !prof !0")
        f.emit(f"chk{n}:")
        info = size | (int(write) << 8) | (layout.FAULT_MEMORY << 16)
        ok = f.op(f"call i1 @bpf_chk(ptr %rt, i64 {addr}, i64 {info}, i64 {f.pc})")
        f.emit(f"  br i1 {ok}, label %ok{n}, label %unwind")
        f.emit(f"ok{n}:")
    return f.op(f"inttoptr i64 {addr} to ptr")


def region_check_function() -> str:
    """``i1 @bpf_chk(rt, addr, info, pc)``: is ``[addr, addr+size)`` inside one region
    (writable if the access writes)?  Binary search over the sorted region table;
    on failure it reports the fault through the runtime block."""
    s = layout
    return f"""
!0 = !{{!"branch_weights", i32 1000, i32 1}}

define internal i1 @bpf_chk(ptr %rt, i64 %addr, i64 %info, i64 %pc) noinline cold {{
entry:
  %size = and i64 %info, 255
  %wbit = lshr i64 %info, 8
  %write = and i64 %wbit, 1
  %slop = getelementptr i64, ptr %rt, i64 {s.SLOT_STACK_LO}
  %slo = load i64, ptr %slop
  %sd = sub i64 %addr, %slo
  %slim = sub i64 {s.STACK_TOTAL}, %size
  %instack = icmp ule i64 %sd, %slim
  br i1 %instack, label %stack, label %search
stack:
  ret i1 true
search:
  %tp = getelementptr i64, ptr %rt, i64 {s.SLOT_REGIONS}
  %tabi = load i64, ptr %tp
  %tab = inttoptr i64 %tabi to ptr
  %cp = getelementptr i64, ptr %rt, i64 {s.SLOT_REGION_COUNT}
  %count = load i64, ptr %cp
  br label %loop
loop:
  %lo = phi i64 [0, %search], [%lo2, %body]
  %hi = phi i64 [%count, %search], [%hi2, %body]
  %more = icmp ult i64 %lo, %hi
  br i1 %more, label %body, label %found
body:
  %sum = add i64 %lo, %hi
  %mid = lshr i64 %sum, 1
  %ms = mul i64 %mid, 3
  %sp = getelementptr i64, ptr %tab, i64 %ms
  %start = load i64, ptr %sp
  %le = icmp ule i64 %start, %addr
  %mid1 = add i64 %mid, 1
  %lo2 = select i1 %le, i64 %mid1, i64 %lo
  %hi2 = select i1 %le, i64 %hi, i64 %mid
  br label %loop
found:
  %none = icmp eq i64 %lo, 0
  br i1 %none, label %fail, label %have
have:
  %idx = sub i64 %lo, 1
  %row = mul i64 %idx, 3
  %row1 = add i64 %row, 1
  %sp2 = getelementptr i64, ptr %tab, i64 %row
  %rstart = load i64, ptr %sp2
  %ep = getelementptr i64, ptr %tab, i64 %row1
  %end = load i64, ptr %ep
  %row2 = add i64 %row, 2
  %wp = getelementptr i64, ptr %tab, i64 %row2
  %wr = load i64, ptr %wp
  %room = sub i64 %end, %addr
  %inside = icmp ult i64 %addr, %end
  %fitsz = icmp ule i64 %size, %room
  %fits = and i1 %inside, %fitsz
  %needw = icmp ne i64 %write, 0
  %isro = icmp eq i64 %wr, 0
  %denied = and i1 %needw, %isro
  %allowed = xor i1 %denied, true
  %ok = and i1 %fits, %allowed
  br i1 %ok, label %pass, label %fail
pass:
  %len = sub i64 %end, %rstart
  %big = icmp uge i64 %len, 8
  br i1 %big, label %cache, label %done
cache:
  %lim = sub i64 %len, 8
  %wslot = mul i64 %write, 2
  %sslot = add i64 %wslot, {s.SLOT_RCACHE_START}
  %hs = getelementptr i64, ptr %rt, i64 %sslot
  store i64 %rstart, ptr %hs
  %lslot = add i64 %sslot, 1
  %hl = getelementptr i64, ptr %rt, i64 %lslot
  store i64 %lim, ptr %hl
  br label %done
done:
  ret i1 true
fail:
  call void @bpf_fault(ptr %rt, i64 %pc, i64 %addr, i64 %info)
  ret i1 false
}}

define internal void @bpf_fault(ptr %rt, i64 %pc, i64 %addr, i64 %info) noinline cold {{
entry:
  %pp = getelementptr i64, ptr %rt, i64 {s.SLOT_FAULT_PC}
  store i64 %pc, ptr %pp
  %ap = getelementptr i64, ptr %rt, i64 {s.SLOT_FAULT_ADDR}
  store i64 %addr, ptr %ap
  %ip = getelementptr i64, ptr %rt, i64 {s.SLOT_FAULT_INFO}
  store i64 %info, ptr %ip
  store i64 {s.STATUS_FAULT}, ptr %rt
  %fp = getelementptr i64, ptr %rt, i64 {s.SLOT_FAULT_FN}
  %fni = load i64, ptr %fp
  %fn = inttoptr i64 %fni to ptr
  call void %fn()
  ret void
}}
"""
