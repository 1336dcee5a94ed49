"""Real tools, unmodified: ../shared/realworld built by its build.sh (both header
generations), each run with the flags its C loader implies (README "Running
libbpf-tools") against a target written here, on the JIT, the interpreter and
``--backend kernel``; what the tool reports must equal the kernel's.  ``--check``
verdicts equal the kernel's for every program of every object."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_util import REPO, run_cli
from paths import REALWORLD, build_realworld

from ubpf_py.kernel.syscall import kernel_bpf_skip_reason

BACKENDS = [("--engine", "jit"), ("--engine", "interp"), ("--backend", "kernel")]
#: object x backend for tools built with both header generations: the older headers' objects run on
#: the JIT and the kernel (the interpreter already ran the same source built with the current headers)
BOTH_GENERATIONS = [(obj, b) for obj in ("", ".sys") for b in BACKENDS if not (obj and b[1] == "interp")]

#: what memleak's loader does before load (memleak.c: stack map sized, user stacks)
MEMLEAK_LOADER = ["--set", "stack_flags=256", "--map-size", "stack_traces.value_size=1016,max_entries=10240"]
MEMLEAK_FUNCS = ["malloc", "calloc", "realloc", "mmap", "mremap", "posix_memalign", "memalign", "valloc",
                 "pvalloc", "aligned_alloc"]
MEMLEAK_ATTACH = [a for f in MEMLEAK_FUNCS for a in ("--attach", f"{f}_enter=libc.so.6:{f}",
                                                    "--attach", f"{f}_exit=libc.so.6:{f}")]
MEMLEAK_ATTACH += ["--attach", "free_enter=libc.so.6:free", "--attach", "munmap_enter=libc.so.6:munmap"]

TARGETS = {
    "gh.c": r"""
#include <netdb.h>
#include <string.h>
#include <sys/socket.h>
int main(void) {
	char host[16]; strcpy(host, "localhost");   /* touched: the kernel reads only resident pages */
	for (int i = 0; i < 3; i++) { struct addrinfo *ai = 0; if (!getaddrinfo(host, "80", 0, &ai)) freeaddrinfo(ai); }
	for (int i = 0; i < 2; i++) gethostbyname(host);
	return 0;
}""",
    "fl.c": r"""
#include <time.h>
__attribute__((noinline)) void slow(long us) { struct timespec t = {0, us * 1000}; nanosleep(&t, 0); }
int main(void) { for (int i = 0; i < 20; i++) slow(200 + i * 50); return 0; }""",
    "ml.c": r"""
#include <stdlib.h>
#include <string.h>
int main(void) {
	void *keep[8];
	for (int i = 0; i < 5; i++) { void *p = malloc(100 + i); memset(p, 1, 100); if (i < 3) free(p); else keep[i] = p; }
	keep[0] = calloc(10, 8);
	keep[1] = realloc(malloc(40), 4000);
	void *al = 0; if (posix_memalign(&al, 64, 512)) return 1; keep[2] = al;
	free(keep[1]);
	__asm__ volatile("" :: "r"(keep) : "memory");
	return 0;
}""",
    "up.c": r"""
__attribute__((noinline)) int uprobed_add(int a, int b) { __asm__ volatile(""); return a + b; }
__attribute__((noinline)) int uprobed_sub(int a, int b) { __asm__ volatile(""); return a - b; }
int main(void) { int s = 0; for (int i = 0; i < 3; i++) s += uprobed_add(i, i + 1) + uprobed_sub(i * i, i); return s != 15; }""",
    "sj.c": r"""
