"""Detach restores what a return probe changed, written to kill mutants that survived
``benchmarks/mutation_score.py`` (named in each test's docstring: ``path#index`` from the
earlier hand-written mutator, ``path:operator#occurrence`` from cosmic-ray)."""

from __future__ import annotations

import subprocess

import pytest
from test_probe_support import build_c, func_offset

from ubpf_py.probe import ptrace as P
from ubpf_py.probe.engine import ProbeSession

pytestmark = pytest.mark.ptrace

SRC = r"""
#include <stdio.h>
#include <unistd.h>
/* a USDT-style semaphore: a u16 in an allocated, written section with file contents */
__attribute__((section(".probes"), used)) unsigned short probe_sema;
__attribute__((noinline)) int slow(int x)
{
    char c;
    if (read(0, &c, 1) != 1)    /* blocks inside the probed function until the test writes */
        return -1;
    return x + 1;
}
/* read(0, buf, 1) through a syscall instruction of our own, at a symbol to probe; the two bytes
   before it (inc %eax: -1 -> 0 = read) turn a restart two bytes too early into write (1) */
__attribute__((noinline)) long rawread(char *buf)
{
    long ret;
    __asm__ volatile("inc %%eax\n.globl sysinsn\nsysinsn: syscall"
             : "=a"(ret) : "a"(-1L), "D"(0L), "S"(buf), "d"(1L) : "rcx", "r11", "memory");
    return ret;
}
int main(int argc, char **argv)
{
    char c = 0;
    printf("ready\n");
    fflush(stdout);
    if (read(0, &c, 1) != 1)
        return 2;
    if (argc > 1) {
        long n = rawread(&c);
        printf("n=%ld c=%c\n", n, c);
    } else {
        printf("r=%d\n", slow(41));
    }
    return 0;
}
"""


@pytest.fixture(scope="module")
def blocker(tmp_path_factory):
    d = tmp_path_factory.mktemp("blocker")
    (d / "blocker.c").write_text(SRC)
    return build_c(d / "blocker.c", d / "blocker")


def _detach_then_finish(s, proc, hits: list, want_hits: list, resume: bytes, want_out: bytes) -> None:
    """Release the target into its probed code ("g"), detach after 0.5 s with it still there, then
    let it finish (``resume``): the hits seen, no tracer left, and its exit and output intact."""
    proc.stdin.write(b"g")
    proc.stdin.flush()
    assert s.run(duration=0.5) is None            # detached with the thread still inside
    assert hits == want_hits
    assert P.tracer_pid(proc.pid) == 0
    proc.stdin.write(resume)
    proc.stdin.flush()
    out, _ = proc.communicate(timeout=20)
    assert (proc.returncode, out) == (0, want_out)


@pytest.mark.parametrize("native", [False, True])
def test_detach_inside_a_return_probed_function(blocker, native):
    """Detached while the thread sits inside a function whose return address the return
    probe replaced: the function must return to its caller, not to the unmapped trampoline
    (restore.py#51: the saved slot compared with 9 bytes, so it was never put back)."""
    proc = subprocess.Popen([str(blocker)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == b"ready\n"
        s = ProbeSession.attach(proc.pid, native=native)
        hits = []
        off = func_offset(blocker, "slow")
        s.add_probe(str(blocker), off, lambda h: hits.append("entry"))
        s.add_probe(str(blocker), off, lambda h: hits.append("return"), is_return=True)
        _detach_then_finish(s, proc, hits, ["entry"], b"r", b"r=42\n")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("native", [False, True])
def test_detach_while_a_probed_syscall_blocks(blocker, native):
    """A probe on a syscall instruction that then blocks: at detach the thread is stopped in
    the copy of the instruction the engine runs out of line, and must be moved back to the
    original address (restore.py#55: the offset inside the copy added the wrong way;
    restore.py:AddNot#27: moved to the start of the instruction, so the kernel's restart of the
    interrupted read went two bytes before it)."""
    proc = subprocess.Popen([str(blocker), "raw"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == b"ready\n"
        s = ProbeSession.attach(proc.pid, native=native)
        hits = []
        s.add_probe(str(blocker), func_offset(blocker, "sysinsn"), lambda h: hits.append(1))
        _detach_then_finish(s, proc, hits, [1], b"x", b"n=1 c=x\n")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("native", [False, True])
def test_detach_in_an_out_of_line_copy_inside_a_return_probed_function(blocker, native):
    """The thread blocks in the out-of-line copy of a probed syscall inside a function whose
    return the engine also probes: at detach the thread is moved back to the original code and
    the function's return address restored, so it returns to its caller
    (restore.py:ReplaceAndWithOr#17: a thread away from the trampoline lost a return entry)."""
    proc = subprocess.Popen([str(blocker), "raw"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == b"ready\n"
        s = ProbeSession.attach(proc.pid, native=native)
        hits = []
        s.add_probe(str(blocker), func_offset(blocker, "rawread"), lambda h: hits.append("ret"), is_return=True)
        s.add_probe(str(blocker), func_offset(blocker, "sysinsn"), lambda h: hits.append("sys"))
        _detach_then_finish(s, proc, hits, ["sys"], b"x", b"n=1 c=x\n")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _u16_at_file_offset(pid: int, path, off: int) -> int:
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            parts = line.split()
            if len(parts) >= 6 and parts[5] == str(path):
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                foff = int(parts[2], 16)
                if foff <= off < foff + hi - lo:
                    with open(f"/proc/{pid}/mem", "rb") as mem:
                        mem.seek(lo + off - foff)
                        return int.from_bytes(mem.read(2), "little")
    raise KeyError(f"offset {off:#x} of {path} not mapped in {pid}")


def test_detach_releases_usdt_semaphores(blocker):
    """A probe with a semaphore (ref_ctr_offset) counts it up while armed and back down on
    detach, as the kernel's uprobe unregister does (restore.py#59: counted up again)."""
    proc = subprocess.Popen([str(blocker)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == b"ready\n"
        sema = func_offset(blocker, "probe_sema")
        assert _u16_at_file_offset(proc.pid, blocker, sema) == 0
        s = ProbeSession.attach(proc.pid)
        s.add_probe(str(blocker), func_offset(blocker, "slow"), lambda h: None, ref_ctr_offset=sema)
        assert _u16_at_file_offset(proc.pid, blocker, sema) == 1
        assert s.run(duration=0.2) is None
        assert P.tracer_pid(proc.pid) == 0
        assert _u16_at_file_offset(proc.pid, blocker, sema) == 0
        proc.stdin.write(b"gr")
        proc.stdin.flush()
        out, _ = proc.communicate(timeout=20)
        assert (proc.returncode, out) == (0, b"r=42\n")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
