"""Native fast paths for the hot helpers: JIT code that never enters Python.

Calling a helper through its ctypes trampoline costs microseconds (argument
conversion, a Python frame, the helper's own Python).  For the helpers a probe
program calls on every hit the compiler emits native code instead, guarded per
instance so compiled code stays shareable (``cache``) and the Python helper
stays the fallback:

* ``bpf_map_lookup_elem`` (1) when r1 is a compile-time constant (a relocated
  ``lddw`` of a map handle): the call site loads ``rt[FAST_MAPS][k]`` -- the map's
  handle address when this instance may look that map up natively, else 0 --
  and calls ``@bpf_fast_lookup``, which reads the map's native descriptor
  (``maps.descriptor``): ARRAY/PERCPU_ARRAY are a bounds check and address
  arithmetic, the HASH family probes the native index the Python map code keeps
  in step (LRU lookups set the element's reference bit like the Python path).
* per-hit facts -- ktime_get_ns (5), get_prandom_u32 (7), get_smp_processor_id (8),
  get_current_pid_tgid (14), get_current_uid_gid (15), ktime_get_boot_ns (125),
  get_func_ip (173), get_attach_cookie (174) -- read the hit-fact slots ``run()``
  copies from ``env.hit`` (one ``pack_into``), call libc ``clock_gettime`` through
  ``rt[CLOCK_FN]``, or step a xorshift64* generator in ``rt[RNG]``; enabled by bit
  ``FAST_BITS[id]`` of ``rt[FAST_FLAGS]``.

A fast path is enabled for an instance only when ``env.helpers[id]`` is the
standard implementation (marked with ``NATIVE_ATTR`` by ``helpers``) at
construction, so environments with their own helpers (tests, conformance) keep
calling them.  Checked mode guards the key with ``@bpf_chk`` (read of key_size
bytes) before the native lookup reads it, exactly the check the Python helper's
``env.memory.read`` does; unchecked mode trusts the verifier.

The IR is kept in small named pieces (``IR_PIECES``: one function per LLVM function,
its docstring saying what it computes) that ``fast_functions`` joins into the module.
The hash index they read is the one ``maps.descriptor`` and ``runtime/maps.c`` write:
its constants (hash, tombstone) come from ``ubpf_py.abi.maps``, and
tests/test_hash_index_agree.py runs the three implementations on the same tables.
"""

from __future__ import annotations

from ubpf_py.abi.maps import FNV_BASIS, FNV_PRIME
from ubpf_py.maps import consts as C
from ubpf_py.maps import descriptor as D
from ubpf_py.vm.jit import layout as L

#: attribute ``helpers.build_helper_table`` sets on the standard implementations of these
#: helpers (value: the helper's kernel name); a fast path replaces only such a function
NATIVE_ATTR = "ubpf_native"

#: helper id -> kernel name (what ``ubpf_native`` must say); bit ``FAST_BITS[id]`` of
#: rt[FAST_FLAGS] enables the fact / clock / prandom ones per instance
FAST_HELPERS: dict[int, str] = {
    1: "bpf_map_lookup_elem", 2: "bpf_map_update_elem", 130: "bpf_ringbuf_output", 5: "bpf_ktime_get_ns", 7: "bpf_get_prandom_u32",
    8: "bpf_get_smp_processor_id", 14: "bpf_get_current_pid_tgid", 15: "bpf_get_current_uid_gid",
    125: "bpf_ktime_get_boot_ns", 173: "bpf_get_func_ip", 174: "bpf_get_attach_cookie",
}
FAST_BITS: dict[int, int] = {hid: 1 << i for i, hid in enumerate(sorted(FAST_HELPERS))}
#: helpers answered from the hit-fact slots (need the per-run copy of env.hit)
FACT_SLOTS = {8: L.SLOT_CPU, 14: L.SLOT_PID_TGID, 15: L.SLOT_UID_GID, 173: L.SLOT_FUNC_IP,
              174: L.SLOT_COOKIE}
#: helpers whose r1 is a map handle: index in a map's group of rt[FAST_MAPS] entries
MAP_HELPERS = {1: 0, 2: 1, 130: 2}
MAP_GROUP = 3
#: what ``@bpf_fast_update`` / ``@bpf_fast_rb_output`` return when Python must do the
#: operation (never a kernel result)
UPDATE_FALLBACK = 1
CLOCK_MONOTONIC = 1
CLOCK_BOOTTIME = 7
CLOCK_IDS = {5: CLOCK_MONOTONIC, 125: CLOCK_BOOTTIME}


