"""Shared set-up for the in-target runtime tests: the runtime linked into the test
process and fake hit frames (runtime header, probe block, thread block, pt_regs) in an
arena, laid out by ubpf_py.abi as the trampolines will lay them out."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from dataclasses import dataclass

import pytest

from ubpf_py.abi.kernel import PT_REGS
from ubpf_py.abi.runtime import HIT_FRAME, PROBE_BLOCK, RT_F_RDPID, RUNTIME_HEADER, THREAD_BLOCK
from ubpf_py.intarget import runtime_obj
from ubpf_py.intarget.arena import SharedArena
from ubpf_py.intarget.vdso import vdso_symbols

needs_runtime = pytest.mark.skipif(runtime_obj.unavailable_reason() is not None,
                                   reason=f"in-target runtime unavailable: {runtime_obj.unavailable_reason()}")


def cpu_has(flag: str) -> bool:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return flag in line.split()
    return False


@dataclass
class Frame:
    """A hit frame and the blocks it points at, all in the arena."""

    arena: SharedArena
    addr: int
    header: memoryview
    probe: memoryview
    thread: memoryview
    regs: memoryview
    probe_addr: int
    thread_addr: int
    regs_addr: int

    def set_header(self, name: str, value: int) -> None:
        self.header[RUNTIME_HEADER.word(name)] = value

    def set_probe(self, name: str, value: int) -> None:
        self.probe[PROBE_BLOCK.word(name)] = value

    def set_reg(self, name: str, value: int) -> None:
        self.regs[PT_REGS.word(name)] = value


def make_frame(arena: SharedArena, vdso: bool = True, rdpid: bool = True) -> Frame:
    hdr = arena.header.view.cast("Q")
    vd = vdso_symbols() if vdso else {}
    hdr[RUNTIME_HEADER.word("vdso_clock_gettime")] = vd.get("__vdso_clock_gettime", 0)
    hdr[RUNTIME_HEADER.word("flags")] = RT_F_RDPID if rdpid and cpu_has("rdpid") else 0
    pb = arena.alloc(PROBE_BLOCK.size, 64)
    tb = arena.alloc(THREAD_BLOCK.size, 64)
    regs = arena.alloc(PT_REGS.size, 64)
    hf = arena.alloc(HIT_FRAME.size, 64)
    w = hf.view.cast("Q")
    w[HIT_FRAME.word("ctx")] = regs.addr
    w[HIT_FRAME.word("probe")] = pb.addr
    w[HIT_FRAME.word("thread")] = tb.addr
    w[HIT_FRAME.word("runtime")] = arena.addr
    return Frame(arena, hf.addr, hdr, pb.view.cast("Q"), tb.view.cast("Q"), regs.view.cast("Q"),
                 pb.addr, tb.addr, regs.addr)


DRIVER_C = r"""
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
typedef uint64_t (*helper_t)(uint64_t, uint64_t, uint64_t, uint64_t, uint64_t, void *);

/* ns per call of one helper with fixed arguments */
double bench(helper_t f, uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5, void *hf, long n)
{
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++)
        f(r1, r2, r3, r4, r5, hf);
    clock_gettime(CLOCK_MONOTONIC, &b);
    return ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / n;
}

struct job {
    helper_t upd, del, lookup, reserve, submit, output;
    uint64_t map, ring; void *hf; uint64_t id, iters, keys;
    uint64_t errors, dropped, sent;
};

/* per thread: insert, look up, delete its own keys; update a shared counter key
 * under the map lock's protection of inserts; reserve/submit or output records
 * carrying (id, i) */
static void *worker(void *p)
{
    struct job *j = p;
    for (uint64_t i = 0; i < j->iters; i++) {
        uint64_t key = j->id << 32 | (i % j->keys), val[2] = {j->id, i};
        if (j->upd(j->map, (uint64_t)&key, (uint64_t)val, 0, 0, j->hf))
            j->errors++;
        uint64_t *v = (uint64_t *)j->lookup(j->map, (uint64_t)&key, 0, 0, 0, j->hf);
        if (!v || v[0] != j->id)
            j->errors++;
        if ((i & 1) && j->del(j->map, (uint64_t)&key, 0, 0, 0, j->hf))
            j->errors++;
        if (i & 2) {
            uint64_t *r = (uint64_t *)j->reserve(j->ring, 24, 0, 0, 0, j->hf);
            if (!r) { j->dropped++; continue; }
            r[0] = j->id; r[1] = i; r[2] = j->id ^ i;
            j->submit((uint64_t)r, 0, 0, 0, 0, j->hf);
        } else {
            uint64_t rec[3] = {j->id, i, j->id ^ i};
            if (j->output(j->ring, (uint64_t)rec, 24, 0, 0, j->hf)) { j->dropped++; continue; }
        }
        j->sent++;
    }
    return 0;
}

/* LRU churn: every thread updates keys shared by all threads (evictions race with
 * inserts and deletes of the others); an LRU update must never fail */
static void *churner(void *p)
{
    struct job *j = p;
    uint64_t x = j->id * 0x9e3779b97f4a7c15ull;
    for (uint64_t i = 0; i < j->iters; i++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        uint64_t key = x % j->keys, val[2] = {key, i};
        long rc;
        if (x & 0x100) {
            rc = (long)j->del(j->map, (uint64_t)&key, 0, 0, 0, j->hf);
            if (rc && rc != -2) {
                j->errors++;
                j->ring = (uint64_t)rc;
            }
        } else if ((rc = (long)j->upd(j->map, (uint64_t)&key, (uint64_t)val, 0, 0, j->hf))) {
            j->errors++;
            j->ring = (uint64_t)rc;
        } else {
            /* the slot may be evicted and reused by another key right after the lookup
             * (preallocated elements, as in the kernel): counted, not an error */
            uint64_t *v = (uint64_t *)j->lookup(j->map, (uint64_t)&key, 0, 0, 0, j->hf);
            if (v && v[0] != key)
                j->dropped++;
        }
        j->sent++;
    }
    return 0;
}

static int spawn(struct job *jobs, int n, void *(*fn)(void *))
{
    pthread_t t[64];
    for (int i = 0; i < n; i++)
        if (pthread_create(&t[i], 0, fn, &jobs[i]))
            return -1;
    for (int i = 0; i < n; i++)
        pthread_join(t[i], 0);
    return 0;
}

int run(struct job *jobs, int n) { return spawn(jobs, n, worker); }
int churn(struct job *jobs, int n) { return spawn(jobs, n, churner); }
"""


class Job(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in ("upd", "dele", "lookup", "reserve", "submit", "output",
                                                 "map", "ring", "hf", "id", "iters", "keys", "errors",
                                                 "dropped", "sent")]


def driver(tmp_path_factory) -> ctypes.CDLL | None:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    d = tmp_path_factory.mktemp("drv")
    src, so = d / "drv.c", d / "drv.so"
    src.write_text(DRIVER_C)
    subprocess.run([cc, "-O2", "-shared", "-fPIC", "-pthread", str(src), "-o", str(so)], check=True)
    lib = ctypes.CDLL(str(so))
    u = ctypes.c_uint64
    lib.bench.restype = ctypes.c_double
    lib.bench.argtypes = [ctypes.c_void_p, u, u, u, u, u, ctypes.c_void_p, ctypes.c_long]
    lib.run.argtypes = [ctypes.POINTER(Job), ctypes.c_int]
    lib.churn.argtypes = [ctypes.POINTER(Job), ctypes.c_int]
    return lib


def tid() -> int:
    return os.gettid() if hasattr(os, "gettid") else ctypes.CDLL(None).syscall(186)
