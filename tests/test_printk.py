"""bpf_trace_printk / bpf_trace_vprintk / bpf_snprintf formatting, against the corpus
expectations and against the running kernel.

Kernel oracle: a BPF_PROG_TYPE_SYSCALL program (run with BPF_PROG_TEST_RUN) calls
bpf_snprintf (or bpf_trace_printk, for its return codes) with a format in a frozen
read-only map and arguments on its stack; strings and IP addresses live in another
map, so ``%s``/``%pI4`` read kernel memory.  We run the same call through our helper
with the same bytes in program memory and compare output and return value.  Formats
the kernel refuses are refused by its verifier (bpf_snprintf checks the format at
load time) or at run time (bpf_trace_printk); either way we must answer -EINVAL.
"""

from __future__ import annotations

import json
import re
import struct

import pytest

from ubpf_py.helpers import build_helper_table
from ubpf_py.helpers import printk_format as pf
from ubpf_py.isa import opcodes as op
from ubpf_py.isa.instruction import Instruction
from ubpf_py.vm.env import ExecEnv, HitContext
from ubpf_py.vm.memory import HostBuffer, MemoryMap, Region

EINVAL = 22
HASH_RE = re.compile(rb"00000000[0-9a-f]{8}")

# the string memory shared by both sides: offset -> bytes
STRINGS = {0: b"corpus\0", 16: b"a longer string with spaces\0", 64: bytes([10, 1, 2, 3]),
           80: bytes.fromhex("fe800000000000000202b3fffe1e8329"), 128: b"x" * 300 + b"\0",
           448: b"y" * 300 + b"\0", 768: b"tab\there\0"}
STRMEM_SIZE = 1024


def S(off: int) -> tuple[str, int]:
    """An argument that is a pointer into the string memory."""
    return ("ptr", off)


# (format, args[, str_size]) -- all valid for the kernel's bpf_bprintf_prepare
VALID = [
    (b"plain text", []),
    (b"100%% sure %d", [5]),
    (b"%d %i %u %x %X", [-42, -42, -42, 0xDEADBEEF, 0xDEADBEEF]),
    (b"%d|%u|%x", [0x1_0000_0007, 2 ** 63, -1]),
    (b"%ld %lu %lx %lX", [-1234567890123, -1, -1, 0xABCDEF0123]),
    (b"%lld %llu %llx", [-(2 ** 63), 2 ** 64 - 1, 2 ** 40]),
    (b"%5d|%-5d|%05d|%+d|% d|%+u|% x", [1, 2, 3, 4, 5, 6, 7]),
    (b"%-05d|%08x|%-8x|%+5d|%0+5d|%+-6d|", [-3, 0xBEEF, 0xBEEF, 9, -9, 9]),
    (b"%12lld|%-20llu|%020lx", [-7, 7, 0xFF]),
    (b"%c%c%c|%5c|%-3c|", [ord("a"), ord("b"), ord("c") + 256, ord("d"), ord("e")]),
    (b"s=%s t=%s", [S(0), S(16)]),
    (b"%10s|%-10s|%3s|", [S(0), S(0), S(16)]),
    (b"%s %s", [S(128), S(448)]),                    # the 512-byte argument buffer truncates
    (b"%s %s %s", [S(128), S(448), S(0)]),          # ... and runs out: -ENOSPC at run time
    # 505 bytes of strings, then a pointer aligned to 508 leaves 4 of the 8 it needs: -ENOSPC
    # (the alignment before a pointer argument; a mutation-testing survivor)
    (b"%s%s%px", [S(128), S(545), 0x1234]),
    (b"%s%s%px", [S(128), S(549), 0x1234]),           # 501 bytes: 504 + 8 fits exactly
    # %pB takes its text and a NUL: 497 + 7 = 504, the pointer fits; one byte more and it does not
    (b"%s%s%pB%px", [S(128), S(553), 0x1234, 0x1234]),
    (b"caf\xc3\xa9 %d \xe9", [1]),                     # bytes >= 0x80 pass
    (b"%s", [S(768)]),
    (b"null %s!", [0]),
    (b"%pks|%pus|", [S(0), S(0)]),
    (b"%px %px %20px|%-20px|", [0x1234, -1, 0xABC, 0xABC]),
    (b"%p %p %p", [0, -1, -4095]),
    (b"%pS %ps %pB", [0x1234, 0x1234, 0x1234]),
    (b"%pI4 %pi4 %pI4", [S(64), S(64), 0x1234]),
    (b"%pI6 %pi6", [S(80), S(80)]),
    (b"%pI6c", [S(80)]),
    (b"%p.%p,%p", [0, -1, 0]),
    (b"a %d b %d c %d d %d e %d f %d g %d h %d i %d j %d k %d l %d", list(range(1, 13))),
    (b"small %s", [S(16)], 8),
    (b"zero %d", [1], 0),
    (b"%d", [12345], 3),
]
HASHED = [(b"%p %pK", [0x7FFF12345678, 0xFFFF888812345678])]
INVALID = [
    (b"%#x", [1]), (b"%.3d", [1]), (b"%hd", [1]), (b"%hhd", [1]), (b"%zd", [1]), (b"%o", [1]),
    (b"%e", [1]), (b"%n", [1]), (b"%Lu", [1]), (b"%lllu", [1]), (b"%lc", [1]), (b"%ls", [S(0)]),
    (b"%pV", [1]), (b"%pa", [1]), (b"%sa", [S(0)]), (b"%s9", [S(0)]), (b"%pk", [1]),
    (b"%pI5", [S(64)]), (b"%d %d", [1]), (b"trailing %", [1]), (b"%5%", [1]), (b"\x01%d", [1]),
    (b"%*d", [1, 2]),
]


