"""Helpers about the current task, time, locks and control flow.

5 ktime_get_ns, 7 get_prandom_u32, 8 get_smp_processor_id, 14 get_current_pid_tgid,
15 get_current_uid_gid, 16 get_current_comm, 93/94 spin_lock/unlock, 109 send_signal,
118 jiffies64, 120 get_ns_current_pid_tgid, 125 ktime_get_boot_ns, 160 ktime_get_coarse_ns,
173 get_func_ip, 174 get_attach_cookie, 181 loop; 35/158 get_current_task[_btf],
17 get_cgroup_classid, 37 current_task_under_cgroup, 80 get_current_cgroup_id,
175 task_pt_regs (``helpers.kernel_task``).

Per-hit facts come from ``env.hit`` (filled by the probe engine).  Clocks are the
kernel's: CLOCK_MONOTONIC, CLOCK_BOOTTIME, CLOCK_MONOTONIC_COARSE; jiffies are
derived from CLOCK_MONOTONIC and CONFIG_HZ (the kernel starts them at
``2^32 - 300 * HZ`` so that wrap bugs show up early).
"""

from __future__ import annotations

import functools
import gzip
import os
import platform
import random
import re
import threading
import time
from pathlib import Path

from ubpf_py.errors import VMFault
from ubpf_py.helpers.context import HelperContext
from ubpf_py.helpers.kernel_task import KernelObjects, cgroup_classid, cgroup_id, cgroup_path
from ubpf_py.isa.opcodes import BPF_MAX_LOOPS
from ubpf_py.vm.env import HelperFn

EPERM = 1
ENOENT = 2
E2BIG = 7
EINVAL = 22
_M64 = 0xFFFFFFFFFFFFFFFF
_CLOCK_MONOTONIC_COARSE = getattr(time, "CLOCK_MONOTONIC_COARSE", 6)
_CLOCK_BOOTTIME = getattr(time, "CLOCK_BOOTTIME", 7)


@functools.cache
def config_hz() -> int:
    """CONFIG_HZ of the running kernel (from /proc/config.gz or /boot/config-*); 250 when
    neither is readable (the most common distribution setting)."""
    def proc_config() -> str:
        with gzip.open("/proc/config.gz", "rt") as f:
            return f.read()

    sources = [proc_config, lambda: Path(f"/boot/config-{platform.release()}").read_text()]
    for src in sources:
        try:
            m = re.search(r"^CONFIG_HZ=(\d+)$", src(), re.M)
        except OSError:
            continue
        if m:
            return int(m.group(1))
    return 250


@functools.cache
def _jiffies_base() -> tuple[int, int]:
    """(jiffies at monotonic time 0, HZ).  Calibrated once against the kernel's own
    counter in /proc/timer_list when readable (jiffies start a little after the
    monotonic clock); otherwise the kernel's INITIAL_JIFFIES, 2^32 - 300 * HZ."""
    hz = config_hz()
    base = (1 << 32) - 300 * hz
    try:
        with open("/proc/timer_list") as f:
            for line in f:
                if line.startswith("jiffies: "):
                    now = time.monotonic_ns()
                    base = int(line.split()[1]) - now * hz // 1_000_000_000
                    break
    except (OSError, ValueError):
        pass
    return base, hz


def jiffies64() -> int:
    base, hz = _jiffies_base()
    return base + time.monotonic_ns() * hz // 1_000_000_000


@functools.lru_cache(maxsize=256)
def _pid_ns_info(tgid: int, tid: int) -> tuple[int, int, int, int] | None:
    """(nsfs dev, pid ns inode, pid in ns, tgid in ns) of a thread, from /proc."""
    try:
        st = os.stat(f"/proc/{tgid}/ns/pid")
        status = Path(f"/proc/{tgid}/task/{tid}/status").read_text()
    except OSError:
        return None
    nspid = re.search(r"^NSpid:\s+(.*)$", status, re.M)
    nstgid = re.search(r"^NStgid:\s+(.*)$", status, re.M)
    if not nspid or not nstgid:
        return None
    return st.st_dev, st.st_ino, int(nspid.group(1).split()[-1]), int(nstgid.group(1).split()[-1])


class _SpinLocks:
    """bpf_spin_lock: a striped table of real locks keyed by the lock word's address (the
    verifier lets a program hold one lock at a time, so stripes cannot deadlock)."""

    def __init__(self, stripes: int = 64) -> None:
        self.locks = [threading.Lock() for _ in range(stripes)]

    def get(self, addr: int) -> threading.Lock:
        return self.locks[(addr >> 2) % len(self.locks)]


