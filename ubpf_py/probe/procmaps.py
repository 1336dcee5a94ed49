"""/proc/PID/maps: which file is mapped where in a target.

A probe location is kernel-like ``(binary_path, file_offset)``.  The kernel turns
it into addresses per VMA of that *inode*; we do the same from the maps text.
Files are matched by (device, inode) because the path a user names may differ
from the one in maps (symlinks such as ``libc.so.6 -> libc-2.36.so``, bind
mounts, ``/proc/PID/root`` prefixes); the resolved path is the fallback for
filesystems whose maps device differs from ``stat()`` (overlayfs).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ubpf_py.errors import TargetError

_DELETED = " (deleted)"


@dataclass(frozen=True, slots=True)
class Mapping:
    """One line of /proc/PID/maps."""

    start: int
    end: int
    perms: str          # e.g. "r-xp"
    offset: int         # file offset of ``start``
    dev: tuple[int, int]  # (major, minor)
    inode: int
    path: str           # "" for anonymous mappings; "[heap]", "[vdso]"...; " (deleted)" stripped
    deleted: bool = False

    @property
    def readable(self) -> bool:
        return self.perms[0] == "r"

    @property
    def writable(self) -> bool:
        return self.perms[1] == "w"

    @property
    def executable(self) -> bool:
        return self.perms[2] == "x"

    @property
    def private(self) -> bool:
        return self.perms[3] == "p"

    @property
    def is_file(self) -> bool:
        """Backed by a file (not anonymous, not a [pseudo] mapping)."""
        return self.inode != 0 and self.path.startswith("/")

    def contains(self, addr: int) -> bool:
        return self.start <= addr < self.end

    def contains_file_offset(self, file_offset: int) -> bool:
        return self.offset <= file_offset < self.offset + (self.end - self.start)


def parse_maps(text: str) -> list[Mapping]:
    """Parse the text of a maps file (also the oracle's saved copies)."""
    out: list[Mapping] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        # the path may contain spaces: split the five fixed fields only
        parts = line.split(None, 5)
        if len(parts) < 5:
            raise TargetError(f"malformed /proc/PID/maps line: {line!r}")
        rng, perms, off, dev, inode = parts[:5]
        path = parts[5].strip() if len(parts) == 6 else ""
        deleted = path.endswith(_DELETED)
        if deleted:
            path = path[: -len(_DELETED)]
        lo, hi = rng.split("-")
        major, minor = dev.split(":")
        out.append(Mapping(int(lo, 16), int(hi, 16), perms, int(off, 16),
                           (int(major, 16), int(minor, 16)), int(inode), path, deleted))
    return out


def read_maps(pid: int) -> list[Mapping]:
    """The current mappings of process ``pid``."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            return parse_maps(f.read())
    except FileNotFoundError:
        raise TargetError(f"no such process: pid {pid}") from None
    except PermissionError:
        raise TargetError(f"cannot read /proc/{pid}/maps: permission denied "
                          "(run as the target's user or as root)") from None


def file_identity(path: str) -> tuple[tuple[int, int], int] | None:
    """((major, minor), inode) of ``path`` as maps shows them, or None if missing."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (os.major(st.st_dev), os.minor(st.st_dev)), st.st_ino


def mappings_of_file(maps: list[Mapping], path: str) -> list[Mapping]:
    """Mappings of the file ``path``: same (dev, inode), else the same resolved path."""
    ident = file_identity(path)
    real = os.path.realpath(path)
    found: list[Mapping] = []
    for m in maps:
        if not m.is_file:
            continue
        same_file = ident is not None and (m.dev, m.inode) == ident
        # same path on another device: overlayfs and friends report the
        # underlying inode in maps; a deleted (replaced) file is not this one
        same_path = (m.path in (path, real) and not m.deleted
                     and (ident is None or m.dev != ident[0]))
        if same_file or same_path:
            found.append(m)
    return found


def file_offset_to_addr(maps: list[Mapping], path: str, file_offset: int, *,
                        writable: bool = False) -> list[int]:
    """Runtime addresses of ``file_offset`` of ``path`` in these mappings.

    Code (the default) follows the kernel's ``valid_vma()`` for uprobes: private,
    non-writable mappings.  ``writable=True`` follows the rule for USDT semaphores
    (``ref_ctr_offset``): private writable mappings.  A file mapped several times
    yields several addresses; none when it is not mapped (yet).
    """
    addrs: list[int] = []
    for m in mappings_of_file(maps, path):
        if not m.private or m.writable != writable:
            continue
        if m.contains_file_offset(file_offset):
            addrs.append(m.start + (file_offset - m.offset))
    return sorted(set(addrs))


def find_mapping(maps: list[Mapping], addr: int) -> Mapping | None:
    """The mapping containing ``addr``."""
    for m in maps:
        if m.start <= addr < m.end:
            return m
    return None


def addr_to_file_offset(maps: list[Mapping], addr: int) -> tuple[str, int] | None:
    """(path, file offset) of a runtime address in a file mapping, or None."""
    m = find_mapping(maps, addr)
    if m is None or not m.is_file:
        return None
    return m.path, m.offset + (addr - m.start)


def mapped_files(maps: list[Mapping]) -> list[str]:
    """Distinct file paths mapped, in address order (executable usually first)."""
    seen: dict[str, None] = {}
    for m in sorted(maps, key=lambda m: m.start):
        if m.is_file and m.path not in seen:
            seen[m.path] = None
    return list(seen)


def exe_path(pid: int) -> str:
    """The target's executable (``/proc/PID/exe``), as a path we can open."""
    try:
        target = os.readlink(f"/proc/{pid}/exe")
    except FileNotFoundError:
        raise TargetError(f"no such process: pid {pid}") from None
    except PermissionError:
        raise TargetError(f"cannot read /proc/{pid}/exe: permission denied "
                          "(run as the target's user or as root)") from None
    if target.endswith(_DELETED) or not os.path.exists(target):
        # replaced or deleted on disk, or in another mount namespace: the
        # magic link still opens the very file the process runs
        return f"/proc/{pid}/exe"
    return target


def code_addresses(maps, path: str, file_offset: int) -> list[int]:
    """Runtime addresses of ``file_offset`` of ``path`` in its executable private mappings.

    The kernel also patches read-only mappings of the same page (VM_MAYEXEC); an int3 there
    is never executed and would only corrupt data the program may read, so we skip them.
    """
    out = {m.start + file_offset - m.offset for m in mappings_of_file(maps, path)
           if m.executable and m.private and not m.writable and m.contains_file_offset(file_offset)}
    return sorted(out)


def is_dynamic_linker(path: str) -> bool:
    base = os.path.basename(path)
    return base.startswith("ld-") and ".so" in base


#: a jump or a RIP-relative operand reaches +-2 GiB
REACH_32 = 1 << 31


def near_hints(maps: list[Mapping], near: int, size: int, page: int = 4096) -> list[int]:
    """Free addresses for ``size`` bytes within +-2 GiB of ``near`` (out-of-line slots and
    trampolines: code that must reach, and be reached from, ``near`` with 32-bit offsets).

    Candidates lie just below the lowest mapping of the object holding ``near`` (16-page steps),
    then well above its highest one (past the brk heap of a non-PIE executable); those that
    overlap a mapping, sit below 64 KiB or are out of reach are left out.  The caller still maps
    with MAP_FIXED_NOREPLACE: the list is a guess at one moment."""
    holder = next((m for m in maps if m.start <= near < m.end), None)
    lo = hi = near
    if holder is not None and holder.inode:
        same = [m for m in maps if m.inode == holder.inode and m.dev == holder.dev]
        lo, hi = min(m.start for m in same), max(m.end for m in same)
    hints = [(lo - k * 16 * page - size) & ~(page - 1) for k in range(1, 64)]
    hints += [(hi + (1 << 28) + k * 16 * page) & ~(page - 1) for k in range(16)]
    return [h for h in hints
            if h > 0x10000 and abs(h - near) <= REACH_32 - 2 * size
            and all(h + size <= m.start or h >= m.end for m in maps)]