#include <sys/sdt.h>
long arr[3] = {7, 8, 9};
int main(void) { for (int i = 0; i < 3; i++) DTRACE_PROBE3(libc, setjmp, &arr[i], i, arr[i]); return 0; }""",
}


@pytest.fixture(scope="module")
def rw() -> Path:
    for tool in ("clang", "bpftool"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is needed to build ../shared/realworld")
    if not (REALWORLD / "build.sh").exists():
        pytest.skip(f"no real-world programs at {REALWORLD}")
    return build_realworld()


@pytest.fixture(scope="module")
def targets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the targets")
    d = tmp_path_factory.mktemp("rwtargets")
    for name, src in TARGETS.items():
        (d / name).write_text(src)
        r = subprocess.run(["gcc", "-O1", "-o", str(d / name[:-2]), str(d / name)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot build target {name}: {r.stderr[:200]}")
    return d


def _events(obj: Path, backend: tuple[str, str], args: list[str], cwd: Path, stdin: int | None = None) -> list[dict]:
    if backend[0] == "--backend" and (reason := kernel_bpf_skip_reason()):
        pytest.skip(reason)
    p = subprocess.run([sys.executable, "-m", "ubpf_py.cli", str(obj), *backend, "-f", "json", *args],
                       cwd=cwd, capture_output=True, text=True, timeout=120, stdin=stdin,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert p.returncode == 0, p.stderr[-2000:]
    return [json.loads(ln) for ln in p.stdout.splitlines()]


def _globals(events: list[dict]) -> dict:
    return {e["name"]: e["value"] for e in events if e["event"] == "global"}


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b[1])
def test_gethostlatency(rw: Path, targets: Path, backend: tuple[str, str]) -> None:
    args = ["--set", "target_pid=$PID"]
    for func in ("getaddrinfo", "gethostbyname"):
        args += ["--attach", f"handle_entry=libc.so.6:{func}", "--attach", f"handle_return=libc.so.6:{func}"]
    ev = _events(rw / "gethostlatency.bpf.o", backend, [*args, "--", "./gh"], targets)
    pid = _globals(ev)["target_pid"]
    recs = [e["fields"] for e in ev if e["event"] == "record"]
    assert [(r["pid"], r["comm"], r["host"]) for r in recs] == [(pid, "gh", "localhost")] * 5
    assert all(0 < r["time"] < 10**9 for r in recs)


@pytest.mark.parametrize("gen,backend", BOTH_GENERATIONS, ids=lambda x: x[1] if isinstance(x, tuple) else x or "cur")
def test_funclatency(rw: Path, targets: Path, backend: tuple[str, str], gen: str) -> None:
    obj = f"funclatency{gen}.bpf.o"
    args = ["--set", "targ_tgid=$PID", "--set", "units=1", "--attach", "dummy_kprobe=./fl:slow",
            "--attach", "dummy_kretprobe=./fl:slow", "--", "./fl"]
    hist = _globals(_events(rw / obj, backend, args, targets))["hist"]
    assert sum(hist) == 20                              # every call, once
    assert sum(hist[:7]) == 0                           # all >= 200 us: nothing below the [128, 256) slot
    assert sum(hist[20:]) == 0                          # and none absurdly long


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b[1])
def test_memleak(rw: Path, targets: Path, backend: tuple[str, str]) -> None:
    ev = _events(rw / "memleak.bpf.o", backend, [*MEMLEAK_LOADER, *MEMLEAK_ATTACH, "--", "./ml"], targets)
    maps = {e["name"]: e for e in ev if e["event"] == "map"}
    allocs = maps["allocs"]["entries"]
    # outstanding: malloc(103), malloc(104), calloc(10, 8), posix_memalign(512); freed ones are gone
    sizes = sorted(int.from_bytes(bytes.fromhex(v)[:8], "little") for _k, v in allocs)
    assert sizes == [80, 103, 104, 512]
    stacks = {int.from_bytes(bytes.fromhex(k), "little") for k, _v in maps["stack_traces"]["entries"]}
    for _k, v in allocs:
        assert int.from_bytes(bytes.fromhex(v)[16:20], "little", signed=True) in stacks


def _bash_lines(rw: Path, backend: tuple[str, str]) -> list[dict]:
    master, slave = pty.openpty()
    try:
        cmd = [sys.executable, "-m", "ubpf_py.cli", str(rw / "bashreadline.bpf.o"), *backend, "-f", "json",
               "--attach", "printret=/bin/bash:readline", "--", "/bin/bash", "--norc", "--noprofile", "-i"]
        if backend[0] == "--backend" and (reason := kernel_bpf_skip_reason()):
            pytest.skip(reason)
        p = subprocess.Popen(cmd, stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env=dict(os.environ, PYTHONPATH=str(REPO)), start_new_session=True)
        os.close(slave)
        slave = -1
        # typed ahead: both backends start bash only once the probe is attached, and bash reads
        # the lines from the terminal's buffer one by one
        os.write(master, b"echo one\necho two\nexit\n")
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err.decode()[-1000:]
        return [json.loads(ln) for ln in out.decode().splitlines() if ln.startswith("{")]
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)


@pytest.mark.skipif(not os.path.exists("/bin/bash"), reason="bash is the target of bashreadline")
@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b[1])
def test_bashreadline(rw: Path, backend: tuple[str, str]) -> None:
    ev = _bash_lines(rw, backend)
    pid = next(e["pid"] for e in ev if e["event"] == "exit")
    recs = [e["fields"] for e in ev if e["event"] == "record"]
    assert [(r["pid"], r["str"]) for r in recs] == [(pid, "echo one"), (pid, "echo two"), (pid, "exit")]


@pytest.mark.parametrize("gen,backend", BOTH_GENERATIONS, ids=lambda x: x[1] if isinstance(x, tuple) else x or "cur")
def test_bootstrap_uprobe(rw: Path, targets: Path, backend: tuple[str, str], gen: str) -> None:
    obj = f"bootstrap_uprobe{gen}.bpf.o"
    ev = _events(rw / obj, backend, ["--attach", "uprobe_add=./up:uprobed_add",
                                     "--attach", "uretprobe_add=./up:uprobed_add", "--", "./up"], targets)
    lines = sorted(e["message"] for e in ev if e["event"] == "printk")
    want = [f"uprobed_add ENTRY: a = {i}, b = {i + 1}" for i in range(3)]
    want += [f"uprobed_add EXIT: return = {2 * i + 1}" for i in range(3)]
    want += [f"uprobed_sub ENTRY: a = {i * i}, b = {i}" for i in range(3)]
    want += [f"uprobed_sub EXIT: return = {i * i - i}" for i in range(3)]
    assert lines == sorted(want)


@pytest.mark.parametrize("gen,backend", BOTH_GENERATIONS, ids=lambda x: x[1] if isinstance(x, tuple) else x or "cur")
def test_bootstrap_usdt(rw: Path, targets: Path, backend: tuple[str, str], gen: str) -> None:
    """The example auto-attaches to libc's setjmp probe, which this libc may lack: the target here
    has a probe of that name, given by hand like the example's manual attach."""
    obj = f"bootstrap_usdt{gen}.bpf.o"
    ev = _events(rw / obj, backend, ["--set", "my_pid=$PID", "--attach", "usdt_auto_attach=./sj:libc:setjmp",
                                     "--attach", "usdt_manual_attach=./sj:libc:setjmp", "--", "./sj"], targets)
    msgs = [e["message"] for e in ev if e["event"] == "printk"]
    for kind in ("auto", "manual"):
        mine = [m for m in msgs if m.startswith(f"USDT {kind} attach")]
        assert [m.split("arg2 = ")[1].split(",")[0] for m in mine] == ["0", "1", "2"], msgs
        assert len({m.split("arg1 = ")[1].split(",")[0] for m in mine}) == 3   # &arr[i]: 3 addresses