# ---- our side ------------------------------------------------------------------------------------
class Ours:
    def __init__(self) -> None:
        self.env = ExecEnv(MemoryMap(), HitContext())
        self.strmem = HostBuffer(STRMEM_SIZE)
        for off, data in STRINGS.items():
            self.strmem.view[off:off + len(data)] = data
        self.work = HostBuffer(2048)
        self.env.memory.add(Region.of(self.strmem, "strings"))
        self.env.memory.add(Region.of(self.work, "work"))
        self.lines: list[str] = []
        self.env.printk = lambda hit, text: self.lines.append(text)
        self.helpers = build_helper_table(self.env)

    def arg(self, a) -> int:
        if isinstance(a, tuple):
            return self.strmem.addr + a[1]
        return a & 0xFFFFFFFFFFFFFFFF

    def snprintf(self, fmt: bytes, args: list, str_size: int = 600) -> tuple[int, bytes]:
        w = self.work
        w.view[0:len(fmt) + 1] = fmt + b"\0"
        raw = struct.pack(f"<{len(args)}Q", *(self.arg(a) for a in args))
        w.view[512:512 + len(raw)] = raw
        w.view[1024:1024 + 700] = bytes(700)
        ret = self.helpers[165](w.addr + 1024, str_size, w.addr, w.addr + 512 if args else 0, len(raw))
        return ret, bytes(w.view[1024:1024 + str_size])

    def trace_printk(self, fmt: bytes, args: list) -> int:
        w = self.work
        w.view[0:len(fmt) + 1] = fmt + b"\0"
        a = [self.arg(x) for x in args] + [0] * (3 - len(args))
        return self.helpers[6](w.addr, len(fmt) + 1, *a[:3])


def test_format_engine_basics():
    """Direct checks of rules that need no kernel (kept small; the kernel table is below)."""
    def rs(a, k, n):
        return b"corpus" if a == 1 else None

    assert pf.bprintf(b"%d %d %d %d", [1, 2, 3, 4], 3, rs, lambda a, n: None).error == -EINVAL
    assert pf.bprintf(b"%s", [1], 1, rs, lambda a, n: None).output == b"corpus"
    r = pf.format_fixed(b"no nul", [], 3, rs, lambda a, n: None)
    assert r.error == -EINVAL
    ret, text = pf.printk_message(b"a" * 2000)
    assert ret == 2000 and len(text) == 1023
    assert pf.printk_message(b"ab\0cd") == (5, "ab")


# ---- the corpus case ---------------------------------------------------------------------------------
class _User:
    BASE = 0x7FFF_0000_0000

    def read(self, addr, size):
        return None

    def read_str(self, addr, max_size):
        return b"corpus"[:max_size - 1] if addr == self.BASE else None

    def write(self, addr, data):
        return False


@pytest.mark.parametrize("engine", ["interp", "jit"])
def test_corpus_printk_formats(corpus_build, engine):
    from paths import CORPUS

    from ubpf_py.live.collection import Collection
    from ubpf_py.obj.elf import load_object

    case = next(c for c in json.loads((CORPUS / "manifest.json").read_text())["cases"]
                if c["name"] == "printk_formats")
    spec = load_object(corpus_build / case["bpf"])
    if engine == "jit":
        pytest.importorskip("ubpf_py.vm.jit")
    coll = Collection.load(spec, engine=engine, verifier="off")
    prog = coll.program("fmt_entry")
    lines: list[str] = []
    env = prog.env
    env.printk = lambda hit, text: lines.append(text)
    env.hit.user_memory = _User()
    # fmt_probe(int i, unsigned u, long l, const char *s, int c): rdi rsi rdx rcx r8
    regs = [0] * 21
    regs[14], regs[13], regs[12] = -42 & (2 ** 64 - 1), 3000000000, -1234567890123 & (2 ** 64 - 1)
    regs[11], regs[9] = _User.BASE, ord("Z")
    coll.ctx_buffer.view[0:168] = struct.pack("<21Q", *regs)
    assert prog.run(coll.ctx_buffer.addr) == 0
    expected = case["expect"]["printk"]
    assert len(lines) == len(expected)
    for got, want in zip(lines, expected, strict=True):
        if isinstance(want, dict):
            assert re.fullmatch(want["re"], got), (got, want)
        else:
            assert got == want


