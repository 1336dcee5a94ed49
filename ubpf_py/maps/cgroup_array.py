"""CGROUP_ARRAY: slots holding cgroups, for ``bpf_current_task_under_cgroup``.

User space stores a cgroup the kernel way, as the fd of an open cgroup v2
directory (``update(index, fd)``; funclatency/memleak ``-c PATH`` do exactly
that), or by path (:meth:`CgroupArrayMap.set_cgroup`, what ``--cgroup-map`` uses).
The map keeps the directory's path; the helper asks whether the traced thread's
cgroup lies under it (``task_under_cgroup_hierarchy``).  Like the kernel,
neither programs nor user space can look the slots up.
"""

from __future__ import annotations

import os
import struct

from ubpf_py.maps import consts as C
from ubpf_py.maps.array import array_next_key, check_array_spec
from ubpf_py.maps.base import Map
from ubpf_py.obj.spec import MapSpec
from ubpf_py.vm.memory import Allocator

_U32 = struct.Struct("<I")


class CgroupArrayMap(Map):
    def __init__(self, spec: MapSpec, ncpus: int | None = None, alloc: Allocator | None = None) -> None:
        super().__init__(spec, ncpus, alloc)
        check_array_spec(spec, False, value_size_fixed=4)
        self.paths: list[str | None] = [None] * self.max_entries

    def set_cgroup(self, index: int, path: str) -> int:
        """Store the cgroup directory ``path`` in slot ``index`` (0 or -errno)."""
        if not 0 <= index < self.max_entries:
            return -C.E2BIG
        if not os.path.isdir(path):
            return -C.EBADF
        self.paths[index] = os.path.realpath(path)
        return 0

    def update(self, key: bytes, value: bytes, flags: int = C.BPF_ANY, cpu: int | None = None) -> int:
        self._check_key(key)
        if flags > C.BPF_EXIST:
            return -C.EINVAL
        if flags == C.BPF_NOEXIST:
            return -C.EEXIST  # array slots always exist
        try:
            path = os.readlink(f"/proc/self/fd/{_U32.unpack(value)[0]}")
        except (OSError, struct.error):
            return -C.EBADF
        return self.set_cgroup(_U32.unpack(key)[0], path)

    def delete(self, key: bytes, cpu: int | None = None) -> int:
        self._check_key(key)
        i = _U32.unpack(key)[0]
        if i >= self.max_entries or self.paths[i] is None:
            return -C.ENOENT
        self.paths[i] = None
        return 0

    def get_next_key(self, key: bytes | None) -> bytes | None:
        return array_next_key(key, self.max_entries)

    def under(self, index: int, thread_cgroup: str | None) -> int:
        """bpf_current_task_under_cgroup's answer: 1, 0, -E2BIG (index) or -EAGAIN (empty slot)."""
        if index >= self.max_entries:
            return -C.E2BIG
        root = self.paths[index]
        if root is None:
            return -C.EAGAIN
        if thread_cgroup is None:
            return 0
        return int(thread_cgroup == root or thread_cgroup.startswith(root.rstrip("/") + "/"))