def is_standard(fn: object, hid: int) -> bool:
    """Is ``fn`` ubpf-py's own implementation of helper ``hid`` (so native code may replace it)?"""
    return getattr(fn, NATIVE_ATTR, None) == FAST_HELPERS.get(hid)


def clock_ir() -> str:
    """``@bpf_fast_clock(rt, clock_id)``: nanoseconds of a clock (ktime_get_ns / ktime_get_boot_ns),
    through libc ``clock_gettime`` at ``rt[CLOCK_FN]`` into the timespec slots of ``rt``."""
    return f"""
define internal i64 @bpf_fast_clock(ptr %rt, i32 %id) noinline {{
entry:
  %fp = getelementptr i64, ptr %rt, i64 {L.SLOT_CLOCK_FN}
  %fni = load i64, ptr %fp
  %fn = inttoptr i64 %fni to ptr
  %ts = getelementptr i64, ptr %rt, i64 {L.SLOT_TIMESPEC}
  %rc = call i32 %fn(i32 %id, ptr %ts)
  %sec = load i64, ptr %ts
  %nsp = getelementptr i64, ptr %rt, i64 {L.SLOT_TIMESPEC + 1}
  %nsec = load i64, ptr %nsp
  %m = mul i64 %sec, 1000000000
  %r = add i64 %m, %nsec
  ret i64 %r
}}
"""


def prandom_ir() -> str:
    """``@bpf_fast_prandom(rt)``: bpf_get_prandom_u32 -- one xorshift64* step of the state in
    ``rt[RNG]``, the high 32 bits of the product."""
    return f"""
define internal i64 @bpf_fast_prandom(ptr %rt) {{
entry:
  %sp = getelementptr i64, ptr %rt, i64 {L.SLOT_RNG}
  %x0 = load i64, ptr %sp
  %a = lshr i64 %x0, 12
  %x1 = xor i64 %x0, %a
  %b = shl i64 %x1, 25
  %x2 = xor i64 %x1, %b
  %c = lshr i64 %x2, 27
  %x3 = xor i64 %x2, %c
  store i64 %x3, ptr %sp
  %m = mul i64 %x3, 2685821657736338717
  %r = lshr i64 %m, 32
  ret i64 %r
}}
"""


def key_hash_ir() -> str:
    """``@bpf_fast_hash(key, size)``: the hash index's hash, maps.descriptor.key_hash --
    FNV-1a (constants from ubpf_py.abi.maps) over the key's little-endian u64 words, the last
    word zero-padded, folded as ``h ^ (h >> 32)``."""
    return f"""
define internal i64 @bpf_fast_hash(ptr %kp, i64 %ks) {{
entry:
  br label %hloop
hloop:
  %i = phi i64 [0, %entry], [%i8, %hword]
  %h = phi i64 [{_s64(FNV_BASIS)}, %entry], [%h2, %hword]
  %rem = sub i64 %ks, %i
  %full = icmp uge i64 %rem, 8
  br i1 %full, label %hword, label %htail
hword:
  %wp = getelementptr i8, ptr %kp, i64 %i
  %w = load i64, ptr %wp, align 1
  %hx = xor i64 %h, %w
  %h2 = mul i64 %hx, {_s64(FNV_PRIME)}
  %i8 = add i64 %i, 8
  br label %hloop
htail:
  %some = icmp ne i64 %rem, 0
  br i1 %some, label %tloop, label %hdone
tloop:
  %j = phi i64 [0, %htail], [%j1, %tloop]
  %tw = phi i64 [0, %htail], [%tw2, %tloop]
  %ij = add i64 %i, %j
  %bp = getelementptr i8, ptr %kp, i64 %ij
  %byte = load i8, ptr %bp
  %bz = zext i8 %byte to i64
  %sh = shl i64 %j, 3
  %bs = shl i64 %bz, %sh
  %tw2 = or i64 %tw, %bs
  %j1 = add i64 %j, 1
  %tmore = icmp ult i64 %j1, %rem
  br i1 %tmore, label %tloop, label %tend
tend:
  %tx = xor i64 %h, %tw2
  %ht = mul i64 %tx, {_s64(FNV_PRIME)}
  br label %hdone
hdone:
  %hf = phi i64 [%h, %htail], [%ht, %tend]
  %hs = lshr i64 %hf, 32
  %hm = xor i64 %hf, %hs
  ret i64 %hm
}}
"""