# ---- kernel oracle -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def kernel():
    from ubpf_py.kernel.syscall import kernel_bpf_skip_reason
    reason = kernel_bpf_skip_reason()
    if reason:
        pytest.skip(reason)
    return KernelPrintf()


def _lddw(dst: int, value: int, src: int = 0, imm_hi: int | None = None) -> list[Instruction]:
    lo = value & 0xFFFFFFFF
    hi = (value >> 32) & 0xFFFFFFFF if imm_hi is None else imm_hi
    s32 = lambda v: v - (1 << 32) if v & 0x80000000 else v  # noqa: E731
    return [Instruction(op.LDDW, dst, src, 0, s32(lo), s32(hi)), Instruction(0, 0, 0, 0, s32(hi))]


def _mov(dst: int, imm: int) -> Instruction:
    return Instruction(op.BPF_ALU64 | op.BPF_MOV | op.BPF_K, dst, 0, 0, imm)


class KernelPrintf:
    """Runs bpf_snprintf / bpf_trace_printk in the kernel through SYSCALL programs."""

    def __init__(self) -> None:
        from ubpf_py.kernel.maps import KernelMap
        self.strs = KernelMap.create(2, 4, STRMEM_SIZE, 1, name="strs")
        blob = bytearray(STRMEM_SIZE)
        for off, data in STRINGS.items():
            blob[off:off + len(data)] = data
        assert self.strs.update(struct.pack("<I", 0), bytes(blob), 0) == 0
        self.out = KernelMap.create(2, 4, 8 + 704, 1, name="out")

    def _arg_insns(self, args: list) -> list[Instruction]:
        insns: list[Instruction] = []
        n = len(args)
        for k, a in enumerate(args):
            if isinstance(a, tuple):
                insns += _lddw(1, self.strs.fd, op.BPF_PSEUDO_MAP_VALUE, imm_hi=a[1])
            else:
                insns += _lddw(1, a & 0xFFFFFFFFFFFFFFFF)
            insns.append(Instruction(op.BPF_STX | op.BPF_MEM | op.BPF_DW, 10, 1, -8 * (n - k), 0))
        return insns

    def _run(self, insns: list[Instruction]) -> tuple[int, bytes]:
        from ubpf_py.kernel.prog import BPF_F_SLEEPABLE, SYSCALL, prog_load, prog_test_run
        insns = insns + _lddw(1, self.out.fd, op.BPF_PSEUDO_MAP_VALUE, imm_hi=0) + [
            Instruction(op.BPF_STX | op.BPF_MEM | op.BPF_DW, 1, 0, 0, 0), _mov(0, 0),
            Instruction(op.BPF_JMP | op.BPF_EXIT)]
        self.out.update(struct.pack("<I", 0), bytes(8 + 704), 0)
        fd = prog_load(insns, SYSCALL, prog_flags=BPF_F_SLEEPABLE, prog_name="printf_oracle")
        try:
            prog_test_run(fd, repeat=0)  # SYSCALL programs take no repeat count
        finally:
            import os
            os.close(fd)
        raw = self.out.lookup(struct.pack("<I", 0))
        ret = struct.unpack_from("<q", raw)[0]
        return ret, raw[8:]

    def snprintf(self, fmt: bytes, args: list, str_size: int = 600) -> tuple[int, bytes]:
        """(return value, output buffer) or (-errno, b"") when the verifier refuses the format."""
        from ubpf_py.errors import KernelBackendError
        from ubpf_py.kernel.maps import KernelMap
        fmap = KernelMap.create(2, 4, 256, 1, flags=1 << 7, name="fmt")  # BPF_F_RDONLY_PROG
        try:
            fmap.update(struct.pack("<I", 0), fmt + bytes(256 - len(fmt)), 0)
            assert fmap.freeze() == 0
            n = len(args)
            insns = self._arg_insns(args)
            insns += _lddw(1, self.out.fd, op.BPF_PSEUDO_MAP_VALUE, imm_hi=8)
            insns += [_mov(2, str_size)]
            insns += _lddw(3, fmap.fd, op.BPF_PSEUDO_MAP_VALUE, imm_hi=0)
            if n:
                insns += [Instruction(op.BPF_ALU64 | op.BPF_MOV | op.BPF_X, 4, 10),
                          Instruction(op.BPF_ALU64 | op.BPF_ADD | op.BPF_K, 4, 0, 0, -8 * n)]
            else:
                insns += [_mov(4, 0)]
            insns += [_mov(5, 8 * n), Instruction(op.BPF_JMP | op.BPF_CALL, 0, 0, 0, 165)]
            try:
                ret, out = self._run(insns)
            except KernelBackendError as exc:
                return -exc.errno, b""
            return ret, out[:str_size]
        finally:
            fmap.close()

    def trace_printk(self, fmt: bytes, args: list) -> int:
        """bpf_trace_printk's return value for ``fmt`` on the program stack."""
        data = fmt + b"\0"
        data += bytes(-len(data) % 8)
        insns = self._arg_insns([])
        base = -8 * 16 - len(data)
        for i in range(0, len(data), 8):
            insns += _lddw(1, int.from_bytes(data[i:i + 8], "little"))
            insns.append(Instruction(op.BPF_STX | op.BPF_MEM | op.BPF_DW, 10, 1, base + i, 0))
        regs = [3, 4, 5]
        for k, a in enumerate(args[:3]):
            if isinstance(a, tuple):
                insns += _lddw(regs[k], self.strs.fd, op.BPF_PSEUDO_MAP_VALUE, imm_hi=a[1])
            else:
                insns += _lddw(regs[k], a & 0xFFFFFFFFFFFFFFFF)
        for k in range(len(args), 3):
            insns.append(_mov(regs[k], 0))
        insns += [Instruction(op.BPF_ALU64 | op.BPF_MOV | op.BPF_X, 1, 10),
                  Instruction(op.BPF_ALU64 | op.BPF_ADD | op.BPF_K, 1, 0, 0, base),
                  _mov(2, len(fmt) + 1), Instruction(op.BPF_JMP | op.BPF_CALL, 0, 0, 0, 6)]
        return self._run(insns)[0]


