"""The traced thread as the kernel's ``struct task_struct`` (bpf_get_current_task[_btf])
and its cgroup (bpf_get_current_cgroup_id, bpf_current_task_under_cgroup,
bpf_get_cgroup_classid).

Real tools walk the current task with CO-RE reads: ``BPF_CORE_READ(task,
real_parent, tgid)``, ``task->cred->uid``, ``task->start_time``.  Their offsets
come from the running kernel's BTF (``obj.core`` relocates against
/sys/kernel/btf/vmlinux), so the object handed to the program is laid out by that
same BTF: a zeroed buffer of ``sizeof(struct task_struct)`` in which the fields
that have a userspace source are filled from /proc for the traced thread at the
moment of the call:

=====================  ==================================================
task field             source
=====================  ==================================================
pid, tgid, comm        the hit (``env.hit``: tid, tgid, per-thread comm)
cred, real_cred        -> a ``struct cred``: uid/gid/euid/egid/suid/sgid/
                       fsuid/fsgid from /proc/TGID/task/TID/status
real_parent, parent    -> a task with pid, tgid, comm of the parent process,
                       whose real_parent is its parent's, up to init and the
                       kernel's init_task (pid 0, "swapper/0", its own parent)
group_leader           -> this task (a leader) or the leader, filled like it
start_boottime,        /proc/.../stat field 22 (USER_HZ ticks: 10 ms
start_time             resolution; start_time = boottime - suspend offset)
=====================  ==================================================

Any other byte of these objects is unknown here: ``bpf_probe_read_kernel`` of a
range touching one fails like a fault in the kernel (-EFAULT, destination
zeroed); ``HelperContext.kernel_read`` asks :meth:`KernelObjects.readable`.

Direct loads through ``bpf_get_current_task_btf()``'s pointer (PTR_TO_BTF_ID,
``verifier.btfptr``) read the same buffers.  ``MODEL`` says, per kind of object,
which fields hold a value and where the filled pointers lead; the verifier follows
it along the loads, so that what it cannot give a value is decided before the
program runs: a field without a source reads 0 (the buffer's zero), a pointer
without a source is NULL here, and every load through such a pointer is replaced by
``dst = 0`` -- what the kernel's fault-tolerant BPF_PROBE_MEM load gives when it
faults.  Zero is the only value an engine can give there without a kernel behind
it, and it is the value the program must already cope with (the kernel gives it for
every NULL pointer on the way); the loader names each such field in a one-line
warning, so the zero is never silent.  Filled pointers are always set, so no engine
ever loads through a NULL pointer here.
"""

from __future__ import annotations

import functools
import os
import re
import time

from ubpf_py.vm.env import ExecEnv
from ubpf_py.vm.memory import HostBuffer, Region

_TASK_FIELDS = ("pid", "tgid", "comm", "real_parent", "parent", "group_leader", "cred", "real_cred",
                "start_time", "start_boottime")
_CRED_FIELDS = ("uid", "euid", "suid", "fsuid", "gid", "egid", "sgid", "fsgid")
_CLK_TCK = os.sysconf("SC_CLK_TCK")
#: deepest real_parent chain modelled (then the chain jumps to init_task)
MAX_ANCESTORS = 62

#: kinds of objects (a PTR_TO_BTF_ID register's provenance in the verifier; 0: none, NULL here)
OBJ_NONE, OBJ_TASK, OBJ_PARENT, OBJ_CRED, OBJ_PT_REGS = 0, 1, 2, 3, 4
#: every member of x86-64's struct pt_regs ("" are the anonymous cs and ss unions): the current
#: task's registers (bpf_task_pt_regs) are the probe's context, all of it filled
_PT_REGS_FIELDS = ("r15", "r14", "r13", "r12", "bp", "bx", "r11", "r10", "r9", "r8", "ax", "cx", "dx",
                   "si", "di", "orig_ax", "ip", "flags", "sp", "")
