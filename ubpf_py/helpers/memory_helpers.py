"""Probe-read family (4, 36, 45, 112-115), the sleepable copies (148 bpf_copy_from_user,
191 bpf_copy_from_user_task) and bpf_strncmp (182).

Kernel rules kept here:

* every read helper zero-fills the whole destination when it fails, and returns
  -EFAULT (user memory) -- or -ERANGE when a *kernel* read is given a user-space
  address, which the kernel refuses before touching it;
* the ``_str`` variants copy at most ``size - 1`` bytes plus a NUL and return
  the copied length including the NUL (``size`` when truncated); they do not
  clear the rest of the destination;
* bpf_copy_from_user reads the traced process like bpf_probe_read_user (the kernel
  faults the pages in instead of failing; here the process's memory is read as it is);
  bpf_copy_from_user_task refuses flags (-EINVAL) and reads the task's process, which
  the verifier allows to be the current task only (a trusted task_struct pointer);
* legacy ``bpf_probe_read``/``bpf_probe_read_str`` (4, 45) on x86-64 read user
  memory for user-space addresses.  Here the program's own memory (stack, maps:
  "kernel" memory to the program) is tried first, then the traced process.
"""

from __future__ import annotations

from ubpf_py.errors import VMFault
from ubpf_py.helpers.context import HelperContext
from ubpf_py.vm.env import HelperFn

EFAULT = 14
EINVAL = 22


def bind(hc: HelperContext, table: dict[int, HelperFn]) -> None:
    env = hc.env
    mem = env.memory

    def _fail(dst: int, size: int, err: int) -> int:
        if size:
            mem.write(dst, bytes(size))
        return err

    def _done(dst: int, data: bytes | None, size: int, err: int) -> int:
        if data is None or len(data) != size:
            return _fail(dst, size, err)
        mem.write(dst, data)
        return 0

    def probe_read_user(r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
        size = r2 & 0xFFFFFFFF
        if not size:
            return 0
        return _done(r1, hc.user_read(r3, size), size, -EFAULT)

    def copy_from_user_task(r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
        if r5:
            return -EINVAL
        ko = hc.kernel_objects
        if ko is None or getattr(ko, "task", None) is None or r4 not in (ko.task.addr, ko.leader.addr):
            raise VMFault(f"bpf_copy_from_user_task: 0x{r4:x} is not a task of the traced process; "
                          "not supported: reading another process's memory")
        return probe_read_user(r1, r2, r3, 0, 0)

    def probe_read_kernel(r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
        size = r2 & 0xFFFFFFFF
        if not size:
            return 0
        return _done(r1, hc.kernel_read(r3, size), size, hc.kernel_read_err(r3))

    def probe_read(r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
        size = r2 & 0xFFFFFFFF
        if not size:
            return 0
        data = hc.kernel_read(r3, size)
        if data is None:
            data = hc.user_read(r3, size)
        return _done(r1, data, size, -EFAULT)

    def _str_result(dst: int, size: int, text: bytes | None, err: int) -> int:
        if text is None:
            return _fail(dst, size, err)
        text = text[:size - 1]
        mem.write(dst, text + b"\0")
        return len(text) + 1

    def probe_read_user_str(r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
        size = r2 & 0xFFFFFFFF
        if not size:
            return 0
        text = hc.user_str(r3, size)
        rc = _str_result(r1, size, text, -EFAULT)
        if text is not None and len(text) < size - 1:
            _zero_word_tail(r1, r3, len(text), size)
        return rc

    def _zero_word_tail(dst: int, src: int, nul: int, size: int) -> None:
        """The kernel's strncpy_from_user copies 8-byte words while at least 8 bytes remain:
        the word holding the NUL is stored with the bytes after the NUL zeroed, when the
        whole word was readable (a word running into an unmapped page is copied a byte at a
        time, with nothing after the NUL written)."""
        word = nul & ~7
        end = word + 8
        if end > size or nul + 1 >= end or env.hit.user_memory.read(src + word, 8) is None:
            return
        mem.write(dst + nul + 1, bytes(end - nul - 1))

    def probe_read_kernel_str(r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
        size = r2 & 0xFFFFFFFF
        if not size:
            return 0
        return _str_result(r1, size, hc.kernel_str(r3, size), hc.kernel_read_err(r3))

    def probe_read_str(r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
        size = r2 & 0xFFFFFFFF
        if not size:
            return 0
        return _str_result(r1, size, hc.any_str(r3, size), -EFAULT)

    def probe_write_user(r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
        size = r3 & 0xFFFFFFFF
        data = mem.read(r2, size) if size else b""
        if not size:
            return 0
        return 0 if env.hit.user_memory.write(r1, data) else -EFAULT

    def strncmp(r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
        size = r2 & 0xFFFFFFFF
        s1 = mem.read(r1, size) if size else b""
        s2 = hc.c_string(r3) + b"\0"
        for i in range(size):
            c1 = s1[i]
            c2 = s2[i] if i < len(s2) else 0
            if c1 != c2:
                return -1 if c1 < c2 else 1
            if not c1:
                break
        return 0

    table.update({
        4: probe_read, 36: probe_write_user, 45: probe_read_str,
        112: probe_read_user, 113: probe_read_kernel, 114: probe_read_user_str,
        115: probe_read_kernel_str, 148: probe_read_user, 182: strncmp, 191: copy_from_user_task,
    })
