"""Detach restores what a return probe changed, written to kill mutants that survived
``benchmarks/mutation_score.py`` (named ``path#index`` in the test's docstring)."""

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
__attribute__((noinline)) int slow(int x)
{
    char c;
    if (read(0, &c, 1) != 1)    /* blocks inside the probed function until the test writes */
        return -1;
    return x + 1;
}
/* read(0, buf, 1) through a syscall instruction of our own, at a symbol to probe */
__attribute__((noinline)) long rawread(char *buf)
{
    long ret;
    __asm__ volatile(".globl sysinsn\nsysinsn: syscall"
             : "=a"(ret) : "a"(0L), "D"(0L), "S"(buf), "d"(1L) : "rcx", "r11", "memory");
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
        proc.stdin.write(b"g")
        proc.stdin.flush()
        assert s.run(duration=0.5) is None            # detached with the thread inside slow()
        assert hits == ["entry"]
        assert P.tracer_pid(proc.pid) == 0
        proc.stdin.write(b"r")
        proc.stdin.flush()
        out, _ = proc.communicate(timeout=20)
        assert (proc.returncode, out) == (0, b"r=42\n")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("native", [False, True])
def test_detach_while_a_probed_syscall_blocks(blocker, native):
    """A probe on a syscall instruction that then blocks: at detach the thread is stopped in
    the copy of the instruction the engine runs out of line, and must be moved back to the
    original address (restore.py#55: the offset inside the copy added the wrong way)."""
    proc = subprocess.Popen([str(blocker), "raw"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == b"ready\n"
        s = ProbeSession.attach(proc.pid, native=native)
        hits = []
        s.add_probe(str(blocker), func_offset(blocker, "sysinsn"), lambda h: hits.append(1))
        proc.stdin.write(b"g")
        proc.stdin.flush()
        assert s.run(duration=0.5) is None
        assert hits == [1]
        assert P.tracer_pid(proc.pid) == 0
        proc.stdin.write(b"x")
        proc.stdin.flush()
        out, _ = proc.communicate(timeout=20)
        assert (proc.returncode, out) == (0, b"n=1 c=x\n")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