def key_equal_ir() -> str:
    """``@bpf_fast_key_eq(a, b, size)``: whether two keys of ``size`` bytes are equal
    (u64 words, then the tail bytes)."""
    return """
define internal i1 @bpf_fast_key_eq(ptr %a, ptr %b, i64 %ks) {
entry:
  br label %cloop
cloop:
  %m = phi i64 [0, %entry], [%m8, %cword]
  %crem = sub i64 %ks, %m
  %cfull = icmp uge i64 %crem, 8
  br i1 %cfull, label %cword, label %cbytes
cword:
  %x1p = getelementptr i8, ptr %a, i64 %m
  %x1 = load i64, ptr %x1p, align 1
  %y1p = getelementptr i8, ptr %b, i64 %m
  %y1 = load i64, ptr %y1p, align 1
  %m8 = add i64 %m, 8
  %weq = icmp eq i64 %x1, %y1
  br i1 %weq, label %cloop, label %differ
cbytes:
  %q = phi i64 [%m, %cloop], [%q1, %cbyte]
  %qdone = icmp uge i64 %q, %ks
  br i1 %qdone, label %same, label %cbyte
cbyte:
  %x2p = getelementptr i8, ptr %a, i64 %q
  %x2 = load i8, ptr %x2p
  %y2p = getelementptr i8, ptr %b, i64 %q
  %y2 = load i8, ptr %y2p
  %q1 = add i64 %q, 1
  %beq = icmp eq i8 %x2, %y2
  br i1 %beq, label %cbytes, label %differ
same:
  ret i1 1
differ:
  ret i1 0
}
"""


def find_ir() -> str:
    """``@bpf_fast_find(desc, key, size)``: the slot (array: element index) holding ``key``,
    -1 when absent.  ARRAY: the u32 index below ``limit``.  HASH family: linear probing of
    the index table from ``hash & mask``, skipping tombstones, until the key's slot or an
    empty entry (maps.descriptor.NativeIndex writes the table; so does runtime/maps.c)."""
    return f"""
define internal i64 @bpf_fast_find(ptr %dp, ptr %kp, i64 %ks) {{
entry:
  %kind = load i64, ptr %dp
  %limp = getelementptr i64, ptr %dp, i64 {D.D_LIMIT}
  %lim = load i64, ptr %limp
  %isarr = icmp eq i64 %kind, {D.KIND_ARRAY}
  br i1 %isarr, label %array, label %hash
array:
  %i32 = load i32, ptr %kp, align 1
  %idx = zext i32 %i32 to i64
  %in = icmp ult i64 %idx, %lim
  %ar = select i1 %in, i64 %idx, i64 -1
  ret i64 %ar
miss:
  ret i64 -1
hash:
  %hm = call i64 @bpf_fast_hash(ptr %kp, i64 %ks)
  %start = and i64 %hm, %lim
  %tp = getelementptr i64, ptr %dp, i64 {D.D_TABLE}
  %tab = load i64, ptr %tp
  %tabp = inttoptr i64 %tab to ptr
  %kbp = getelementptr i64, ptr %dp, i64 {D.D_KEYS}
  %kbase = load i64, ptr %kbp
  %kstp = getelementptr i64, ptr %dp, i64 {D.D_KEY_STRIDE}
  %kstride = load i64, ptr %kstp
  br label %probe
probe:
  %pi = phi i64 [%start, %hash], [%next, %skip]
  %ep = getelementptr i64, ptr %tabp, i64 %pi
  %e = load i64, ptr %ep
  %empty = icmp eq i64 %e, 0
  br i1 %empty, label %miss, label %used
used:
  %tomb = icmp eq i64 %e, {_s64(D.TOMBSTONE)}
  br i1 %tomb, label %skip, label %cmp
cmp:
  %slot = sub i64 %e, 1
  %ko = mul i64 %slot, %kstride
  %ka = add i64 %kbase, %ko
  %kap = inttoptr i64 %ka to ptr
  %eq = call i1 @bpf_fast_key_eq(ptr %kp, ptr %kap, i64 %ks)
  br i1 %eq, label %found, label %skip
skip:
  %pi1 = add i64 %pi, 1
  %next = and i64 %pi1, %lim
  br label %probe
found:
  ret i64 %slot
}}
"""