#: kind -> (struct, fields with a value, pointer field -> the kind of object it points to)
MODEL: dict[int, tuple[str, frozenset[str], dict[str, int]]] = {
    OBJ_TASK: ("task_struct", frozenset({"pid", "tgid", "comm", "start_time", "start_boottime"}),
               {"real_parent": OBJ_PARENT, "parent": OBJ_PARENT, "group_leader": OBJ_TASK,
                "cred": OBJ_CRED, "real_cred": OBJ_CRED}),
    OBJ_PARENT: ("task_struct", frozenset({"pid", "tgid", "comm"}),
                 {"real_parent": OBJ_PARENT, "parent": OBJ_PARENT, "group_leader": OBJ_PARENT}),
    OBJ_CRED: ("cred", frozenset(_CRED_FIELDS), {}),
    OBJ_PT_REGS: ("pt_regs", frozenset(_PT_REGS_FIELDS), {}),
}


class KernelObject:
    """One fake kernel object: a read-only buffer and the byte ranges that hold real values."""

    def __init__(self, env: ExecEnv, size: int, name: str) -> None:
        self.buf = HostBuffer(size)
        self.addr = self.buf.addr
        self.size = size
        self.valid: list[tuple[int, int]] = []
        env.memory.add(Region.of(self.buf, name, writable=False))

    def put(self, off: int, data: bytes) -> None:
        self.buf.view[off:off + len(data)] = data
        self.valid.append((off, off + len(data)))

    def clear(self) -> None:
        """Back to all zeros: only ``put`` writes the buffer, so only what it wrote is reset."""
        view = self.buf.view
        for s, e in self.valid:
            view[s:e] = bytes(e - s)
        self.valid.clear()

    def readable(self, addr: int, size: int) -> bool:
        lo, hi = addr - self.addr, addr - self.addr + size
        pos = lo
        for s, e in sorted(self.valid):
            if s <= pos < e:
                pos = e
            if pos >= hi:
                return True
        return pos >= hi


