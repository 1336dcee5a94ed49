"""The in-target linker: gcc and llvmlite objects linked, mapped here and called through ctypes."""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import pytest

from ubpf_py.errors import NotSupportedError
from ubpf_py.intarget.linker import LinkError, link
from ubpf_py.intarget.selfload import load_here

needs_cc = pytest.mark.skipif(shutil.which("gcc") is None, reason="no gcc")

A_C = r"""
extern int b_counter;                    /* another object's global: GOTPCRELX under -fPIC */
extern long b_add(long x, long y);       /* another object's function: PLT32 */
static const long table[4] = {10, 20, 30, 40};          /* .rodata */
static long (*ops[2])(long, long) = {b_add, 0};         /* .data.rel: R_X86_64_64 */
long a_bss[16];                                          /* .bss */
int a_common;                                            /* COMMON with -fcommon */
const char *greeting = "hello";                          /* R_X86_64_64 to .rodata.str */
long a_entry(long i) {
    b_counter += 1;
    a_bss[i & 15] += i;
    a_common += 2;
    return ops[0](table[i & 3], a_bss[i & 15]) + greeting[1];
}
int a_counter(void) { return b_counter * 1000 + a_common; }
"""
B_C = r"""
int b_counter = 5;
__attribute__((aligned(64))) char b_aligned[3] = {1, 2, 3};
long b_add(long x, long y) { return x + y; }
long b_aligned_addr(void) { return (long)b_aligned; }
"""


def _cc(tmp_path, name, src, *flags):
    c = tmp_path / f"{name}.c"
    c.write_text(src)
    o = tmp_path / f"{name}.o"
    subprocess.run(["gcc", "-c", "-O1", *flags, str(c), "-o", str(o)], check=True)
    return name, o.read_bytes()


@needs_cc
def test_gcc_objects_pic(tmp_path):
    objs = [_cc(tmp_path, "a", A_C, "-fPIC", "-fcommon"), _cc(tmp_path, "b", B_C, "-fPIC")]
    img = load_here(objs)
    entry = img.fn("a_entry", ctypes.CFUNCTYPE(ctypes.c_long, ctypes.c_long))
    counter = img.fn("a_counter", ctypes.CFUNCTYPE(ctypes.c_int))
    assert entry(1) == 20 + 1 + ord("e")
    assert entry(17) == 20 + 18 + ord("e")   # a_bss[1] accumulates 1 + 17
    assert entry(2) == 30 + 2 + ord("e")
    assert counter() == 8 * 1000 + 6
    aligned = img.fn("b_aligned_addr", ctypes.CFUNCTYPE(ctypes.c_long))()
    assert aligned % 64 == 0 and ctypes.string_at(aligned, 3) == b"\1\2\3"
    i = img.image
    assert i.exec_range[0] == i.base and i.exec_range[1] <= i.readonly_range[0] <= i.writable_range[0]
    assert i.exec_range[0] <= img.addr("a_entry") < i.exec_range[1]
    assert i.writable_range[0] <= img.addr("b_counter") < i.writable_range[1]


@needs_cc
def test_gcc_objects_absolute_32s_below_2g(tmp_path):
    """Non-PIC code uses R_X86_64_32S/32 absolute addresses: fine when linked below 2 GiB."""
    objs = [_cc(tmp_path, "a", A_C, "-fno-pic", "-mcmodel=small", "-fcommon"),
            _cc(tmp_path, "b", B_C, "-fno-pic")]
    for at in (0x3000_0000, 0x3800_0000, 0x2000_0000):
        try:
            img = load_here(objs, at=at)
            break
        except LinkError:
            continue
    else:
        pytest.skip("no free address below 2 GiB")
    entry = img.fn("a_entry", ctypes.CFUNCTYPE(ctypes.c_long, ctypes.c_long))
    assert entry(3) == 40 + 3 + ord("e")
    with pytest.raises(LinkError, match="overflows"):
        link(objs, 0x7F00_0000_0000)


@needs_cc
def test_errors_name_the_symbol_and_type(tmp_path):
    objs = [_cc(tmp_path, "a", A_C, "-fPIC", "-fcommon")]
    with pytest.raises(LinkError, match=r"undefined symbol 'b_counter' referenced by a"):
        link(objs, 0x10000)
    tls = _cc(tmp_path, "t", "__thread int tv; int get(void) { return tv; }\n", "-fPIC", "-ftls-model=initial-exec")
    with pytest.raises(NotSupportedError, match="thread-local storage"):
        link([tls], 0x10000)
    got_tp = _cc(tmp_path, "g", "extern __thread int tv; int get(void) { return tv; }\n", "-fPIC",
                 "-ftls-model=initial-exec")
    with pytest.raises(NotSupportedError, match="R_X86_64_GOTTPOFF"):
        link([got_tp], 0x10000, {"tv": 0})
    dup = _cc(tmp_path, "d", "int b_counter = 1;\n", "-fPIC")
    b = _cc(tmp_path, "b", B_C, "-fPIC")
    with pytest.raises(LinkError, match="defined twice"):
        link([b, dup], 0x10000)
    with pytest.raises(LinkError, match="not an ELF64 x86-64 relocatable"):
        link([("x", _elf_exec(tmp_path))], 0x10000)