def slot_addr_ir() -> str:
    """``@bpf_fast_slot_addr(desc, rt, slot)``: the address of slot (element) ``slot``'s value
    for this CPU (``rt[CPU]``); an LRU map's slot gets its reference byte set, as a Python
    lookup does."""
    return f"""
define internal i64 @bpf_fast_slot_addr(ptr %dp, ptr %rt, i64 %slot) {{
entry:
  %rfp = getelementptr i64, ptr %dp, i64 {D.D_REF}
  %rf = load i64, ptr %rfp
  %lru = icmp ne i64 %rf, 0
  br i1 %lru, label %touch, label %addr
touch:
  %ra = add i64 %rf, %slot
  %rap = inttoptr i64 %ra to ptr
  store i8 1, ptr %rap
  br label %addr
addr:
  %cpup = getelementptr i64, ptr %rt, i64 {L.SLOT_CPU}
  %cpu = load i64, ptr %cpup
  %csp = getelementptr i64, ptr %dp, i64 {D.D_CPU_STRIDE}
  %cstride = load i64, ptr %csp
  %coff = mul i64 %cpu, %cstride
  %vbp = getelementptr i64, ptr %dp, i64 {D.D_VALUES}
  %vbase = load i64, ptr %vbp
  %vsp = getelementptr i64, ptr %dp, i64 {D.D_VAL_STRIDE}
  %vstride = load i64, ptr %vsp
  %vo = mul i64 %slot, %vstride
  %v1 = add i64 %vbase, %vo
  %v2 = add i64 %v1, %coff
  ret i64 %v2
}}
"""


def lookup_ir() -> str:
    """``@bpf_fast_lookup(desc, key, rt, pc, checked)``: bpf_map_lookup_elem -- the value's
    address, 0 when absent or (checked mode) when ``@bpf_chk`` refuses the key bytes."""
    return f"""
define internal i64 @bpf_fast_lookup(i64 %d, i64 %key, ptr %rt, i64 %pc, i1 %chk) {{
entry:
  %dp = inttoptr i64 %d to ptr
  %ksp = getelementptr i64, ptr %dp, i64 {D.D_KEY_SIZE}
  %ks = load i64, ptr %ksp
  br i1 %chk, label %check, label %go
check:
  %ok = call i1 @bpf_chk(ptr %rt, i64 %key, i64 %ks, i64 %pc)
  br i1 %ok, label %go, label %miss
go:
  %kp = inttoptr i64 %key to ptr
  %slot = call i64 @bpf_fast_find(ptr %dp, ptr %kp, i64 %ks)
  %none = icmp slt i64 %slot, 0
  br i1 %none, label %miss, label %hit
hit:
  %a = call i64 @bpf_fast_slot_addr(ptr %dp, ptr %rt, i64 %slot)
  ret i64 %a
miss:
  ret i64 0
}}
"""


def update_ir() -> str:
    """``@bpf_fast_update(desc, key, value, flags, rt, pc, checked)``: bpf_map_update_elem of an
    existing element (copy in place), -E2BIG / -ENOENT / -EEXIST as the kernel answers, or
    UPDATE_FALLBACK when Python must do it (an insertion, BPF_F_LOCK or unknown flags,
    values over 255 bytes)."""
    FALLBACK, E2BIG, ENOENT, EEXIST = UPDATE_FALLBACK, C.E2BIG, C.ENOENT, C.EEXIST
    return f"""
define internal i64 @bpf_fast_update(i64 %d, i64 %key, i64 %val, i64 %flags, ptr %rt, i64 %pc,
                                     i1 %chk) {{
entry:
  %dp = inttoptr i64 %d to ptr
  %ksp = getelementptr i64, ptr %dp, i64 {D.D_KEY_SIZE}
  %ks = load i64, ptr %ksp
  %vszp = getelementptr i64, ptr %dp, i64 {D.D_VALUE_SIZE}
  %vs = load i64, ptr %vszp
  %badf = icmp ugt i64 %flags, {C.BPF_EXIST}
  %novs = icmp eq i64 %vs, 0
  %fb = or i1 %badf, %novs
  br i1 %fb, label %fallback, label %c0
c0:
  br i1 %chk, label %check, label %go
check:
  %ok = call i1 @bpf_chk(ptr %rt, i64 %key, i64 %ks, i64 %pc)
  br i1 %ok, label %check2, label %fault
check2:
  %ok2 = call i1 @bpf_chk(ptr %rt, i64 %val, i64 %vs, i64 %pc)
  br i1 %ok2, label %go, label %fault
fault:
  ret i64 0
fallback:
  ret i64 {FALLBACK}
go:
  %kp = inttoptr i64 %key to ptr
  %slot = call i64 @bpf_fast_find(ptr %dp, ptr %kp, i64 %ks)
  %none = icmp slt i64 %slot, 0
  %kind = load i64, ptr %dp
  %isarr = icmp eq i64 %kind, {D.KIND_ARRAY}
  br i1 %none, label %absent, label %present
absent:
  br i1 %isarr, label %e2big, label %hmiss
e2big:
  ret i64 -{E2BIG}
hmiss:
  %exist = icmp eq i64 %flags, {C.BPF_EXIST}
  br i1 %exist, label %enoent, label %fallback
enoent:
  ret i64 -{ENOENT}
present:
  %noexist = icmp eq i64 %flags, {C.BPF_NOEXIST}
  br i1 %noexist, label %eexist, label %copy
eexist:
  ret i64 -{EEXIST}
copy:
  %dst = call i64 @bpf_fast_slot_addr(ptr %dp, ptr %rt, i64 %slot)
  call void @bpf_fast_copy(i64 %dst, i64 %val, i64 %vs)
  ret i64 0
}}
"""