def bind(hc: HelperContext, table: dict[int, HelperFn]) -> None:
    env = hc.env
    mem = env.memory
    rng = random.Random()
    locks = _SpinLocks()

    def ktime_get_ns(r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
        return time.monotonic_ns()

    def ktime_get_boot_ns(r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
        return time.clock_gettime_ns(_CLOCK_BOOTTIME)

    def ktime_get_coarse_ns(r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
        return time.clock_gettime_ns(_CLOCK_MONOTONIC_COARSE)

    def get_jiffies64(r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
        return jiffies64()

    def get_prandom_u32(r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
        return rng.getrandbits(32)

    def get_smp_processor_id(r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
        return env.hit.cpu

    def get_current_pid_tgid(r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
        hit = env.hit
        return (hit.tgid << 32) | hit.tid

    def get_current_uid_gid(r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
        hit = env.hit
        return (hit.gid << 32) | hit.uid

    def get_current_comm(r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
        size = r2 & 0xFFFFFFFF
        if not size:
            return 0
        comm = env.hit.comm[:min(size - 1, 15)]
        mem.write(r1, comm + bytes(size - len(comm)))  # strscpy_pad
        return 0

    def get_func_ip(r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
        return env.hit.func_ip

    def get_attach_cookie(r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
        return env.hit.cookie

    def send_signal(r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
        sig = r1 & 0xFFFFFFFF
        if sig > 64:
            return -EINVAL
        fn = env.hit.send_signal
        if fn is None:
            return -EPERM
        return fn(sig)

    def get_ns_current_pid_tgid(r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
        dev, ino, buf, size = r1, r2, r3, r4 & 0xFFFFFFFF
        err = -EINVAL
        if size == 8 and dev <= 0xFFFFFFFF:
            hit = env.hit
            info = _pid_ns_info(hit.tgid, hit.tid) if hit.tgid else None
            if info is None:
                err = -ENOENT
            elif info[0] == dev and info[1] == ino:
                mem.write(buf, info[2].to_bytes(4, "little") + info[3].to_bytes(4, "little"))
                return 0
        if size:
            mem.write(buf, bytes(size))
        return err

    def spin_lock(r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
        mem.check(r1, 4, True)
        locks.get(r1).acquire()
        mem.store(r1, 4, 1)  # the kernel's lock word is non-zero while held
        return 0

    def spin_unlock(r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
        mem.store(r1, 4, 0)
        lock = locks.get(r1)
        if not lock.locked():
            raise VMFault(f"bpf_spin_unlock of 0x{r1:x}, which is not locked")
        lock.release()
        return 0

    def loop(r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
        nr = r1 & 0xFFFFFFFF
        if r4:
            return -EINVAL
        if nr > BPF_MAX_LOOPS:
            return -E2BIG
        call = env.invoke_callback
        if call is None:
            raise VMFault("bpf_loop needs an engine with callback support")
        for i in range(nr):
            if call(r2, i, r3, 0, 0, 0) & _M64:
                return i + 1
        return nr

    def get_current_task(r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
        if hc.kernel_objects is None:
            hc.kernel_objects = KernelObjects(env)
        return hc.kernel_objects.current_task()

    def task_pt_regs(r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
        # the current thread's user registers are the probe's context (the kernel's
        # task_pt_regs(current) in a uprobe); the verifier lets a program pass the current task
        # or, outside sleepable programs, its parent or group leader
        ko = hc.kernel_objects
        if ko is None or not ko.is_current(r1):
            raise VMFault(f"bpf_task_pt_regs: 0x{r1:x} is not the current task; "
                          "not supported: another task's registers")
        return env.hit.ctx_addr

    def get_current_cgroup_id(r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
        hit = env.hit
        return cgroup_id(hit.tgid, hit.tid)

    def get_cgroup_classid(r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
        hit = env.hit
        return cgroup_classid(hit.tgid, hit.tid)

    def current_task_under_cgroup(r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
        m = hc.map(r1)
        under = getattr(m, "under", None)
        if under is None:
            raise VMFault(f"bpf_current_task_under_cgroup: map {m.name} is not a cgroup array")
        hit = env.hit
        return under(r2 & 0xFFFFFFFF, cgroup_path(hit.tgid, hit.tid))

    table.update({
        17: get_cgroup_classid, 35: get_current_task, 37: current_task_under_cgroup, 80: get_current_cgroup_id,
        158: get_current_task, 175: task_pt_regs,
        5: ktime_get_ns, 7: get_prandom_u32, 8: get_smp_processor_id, 14: get_current_pid_tgid,
        15: get_current_uid_gid, 16: get_current_comm, 93: spin_lock, 94: spin_unlock,
        109: send_signal, 118: get_jiffies64, 120: get_ns_current_pid_tgid, 125: ktime_get_boot_ns,
        160: ktime_get_coarse_ns, 173: get_func_ip, 174: get_attach_cookie, 181: loop,
    })
