"""Which file an attach point names, and where a bare function name lives.

Binary names follow libbpf and the corpus README:

* a name containing ``/`` is a path, relative to the loader's working directory
  (the kernel resolves it that way);
* ``/proc/self/exe`` means the *target's* executable (libbpf's selftests use it
  for the loader itself; for a tracer the only useful meaning is the target);
* a bare name ending in ``.so`` or containing ``.so.`` is a library, found as the
  target's dynamic loader would: the libraries mapped in the target first, then
  the working directory (the build dir), ``LD_LIBRARY_PATH``, the target's
  ``DT_RPATH``/``DT_RUNPATH`` (``$ORIGIN`` expanded), ``ld.so.cache``
  (``ldconfig -p``) and the default directories;
* any other bare name is a program on ``PATH``.

A label-only section (``uretprobe/readline``) names no binary: the function is
looked up the way the dynamic linker's global scope would, in the executable
and then its libraries in load order (:func:`find_function_in_process`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections import deque
from functools import lru_cache

from ubpf_py.errors import SymbolError, TargetError
from ubpf_py.probe import procmaps
from ubpf_py.probe.symbols import ElfInfo, load_elf, lookup_function, try_lookup_function

DEFAULT_LIB_DIRS = ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64",
                    "/lib", "/usr/lib", "/usr/local/lib")
DEFAULT_BIN_DIRS = ("/usr/bin", "/usr/sbin")


def is_library_name(name: str) -> bool:
    """libbpf's test: ends with ``.so`` or contains ``.so.``."""
    return name.endswith(".so") or ".so." in name