def copy_ir() -> str:
    """``@bpf_fast_copy(dst, src, n)``: copy n non-overlapping bytes (u64 words, then bytes;
    values and records are small)."""
    return """
define internal void @bpf_fast_copy(i64 %dst, i64 %src, i64 %n) {
entry:
  %dstp = inttoptr i64 %dst to ptr
  %srcp = inttoptr i64 %src to ptr
  br label %wloop
wloop:
  %o = phi i64 [0, %entry], [%o8, %word]
  %left = sub i64 %n, %o
  %wfull = icmp uge i64 %left, 8
  br i1 %wfull, label %word, label %bytes
word:
  %sw = getelementptr i8, ptr %srcp, i64 %o
  %wv = load i64, ptr %sw, align 1
  %dw = getelementptr i8, ptr %dstp, i64 %o
  store i64 %wv, ptr %dw, align 1
  %o8 = add i64 %o, 8
  br label %wloop
bytes:
  %b = phi i64 [%o, %wloop], [%b1, %byte]
  %bdone = icmp uge i64 %b, %n
  br i1 %bdone, label %done, label %byte
byte:
  %sb = getelementptr i8, ptr %srcp, i64 %b
  %bv = load i8, ptr %sb
  %db = getelementptr i8, ptr %dstp, i64 %b
  store i8 %bv, ptr %db
  %b1 = add i64 %b, 1
  br label %bytes
done:
  ret void
}
"""