def _kernel_verdict(path: Path, name: str, loader: list[str]) -> bool:
    from ubpf_py.errors import KernelBackendError
    from ubpf_py.kernel.loader import load_collection
    from ubpf_py.live.loader_opts import apply_loader_options
    from ubpf_py.obj.elf import load_object

    spec = load_object(path)
    sizes = [loader[i + 1] for i, a in enumerate(loader) if a == "--map-size"]
    apply_loader_options(spec, sizes, (), set(spec.programs))
    try:
        load_collection(spec, programs=[name]).close()
    except KernelBackendError:
        return False
    return True


def test_check_verdicts_equal_the_kernels(rw: Path) -> None:
    reason = kernel_bpf_skip_reason()
    objs = sorted(rw.glob("*.o"))
    assert len(objs) >= 10
    for obj in objs:
        p = run_cli("--check", str(obj), timeout=300)
        ours = {ln.split(":")[0]: ": OK" in ln for ln in p.stdout.splitlines() if (": " in ln and " insns" in ln)
                or ": REJECTED" in ln}
        assert ours, (obj, p.stdout, p.stderr)
        assert all(ln.startswith("ubpf-run: warning: ") for ln in p.stderr.splitlines()), p.stderr
        if reason:
            continue
        loader = MEMLEAK_LOADER if obj.name.startswith("memleak") else []
        for name, ok in ours.items():
            assert _kernel_verdict(obj, name, loader) == ok, (obj.name, name)
    if reason:
        pytest.skip(f"our verdicts only: {reason}")


@pytest.fixture
def cgroups() -> Iterator[tuple[str, str]]:
    """Two sibling cgroup v2 directories (the funclatency -c filter needs one the target is in)."""
    from ubpf_py.helpers.kernel_task import cgroup2_root

    root = cgroup2_root()
    if root is None or not os.access(root, os.W_OK):
        pytest.skip("no writable cgroup v2 hierarchy to create test cgroups in")
    dirs = [tempfile.mkdtemp(prefix="ubpf-cg-", dir=root) for _ in range(2)]
    yield dirs[0], dirs[1]
    for d in dirs:
        with contextlib.suppress(OSError):
            os.rmdir(d)


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b[1])
def test_funclatency_cgroup_filter(rw: Path, targets: Path, backend: tuple[str, str],
                                   cgroups: tuple[str, str]) -> None:
    """funclatency -c: filter_cg with the cgroup in cgroup_map[0] (--cgroup-map), the target moved
    into one of two sibling cgroups before it execs: counted only when it is the map's cgroup."""
    inside, other = cgroups
    totals = []
    for where in (inside, other):
        args = ["--set", "targ_tgid=$PID", "--set", "units=1", "--set", "filter_cg=1",
                "--cgroup-map", f"cgroup_map={inside}", "--attach", "dummy_kprobe=./fl:slow",
                "--attach", "dummy_kretprobe=./fl:slow", "--", "sh", "-c",
                f'echo $$ > {where}/cgroup.procs && exec ./fl']
        totals.append(sum(_globals(_events(rw / "funclatency.bpf.o", backend, args, targets)).get("hist", [0])))
    assert totals == [20, 0]