@lru_cache(maxsize=1)
def ld_so_cache() -> dict[str, str]:
    """soname -> path of 64-bit x86 entries of ``ldconfig -p`` (empty if unavailable)."""
    exe = shutil.which("ldconfig") or ("/sbin/ldconfig" if os.path.exists("/sbin/ldconfig") else None)
    if exe is None:
        return {}
    try:
        out = subprocess.run([exe, "-p"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    cache: dict[str, str] = {}
    for line in out.splitlines():
        line = line.strip()
        if "=>" not in line or "(" not in line:
            continue
        left, path = line.split("=>", 1)
        soname, flags = left.split("(", 1)
        if "x86-64" not in flags:
            continue
        cache.setdefault(soname.strip(), path.strip())
    return cache


def _target_env(pid: int | None, var: str) -> str | None:
    if pid is None:
        return os.environ.get(var)
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            for item in f.read().split(b"\0"):
                k, _, v = item.partition(b"=")
                if k.decode(errors="replace") == var:
                    return v.decode(errors="replace")
    except OSError:
        return os.environ.get(var)
    return None


def _is_elf(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def _expand_origin(entries: list[str], origin: str) -> list[str]:
    return [e.replace("$ORIGIN", origin).replace("${ORIGIN}", origin) for e in entries]


def _elf_search_dirs(exe: str | None) -> tuple[list[str], list[str]]:
    """(RPATH dirs, RUNPATH dirs) of ``exe`` with ``$ORIGIN`` expanded."""
    if exe is None:
        return [], []
    try:
        info = load_elf(exe)
    except (SymbolError, OSError):
        return [], []
    origin = os.path.dirname(os.path.realpath(exe))
    rpath = _expand_origin(info.rpath, origin) if not info.runpath else []
    return rpath, _expand_origin(info.runpath, origin)


def library_search_dirs(pid: int | None = None, cwd: str | None = None,
                        exe: str | None = None) -> list[str]:
    """Directories searched for a bare library name, in order (mapped libraries aside)."""
    rpath, runpath = _elf_search_dirs(exe)
    ld_path = _target_env(pid, "LD_LIBRARY_PATH") or ""
    dirs = [cwd or os.getcwd()]
    dirs += rpath
    dirs += [d for d in ld_path.split(":") if d]
    dirs += runpath
    return dirs


def _find_library(name: str, pid: int | None, cwd: str | None, exe: str | None,
                  extra_dirs: list[str] | None = None) -> str | None:
    if pid is not None:
        try:
            maps = procmaps.read_maps(pid)
        except TargetError:
            maps = []
        for path in procmaps.mapped_files(maps):
            if os.path.basename(path) == name and os.path.exists(path):
                return path
    for d in (extra_dirs or []) + library_search_dirs(pid, cwd, exe):
        cand = os.path.join(d, name)
        if os.path.isfile(cand) and _is_elf(cand):
            return os.path.abspath(cand)
    hit = ld_so_cache().get(name)
    if hit and os.path.isfile(hit):
        return hit
    for d in DEFAULT_LIB_DIRS:
        cand = os.path.join(d, name)
        if os.path.isfile(cand) and _is_elf(cand):
            return cand
    return None


def _exe_of(pid: int | None, exe: str | None, cwd: str | None) -> str | None:
    if pid is not None:
        return procmaps.exe_path(pid)
    if exe is not None:
        return _resolve_command(exe, cwd)
    return None


def _resolve_command(cmd: str, cwd: str | None) -> str:
    """A command as execvp would find it."""
    if "/" in cmd:
        path = cmd if os.path.isabs(cmd) else os.path.join(cwd or os.getcwd(), cmd)
        if not os.path.exists(path):
            raise SymbolError(f"binary not found: {cmd} (relative paths start at {cwd or os.getcwd()})")
        return os.path.abspath(path)
    found = shutil.which(cmd)
    if found is None:
        raise SymbolError(f"program {cmd!r} not found on PATH (give its path, e.g. ./{cmd})")
    return os.path.abspath(found)


def resolve_binary(name: str, pid: int | None = None, cwd: str | None = None,
                   exe: str | None = None) -> str:
    """The file a uprobe's binary field names (see the module docstring).

    ``exe`` is the target's command (argv[0]) when it has not been started yet;
    ``cwd`` is the loader's working directory (default: ours).
    """
    if not name:
        raise SymbolError("empty binary name in attach point (write BINARY:FUNCTION)")
    if name == "/proc/self/exe":
        target = _exe_of(pid, exe, cwd)
        if target is None:
            raise SymbolError("/proc/self/exe needs a target: give --pid or a command to run")
        return target
    if "/" in name:
        path = name if os.path.isabs(name) else os.path.join(cwd or os.getcwd(), name)
        if not os.path.exists(path):
            raise SymbolError(f"binary not found: {name} (relative paths start at {cwd or os.getcwd()})")
        return os.path.abspath(path)
    if is_library_name(name):
        try:
            target_exe = _exe_of(pid, exe, cwd)
        except (SymbolError, TargetError):
            target_exe = None
        found = _find_library(name, pid, cwd, target_exe)
        if found is None:
            raise SymbolError(f"library {name!r} not found (not mapped in the target, not in "
                              f"{cwd or os.getcwd()}, LD_LIBRARY_PATH, ld.so.cache or the system "
                              "library directories); give its path")
        return found
    path_var = os.environ.get("PATH", "")
    found = shutil.which(name, path=":".join([p for p in path_var.split(":") if p]
                                            + list(DEFAULT_BIN_DIRS)))
    if found is not None:
        return os.path.abspath(found)
    try:
        target_exe = _exe_of(pid, exe, cwd)
    except (SymbolError, TargetError):
        target_exe = None
    if target_exe is not None and os.path.basename(target_exe) == name:
        return target_exe
    raise SymbolError(f"program {name!r} not found on PATH (write ./{name} for a file in "
                      f"{cwd or os.getcwd()})")


def needed_closure(exe: str, pid: int | None = None, cwd: str | None = None) -> list[str]:
    """The executable's DT_NEEDED libraries, breadth-first as ld.so loads them."""
    out: list[str] = []
    seen: set[str] = set()
    queue: deque[tuple[str, ElfInfo]] = deque()
    try:
        queue.append((exe, load_elf(exe)))
    except SymbolError:
        return out
    rpath, runpath = _elf_search_dirs(exe)
    while queue:
        path, info = queue.popleft()
        origin = os.path.dirname(os.path.realpath(path))
        own = _expand_origin(info.runpath or info.rpath, origin)
        for lib in info.needed:
            if lib in seen:
                continue
            seen.add(lib)
            found = _find_library(lib, None, cwd, exe, extra_dirs=own + rpath + runpath)
            if found is None:
                continue
            out.append(found)
            try:
                queue.append((found, load_elf(found)))
            except SymbolError:
                continue
    return out


def _candidates(pid_or_exe: int | str, cwd: str | None) -> tuple[str, list[str], str]:
    if isinstance(pid_or_exe, int):
        exe = procmaps.exe_path(pid_or_exe)
        maps = procmaps.read_maps(pid_or_exe)
        exe_ident = procmaps.file_identity(exe)
        libs = []
        for path in procmaps.mapped_files(maps):
            if procmaps.file_identity(path) == exe_ident or not _is_elf(path):
                continue
            libs.append(path)
        return exe, libs, f"mapped in pid {pid_or_exe}"
    exe = _resolve_command(pid_or_exe, cwd)
    return exe, needed_closure(exe, None, cwd), "needed by the executable"


def find_function_in_process(pid_or_exe: int | str, name: str, offset: int = 0,
                             cwd: str | None = None) -> tuple[str, int, str]:
    """``(binary_path, file_offset, note)`` for a function given without a binary.

    Searches the executable, then its libraries (mapped ones for a pid, else the
    DT_NEEDED closure), first definition wins like symbol interposition; the note
    says what was chosen and where else the name is defined.
    """
    exe, libs, how = _candidates(pid_or_exe, cwd)
    found: list[tuple[str, int, str]] = []
    for i, path in enumerate([exe, *libs]):
        try:
            m = try_lookup_function(path, name, offset)
        except SymbolError:
            if not found:
                raise  # ambiguous where it would bind first: the user must choose
            continue  # after the binding definition, others only feed the note
        if m is not None:
            where = "the executable" if i == 0 else f"a library {how}"
            found.append((path, m.file_offset, where))
    if not found:
        hint = ""
        try:
            lookup_function(exe, name)
        except SymbolError as e:
            if "did you mean" in str(e):
                hint = "; did you mean" + str(e).split("did you mean", 1)[1]
        raise SymbolError(f"function {name!r} not found in {exe} or its {len(libs)} libraries{hint}")
    path, off, where = found[0]
    note = f"{name} resolved in {path} ({where}) at file offset {off:#x}"
    if len(found) > 1:
        note += "; also defined in " + ", ".join(p for p, _o, _w in found[1:])
    return path, off, note