def ringbuf_output_ir() -> str:
    """``@bpf_fast_rb_output(desc, data, size, flags, rt, pc, checked)``: bpf_ringbuf_output --
    reserve + copy + commit in one step, as RingBufMap.output does.  Defers to Python
    (UPDATE_FALLBACK) while Python is inside the ring, while reserved records are
    outstanding, when a consumer wakeup is due, and (checked mode) for records over 255 bytes."""
    FALLBACK, EINVAL, EAGAIN = UPDATE_FALLBACK, C.EINVAL, C.EAGAIN
    return f"""
define internal i64 @bpf_fast_rb_output(i64 %d, i64 %data, i64 %size, i64 %flags, ptr %rt,
                                        i64 %pc, i1 %chk) {{
entry:
  %dp = inttoptr i64 %d to ptr
  %badfl = and i64 %flags, {~(C.BPF_RB_NO_WAKEUP | C.BPF_RB_FORCE_WAKEUP)}
  %bad = icmp ne i64 %badfl, 0
  br i1 %bad, label %einval, label %f0
einval:
  ret i64 -{EINVAL}
fallback:
  ret i64 {FALLBACK}
f0:
  %flp = getelementptr i64, ptr %dp, i64 {D.D_RB_FLAGS}
  %fl = load i64, ptr %flp
  %busy = and i64 %fl, {D.RB_BUSY}
  %isbusy = icmp ne i64 %busy, 0
  br i1 %isbusy, label %fallback, label %f1
f1:
  %nonempty = icmp ne i64 %size, 0
  %chkit = and i1 %chk, %nonempty
  br i1 %chkit, label %check, label %go
check:
  %big = icmp ugt i64 %size, {D.MAX_NATIVE_KEY}
  br i1 %big, label %fallback, label %check1
check1:
  %ok = call i1 @bpf_chk(ptr %rt, i64 %data, i64 %size, i64 %pc)
  br i1 %ok, label %go, label %fault
fault:
  ret i64 0
go:
  %prodp = getelementptr i64, ptr %dp, i64 {D.D_RB_PROD}
  %prod = load i64, ptr %prodp
  %consp = getelementptr i64, ptr %dp, i64 {D.D_RB_CONS}
  %cons = load i64, ptr %consp
  %pendp = getelementptr i64, ptr %dp, i64 {D.D_RB_PEND}
  %pend = load i64, ptr %pendp
  %outstanding = icmp ult i64 %pend, %prod
  br i1 %outstanding, label %fallback, label %g1
g1:
  %maskp = getelementptr i64, ptr %dp, i64 {D.D_LIMIT}
  %mask = load i64, ptr %maskp
  %ringsz = add i64 %mask, 1
  %l15 = add i64 %size, 15
  %len = and i64 %l15, -8
  %newprod = add i64 %prod, %len
  %ahead = sub i64 %newprod, %cons
  %full1 = icmp ugt i64 %ahead, %mask
  %full2 = icmp ugt i64 %len, %ringsz
  %full = or i1 %full1, %full2
  br i1 %full, label %drop, label %g2
drop:
  %dropp = getelementptr i64, ptr %dp, i64 {D.D_RB_DROPPED}
  %dropped = load i64, ptr %dropp
  %dropped1 = add i64 %dropped, 1
  store i64 %dropped1, ptr %dropp
  ret i64 -{EAGAIN}
g2:
  %off = and i64 %prod, %mask
  %wk = and i64 %fl, {D.RB_WAKEUP}
  %waits = icmp ne i64 %wk, 0
  br i1 %waits, label %wake1, label %write
wake1:
  %force = and i64 %flags, {C.BPF_RB_FORCE_WAKEUP}
  %isforce = icmp ne i64 %force, 0
  br i1 %isforce, label %fallback, label %wake2
wake2:
  %coff = and i64 %cons, %mask
  %atcons = icmp eq i64 %coff, %off
  %nowake = and i64 %flags, {C.BPF_RB_NO_WAKEUP}
  %allowed = icmp eq i64 %nowake, 0
  %due = and i1 %atcons, %allowed
  br i1 %due, label %fallback, label %write
write:
  %basep = getelementptr i64, ptr %dp, i64 {D.D_VALUES}
  %base = load i64, ptr %basep
  %hdr = add i64 %base, %off
  %start = add i64 %hdr, {C.BPF_RINGBUF_HDR_SZ}
  call void @bpf_fast_copy(i64 %start, i64 %data, i64 %size)
  %endoff0 = add i64 %off, {C.BPF_RINGBUF_HDR_SZ}
  %endoff = add i64 %endoff0, %size
  %wraps = icmp ugt i64 %endoff, %ringsz
  br i1 %wraps, label %wrap, label %commit
wrap:
  %tail = sub i64 %endoff, %ringsz
  %from = add i64 %base, %ringsz
  call void @bpf_fast_copy(i64 %base, i64 %from, i64 %tail)
  br label %commit
commit:
  %hp = inttoptr i64 %hdr to ptr
  %sz32 = trunc i64 %size to i32
  store i32 %sz32, ptr %hp
  %pg = lshr i64 %off, 12
  %pg2 = add i64 %pg, 2
  %pg32 = trunc i64 %pg2 to i32
  %hp2 = getelementptr i8, ptr %hp, i64 4
  store i32 %pg32, ptr %hp2
  store i64 %newprod, ptr %prodp
  store i64 %newprod, ptr %pendp
  ret i64 0
}}
"""


#: the pieces of the module-level fast-path IR, in the order they are emitted
IR_PIECES = (clock_ir, prandom_ir, key_hash_ir, key_equal_ir, find_ir, slot_addr_ir, lookup_ir,
             update_ir, copy_ir, ringbuf_output_ir)


def fast_functions() -> str:
    """Module-level IR: native map find/lookup/update, ringbuf output and the clock / prandom
    helpers (every piece of IR_PIECES)."""
    return "".join(piece() for piece in IR_PIECES)



def _s64(value: int) -> int:
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >> 63 else value