def _case(entry):
    fmt, args, *rest = entry
    return fmt, args, (rest[0] if rest else 600)


@pytest.mark.kernel
@pytest.mark.parametrize("entry", VALID, ids=lambda e: e[0].decode("latin-1")[:40])
def test_snprintf_matches_kernel(kernel, entry):
    fmt, args, size = _case(entry)
    k_ret, k_out = kernel.snprintf(fmt, args, size)
    o_ret, o_out = Ours().snprintf(fmt, args, size)
    assert k_ret != -EINVAL, "the kernel refused a format the table says is valid"
    assert (o_ret, o_out) == (k_ret, k_out)


@pytest.mark.kernel
@pytest.mark.parametrize("entry", HASHED, ids=lambda e: e[0].decode())
def test_hashed_pointers_have_the_kernel_shape(kernel, entry):
    fmt, args, size = _case(entry)
    k_ret, k_out = kernel.snprintf(fmt, args, size)
    o_ret, o_out = Ours().snprintf(fmt, args, size)
    assert k_ret == o_ret
    assert HASH_RE.sub(b"#", k_out) == HASH_RE.sub(b"#", o_out)
    assert HASH_RE.search(o_out)


@pytest.mark.kernel
@pytest.mark.parametrize("entry", INVALID, ids=lambda e: e[0].decode("latin-1"))
def test_invalid_formats_refused_like_kernel(kernel, entry):
    fmt, args, size = _case(entry)
    k_ret, _ = kernel.snprintf(fmt, args, size)
    o_ret, _ = Ours().snprintf(fmt, args, size)
    assert k_ret == -EINVAL and o_ret == -EINVAL


TRACE_CASES = [(b"d=%d", [1]), (b"%s!", [S(0)]), (b"%d %d %d", [1, 2, 3]), (b"%d %d %d %d", [1, 2, 3]),
               (b"%#x", [1]), (b"%pI4", [S(64)]), (b"no args", []), (b"%lx %c", [-1, 65])]


@pytest.mark.kernel
@pytest.mark.parametrize("entry", TRACE_CASES, ids=lambda e: e[0].decode())
def test_trace_printk_return_values_match_kernel(kernel, entry):
    fmt, args = entry
    ours = Ours()
    assert ours.trace_printk(fmt, args) == kernel.trace_printk(fmt, args)


def test_vprintk_argument_checks():
    ours = Ours()
    w = ours.work
    w.view[0:4] = b"%d\0\0"
    vp = ours.helpers[177]
    assert vp(w.addr, 3, w.addr + 512, 12, 0) == -EINVAL            # not a multiple of 8
    assert vp(w.addr, 3, w.addr + 512, 13 * 8, 0) == -EINVAL        # more than 12 arguments
    assert vp(w.addr, 3, 0, 8, 0) == -EINVAL                       # length without a pointer
    w.view[512:520] = struct.pack("<q", -5)
    assert vp(w.addr, 3, w.addr + 512, 8, 0) == 2 and ours.lines == ["-5"]