@functools.cache
def _layout() -> dict[str, tuple[int, int]] | None:
    """{"task.FIELD" / "cred.FIELD": (offset, size)} from the running kernel's BTF."""
    from ubpf_py.errors import BTFError
    from ubpf_py.obj.btf import KIND_STRUCT, load_kernel_btf

    btf = load_kernel_btf()
    if btf is None:
        return None
    out: dict[str, tuple[int, int]] = {}
    for struct_name, fields in (("task_struct", _TASK_FIELDS), ("cred", _CRED_FIELDS)):
        tid = btf.find(struct_name, KIND_STRUCT)
        key = "task" if struct_name == "task_struct" else "cred"
        out[f"{key}.__size"] = (0, btf.type(tid).size)
        for f in fields:
            try:
                m, bit = btf.member(tid, f)
            except BTFError:
                continue  # older kernels: real_start_time instead of start_boottime, ...
            out[f"{key}.{f}"] = (bit // 8, btf.size_of(m.type_id))
    return out


def _proc_status(tgid: int, tid: int) -> dict[str, str]:
    try:
        with open(f"/proc/{tgid}/task/{tid}/status") as f:
            text = f.read()
    except OSError:
        return {}
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def _start_ticks(tgid: int, tid: int) -> int | None:
    try:
        with open(f"/proc/{tgid}/task/{tid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2:].split()
    return int(fields[19])  # field 22 of the whole line


class KernelObjects:
    """The current task object graph of one ExecEnv, rebuilt on each helper call."""

    def __init__(self, env: ExecEnv) -> None:
        self.env = env
        self.layout = _layout()
        self.objects: list[KernelObject] = []
        if self.layout is None:
            return
        tsize, csize = self.layout["task.__size"][1], self.layout["cred.__size"][1]
        self.task = self._new(tsize, "kernel task_struct (current)")
        self.leader = self._new(tsize, "kernel task_struct (group leader)")
        self.parent = self._new(tsize, "kernel task_struct (real_parent)")
        self.cred = self._new(csize, "kernel cred (current)")
        self.leader_cred = self._new(csize, "kernel cred (group leader)")
        #: the parent's ancestors, made as deep chains are met; the chain above a parent, by pid
        self.ancestors: list[KernelObject] = []
        self._above: dict[int, list[tuple[int, bytes]]] = {}

    def _new(self, size: int, name: str) -> KernelObject:
        obj = KernelObject(self.env, size, name)
        self.objects.append(obj)
        return obj

    def owner(self, addr: int) -> KernelObject | None:
        for o in self.objects:
            if o.addr <= addr < o.addr + o.size:
                return o
        return None

    def _field(self, obj: KernelObject, name: str, value: int | bytes) -> None:
        loc = self.layout.get(name) if self.layout else None
        if loc is None:
            return
        off, size = loc
        data = value[:size].ljust(size, b"\0") if isinstance(value, bytes) else \
            (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        obj.put(off, data)

    def _fill_task(self, obj: KernelObject, pid: int, tgid: int, comm: bytes) -> None:
        self._field(obj, "task.pid", pid)
        self._field(obj, "task.tgid", tgid)
        self._field(obj, "task.comm", comm[:15])

    def _fill_full(self, obj: KernelObject, cred: KernelObject, tgid: int, tid: int, comm: bytes,
                   leader: KernelObject) -> dict[str, str]:
        """A task of the traced process (OBJ_TASK): ids, comm, creds, start times and its
        pointers, which are always set (``MODEL``: loads through them are never NULL here)."""
        self._fill_task(obj, tid, tgid, comm)
        self._field(obj, "task.group_leader", leader.addr)
        for name in ("real_parent", "parent"):
            self._field(obj, f"task.{name}", self.parent.addr)
        for name in ("cred", "real_cred"):
            self._field(obj, f"task.{name}", cred.addr)
        status = _proc_status(tgid, tid)
        uids, gids = status.get("Uid", "").split(), status.get("Gid", "").split()
        if len(uids) == 4 and len(gids) == 4:
            for name, v in zip(("uid", "euid", "suid", "fsuid"), uids, strict=True):
                self._field(cred, f"cred.{name}", int(v))
            for name, v in zip(("gid", "egid", "sgid", "fsgid"), gids, strict=True):
                self._field(cred, f"cred.{name}", int(v))
        # read per call: a tid can be reused by a later thread, whose start time the kernel reports
        ticks = _start_ticks(tgid, tid)
        if ticks is not None:
            boot_ns = ticks * 1_000_000_000 // _CLK_TCK
            suspended = time.clock_gettime_ns(time.CLOCK_BOOTTIME) - time.monotonic_ns()
            self._field(obj, "task.start_boottime", boot_ns)
            self._field(obj, "task.start_time", max(boot_ns - suspended, 0))
        return status

    def current_task(self) -> int:
        """Rebuild the objects for the thread of this hit; return the task's address."""
        if self.layout is None:
            return 0
        hit = self.env.hit
        for o in self.objects:
            o.clear()
        leader = self.task if hit.tid == hit.tgid else self.leader
        status = self._fill_full(self.task, self.cred, hit.tgid, hit.tid, hit.comm, leader)
        if leader is not self.task:
            self._fill_full(leader, self.leader_cred, hit.tgid, hit.tgid, _comm_of(hit.tgid, hit.tgid), leader)
        ppid = int(status.get("PPid", "0") or 0)   # the same for every thread of the process
        chain = [(ppid, _comm_of(ppid, ppid)), *self._chain_above(ppid)] if ppid else []
        self._fill_ancestors([*chain, (0, b"swapper/0")])
        return self.task.addr

    def is_current(self, addr: int) -> bool:
        """Is ``addr`` the current thread's task object (what a helper taking a task can be given
        for the traced thread itself)?"""
        return self.layout is not None and addr == self.task.addr

    def _chain_above(self, ppid: int) -> list[tuple[int, bytes]]:
        """(pid, comm) of the parent's ancestors up to init.  Read once per parent: they change
        only when one of them exits (the orphan is then re-parented), which the cache misses."""
        above = self._above.get(ppid)
        if above is None:
            above = []
            pid = int(_proc_status(ppid, ppid).get("PPid", "0") or 0)
            while pid > 0 and len(above) < MAX_ANCESTORS:
                above.append((pid, _comm_of(pid, pid)))
                pid = int(_proc_status(pid, pid).get("PPid", "0") or 0)
            self._above[ppid] = above
        return above

    def _fill_ancestors(self, chain: list[tuple[int, bytes]]) -> None:
        """The real_parent chain as task objects (OBJ_PARENT): the first is ``self.parent``, the
        last is the kernel's init_task (pid 0, its own parent), so no pointer in it is NULL."""
        tsize = self.layout["task.__size"][1] if self.layout else 0
        while len(self.ancestors) < len(chain) - 1:
            self.ancestors.append(self._new(tsize, f"kernel task_struct (ancestor {len(self.ancestors) + 2})"))
        objs = [self.parent, *self.ancestors]
        for i, (pid, comm) in enumerate(chain):
            obj, up = objs[i], objs[min(i + 1, len(chain) - 1)]
            self._fill_task(obj, pid, pid, comm)
            self._field(obj, "task.real_parent", up.addr)
            self._field(obj, "task.parent", up.addr)
            self._field(obj, "task.group_leader", obj.addr)


def _comm_of(tgid: int, tid: int) -> bytes:
    try:
        with open(f"/proc/{tgid}/task/{tid}/comm", "rb") as f:
            return f.read().rstrip(b"\n")
    except OSError:
        return b""


# ---------------------------------------------------------------- cgroups

@functools.cache
def cgroup2_root() -> str | None:
    """Where the cgroup v2 hierarchy is mounted (from /proc/self/mountinfo)."""
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                if right.split()[:1] == ["cgroup2"]:
                    return left.split()[4]
    except OSError:
        pass
    return None


def cgroup_path(tgid: int, tid: int) -> str | None:
    """The thread's cgroup v2 directory (``0::/path`` of /proc/TGID/task/TID/cgroup)."""
    root = cgroup2_root()
    try:
        with open(f"/proc/{tgid}/task/{tid}/cgroup") as f:
            text = f.read()
    except OSError:
        return None
    m = re.search(r"^0::(/.*)$", text, re.M)
    if root is None or m is None:
        return None
    return os.path.normpath(root + m.group(1))


def cgroup_id(tgid: int, tid: int) -> int:
    """bpf_get_current_cgroup_id: the kernfs id of the cgroup directory, which on 64-bit
    kernels is the directory's inode number (0 when there is no cgroup v2 hierarchy)."""
    path = cgroup_path(tgid, tid)
    if path is None:
        return 0
    try:
        return os.stat(path).st_ino
    except OSError:
        return 0


def net_cls_classid_file(mountinfo: str, cgroups: str) -> str | None:
    """The ``net_cls.classid`` file of the thread's cgroup in a cgroup v1 hierarchy that has
    the net_cls controller (``mountinfo``: /proc/self/mountinfo, ``cgroups``: the thread's
    /proc/.../cgroup), or None when no such hierarchy is mounted."""
    mount = None
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        fs = right.split()
        if fs[:1] == ["cgroup"] and len(fs) >= 3 and "net_cls" in fs[2].split(","):
            mount = left.split()[4]
            break
    if mount is None:
        return None
    for m in re.finditer(r"^\d+:([^:]*):(/.*)$", cgroups, re.M):
        if "net_cls" in m.group(1).split(","):
            return os.path.normpath(mount + m.group(2)) + "/net_cls.classid"
    return None


def cgroup_classid(tgid: int, tid: int) -> int:
    """bpf_get_cgroup_classid as kprobe programs have it (bpf_get_cgroup_classid_curr): the
    net_cls classid of the thread's cgroup.  Without a v1 net_cls hierarchy every task is in
    the controller's root, whose classid is 0 (net_cls exists only in cgroup v1)."""
    try:
        with open("/proc/self/mountinfo") as f:
            mountinfo = f.read()
        with open(f"/proc/{tgid}/task/{tid}/cgroup") as f:
            path = net_cls_classid_file(mountinfo, f.read())
        if path is None:
            return 0
        with open(path) as f:
            return int(f.read().strip()) & 0xFFFFFFFF
    except (OSError, ValueError):
        return 0