def _elf_exec(tmp_path) -> bytes:
    c = tmp_path / "m.c"
    c.write_text("int main(void) { return 0; }\n")
    subprocess.run(["gcc", str(c), "-o", str(tmp_path / "m")], check=True)
    return (tmp_path / "m").read_bytes()


@needs_cc
def test_llvmlite_object_linked_with_gcc_object(tmp_path):
    import llvmlite.binding as llvm

    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    ir = r"""
    @counter = global i64 7, align 8
    @ro = private unnamed_addr constant [2 x i64] [i64 100, i64 200], align 8
    declare i64 @b_add(i64, i64)
    define i64 @jit_entry(i64 %i) {
      %c = load i64, ptr @counter
      %c2 = add i64 %c, 1
      store i64 %c2, ptr @counter
      %p = getelementptr [2 x i64], ptr @ro, i64 0, i64 %i
      %v = load i64, ptr %p
      %r = call i64 @b_add(i64 %v, i64 %c2)
      ret i64 %r
    }
    """
    mod = llvm.parse_assembly(ir)
    mod.verify()
    tm = llvm.Target.from_default_triple().create_target_machine(reloc="pic", codemodel="small")
    objs = [("jit", tm.emit_object(mod)), _cc(tmp_path, "b", B_C, "-fPIC")]
    img = load_here(objs)
    f = img.fn("jit_entry", ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64))
    assert f(0) == 108
    assert f(1) == 209
    assert ctypes.c_int64.from_address(img.addr("counter")).value == 9


def test_llvmlite_program_linked_with_the_runtime(tmp_path):
    """What the in-target path does: a compiled program whose helper calls are external
    ``ubpf_helper_<id>`` symbols, linked with the runtime object into one image."""
    import llvmlite.binding as llvm
    from intarget_fixture import make_frame

    from ubpf_py.intarget import runtime_obj
    from ubpf_py.intarget.arena import SharedArena
    from ubpf_py.maps import consts as C
    from ubpf_py.maps import create_map
    from ubpf_py.obj.spec import MapSpec

    if runtime_obj.unavailable_reason():
        pytest.skip(runtime_obj.unavailable_reason())
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    ir = r"""
    declare i64 @ubpf_helper_1(i64, i64, i64, i64, i64, ptr)
    declare i64 @ubpf_helper_2(i64, i64, i64, i64, i64, ptr)
    declare i64 @ubpf_helper_5(i64, i64, i64, i64, i64, ptr)
    ; count calls per key in a hash map; return the count
    define i64 @prog(i64 %map, i64 %key, ptr %hf) {
      %t = call i64 @ubpf_helper_5(i64 0, i64 0, i64 0, i64 0, i64 0, ptr %hf)
      %kp = alloca i64
      store i64 %key, ptr %kp
      %kpi = ptrtoint ptr %kp to i64
      %v = call i64 @ubpf_helper_1(i64 %map, i64 %kpi, i64 0, i64 0, i64 0, ptr %hf)
      %miss = icmp eq i64 %v, 0
      br i1 %miss, label %ins, label %inc
    ins:
      %one = alloca i64
      store i64 1, ptr %one
      %onei = ptrtoint ptr %one to i64
      %rc = call i64 @ubpf_helper_2(i64 %map, i64 %kpi, i64 %onei, i64 0, i64 0, ptr %hf)
      ret i64 1
    inc:
      %p = inttoptr i64 %v to ptr
      %old = atomicrmw add ptr %p, i64 1 seq_cst
      %new = add i64 %old, 1
      %pos = icmp ne i64 %t, 0
      %r = select i1 %pos, i64 %new, i64 0
      ret i64 %r
    }
    """
    mod = llvm.parse_assembly(ir)
    tm = llvm.Target.from_default_triple().create_target_machine(reloc="pic", codemodel="small",
                                                                  features="-sse,-sse2,-avx")
    img = load_here([("prog", tm.emit_object(mod)), ("runtime", runtime_obj.object_bytes())])
    arena = SharedArena(8 << 20)
    m = create_map(MapSpec("h", C.HASH, 8, 8, 16), alloc=arena)
    f = make_frame(arena)
    prog = img.fn("prog", ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_void_p))
    assert [prog(m.handle_addr, 7, f.addr) for _ in range(3)] == [1, 2, 3]
    assert prog(m.handle_addr, 8, f.addr) == 1
    assert m.lookup((7).to_bytes(8, "little")) == (3).to_bytes(8, "little")
