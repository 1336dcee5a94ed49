"""The native hit path: eligible JIT programs run from the C stop loop with no Python per hit.

Proves the path is taken (no Python handler, no ``LoadedProgram.run`` call), that hit
counts and map results equal the Python path's on the same target, and that a
checked-mode fault becomes a clean one-line error with the target left to finish
exactly as it would unprobed.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import subprocess
from pathlib import Path

import pytest
from bpf_build import compile_bpf
from conftest import root_skip_reason

from ubpf_py import cli
from ubpf_py.errors import NotSupportedError
from ubpf_py.live import hitpath
from ubpf_py.live.collection import Collection, LoadedProgram
from ubpf_py.obj.elf import load_object
from ubpf_py.probe import native as N
from ubpf_py.vm.jit import layout as L

TICKS = 40000   # the counters target calls tick() this many times

FAULTY_C = r"""
typedef unsigned int __u32;
typedef unsigned long long __u64;
#define SEC(n) __attribute__((section(n), used))
#define __uint(name, val) int (*name)[val]
#define __type(name, val) typeof(val) *name
static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *)1;
struct {
	__uint(type, 2);              /* BPF_MAP_TYPE_ARRAY */
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} seen SEC(".maps");
SEC("uprobe")
int deref_arg(void *ctx)
{
	__u32 k = 0;
	__u64 *v = bpf_map_lookup_elem(&seen, &k);
	if (v)
		*v += 1;
	/* rdi (pt_regs slot 14) is a small int argument: not a pointer we may read */
	return *(volatile __u64 *)((__u64 *)ctx)[14];
}
char LICENSE[] SEC("license") = "GPL";
"""


RINGBUF_C = r"""
typedef unsigned int __u32;
typedef unsigned long long __u64;
#define SEC(n) __attribute__((section(n), used))
#define __uint(name, val) int (*name)[val]
static long (*bpf_ringbuf_output)(void *rb, void *data, __u64 size, __u64 flags) = (void *)130;
static __u64 (*bpf_get_current_pid_tgid)(void) = (void *)14;
struct {
	__uint(type, 27);             /* BPF_MAP_TYPE_RINGBUF */
	__uint(max_entries, 1 << 20);
} events SEC(".maps");
struct event { __u64 arg; __u64 pid_tgid; };
SEC("uprobe")
int emit(void *ctx)
{
	struct event e = { ((__u64 *)ctx)[14], bpf_get_current_pid_tgid() };
	bpf_ringbuf_output(&events, &e, sizeof(e), 0);
	return 0;
}
char LICENSE[] SEC("license") = "GPL";
"""


@pytest.fixture(autouse=True)
def _need_root_and_loop() -> None:
    reason = root_skip_reason()
    if reason:
        pytest.skip(reason)
    if N.load() is None:
        pytest.skip("the native stop loop could not be built (no C compiler)")


def _run_cli(capfd, monkeypatch, cwd: Path, argv: list[str]) -> tuple[int, dict, str, int]:
    """Run ubpf-run in-process (so Python calls can be counted): rc, JSON events by kind, stderr,
    number of Python program runs.  These tests compare the two tracer-side hit paths (C stop loop
    and Python), so programs stay out of the target (``--mode ptrace``)."""
    if "--mode" not in argv:
        argv = ["--mode", "ptrace", *argv]
    calls = {"run": 0, "handler": 0}
    real_run, real_make = LoadedProgram.run, hitpath.make_handler

    def counting_run(self, ctx_addr):
        calls["run"] += 1
        return real_run(self, ctx_addr)

    def counting_make(*a):
        h = real_make(*a)

        def wrapped(hit):
            calls["handler"] += 1
            h(hit)
        return wrapped

    monkeypatch.setattr(LoadedProgram, "run", counting_run)
    monkeypatch.setattr(hitpath, "make_handler", counting_make)
    monkeypatch.chdir(cwd)
    capfd.readouterr()
    rc = cli.main(argv)
    out, err = capfd.readouterr()
    events: dict = {}
    target_lines = []
    for line in out.splitlines():
        try:
            ev = json.loads(line)
        except ValueError:
            target_lines.append(line)
            continue
        events.setdefault(ev.get("event"), []).append(ev)
    # with --format json the target's stdout is sent to our stderr (stdout stays pure JSON)
    if "json" in argv:
        target_lines += [ln for ln in err.splitlines() if not ln.startswith("ubpf-run:")]
    events["target_stdout"] = target_lines
    assert calls["run"] == calls["handler"]
    return rc, events, err, calls["run"]


def _children() -> set[int]:
    """This process's children, zombies included (every thread's /proc children list)."""
    out: set[int] = set()
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError):
            out.update(int(p) for p in (task / "children").read_text().split())
    return out


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _maps(events: dict) -> dict:
    return {e["name"]: e for e in events.get("map", [])}


def test_counters_native_equals_python_path(corpus_build, capfd, monkeypatch) -> None:
    argv = ["counters.bpf.o", "-v", "-f", "json", "-a", "tick_entry=./counters:tick", "--", "./counters"]
    rc_n, ev_n, err_n, runs_n = _run_cli(capfd, monkeypatch, corpus_build, argv)
    rc_p, ev_p, err_p, runs_p = _run_cli(capfd, monkeypatch, corpus_build, ["--no-native-hits", *argv])
    assert rc_n == 0 and rc_p == 0, (err_n, err_p)
    assert runs_n == 0, "the native path must not run the program through Python"
    assert runs_p == TICKS
    for ev in (ev_n, ev_p):
        assert [s["hits"] for s in ev["stats"][0]["probes"]] == [TICKS]
        assert ev["exit"][0]["exit_code"] == 0
    assert ev_n["target_stdout"] == ev_p["target_stdout"] != []
    assert ev_n["global"] == ev_p["global"]
    mn, mp = _maps(ev_n), _maps(ev_p)
    assert set(mn) == set(mp)
    # 4 target threads: which CPU counted a hit and which keys the LRU map kept vary per run
    assert sum(mn["pcpu_calls"]["decoded"][0][1]) == sum(mp["pcpu_calls"]["decoded"][0][1]) == TICKS
    assert len(mn["recent"]["entries"]) == len(mp["recent"]["entries"]) == 8
    for name in mn:
        if name not in ("pcpu_calls", "recent"):
            assert sorted(mn[name]["entries"]) == sorted(mp[name]["entries"]), name


def test_env_var_forces_python_path(corpus_build, capfd, monkeypatch) -> None:
    monkeypatch.setenv("UBPF_NATIVE_HITS", "0")
    rc, _, err, runs = _run_cli(capfd, monkeypatch, corpus_build,
                                 ["counters.bpf.o", "-f", "json", "-a", "tick_entry=./counters:tick",
                                  "--", "./counters"])
    assert rc == 0, err
    assert runs == TICKS


def _bpf_object(tmp_path: Path, text: str, name: str = "faulty") -> Path:
    return compile_bpf(text, tmp_path, name)


@pytest.mark.parametrize("section", ["uprobe", "uretprobe"])
def test_native_fault_is_clean_error_and_target_untouched(corpus_build, tmp_path, capfd,
                                                          monkeypatch, section) -> None:
    """Entry probes fault in the C loop, return probes in the Python path: both end tracing with
    the one-line error and leave every thread able to finish (return addresses restored;
    --keep-command lets the command run on to show it)."""
    obj = _bpf_object(tmp_path, FAULTY_C.replace('SEC("uprobe")', f'SEC("{section}")'))
    # a single-threaded target: the one thread that faulted is the whole story
    plain = subprocess.run(["./hello"], cwd=corpus_build, capture_output=True, text=True, timeout=60)
    before = _children()
    rc, ev, err, runs = _run_cli(capfd, monkeypatch, corpus_build,
                                 [str(obj), "--verifier", "off", "-a", "deref_arg=./hello:add",
                                  "--keep-command", "--", "./hello"])
    assert runs == 0
    assert rc != 0
    lines = [ln for ln in err.splitlines() if ln.startswith("ubpf-run: error:")]
    assert len(lines) == 1 and "instruction" in lines[0], err
    assert "Traceback" not in err
    # the launched target was detached with every byte restored: it runs on to the same end
    # (its printed sum checks every add() result) and exit code as without probes
    # wait for that target by pid: another test in this worker may have left a child to reap
    (target,) = [pid for pid in _children() - before if _comm(pid) == "hello"]
    _, status = os.waitpid(target, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == plain.returncode == 0
    later = capfd.readouterr().out.splitlines()
    target_out = ev["target_stdout"] + later
    assert target_out == plain.stdout.splitlines()


def test_native_entry_direct_call(corpus_build) -> None:
    """native_entry() called like the C loop does: facts filled, one call, map updated natively."""
    spec = load_object(str(corpus_build / "counters.bpf.o"))
    coll = Collection.load(spec, engine="jit", verifier="strict", programs=["tick_entry"])
    ex = coll.program("tick_entry").executable
    assert ex.native_ineligible() is None
    fn = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_uint64)(ex.native_entry())
    regs = (ctypes.c_uint64 * 27)()
    regs[14], regs[13] = 3, 5          # rdi = idx 3, rsi = key 5
    ctx = ctypes.addressof(regs)
    from ubpf_py.vm.memory import HostBuffer, Region  # the context must be a readable region
    buf = HostBuffer(216)
    ctypes.memmove(buf.addr, ctx, 216)
    coll.env.memory.add(Region.of(buf, "ctx", writable=False, size=168))
    ex.native_sync()
    facts = (ctypes.c_uint64 * L.FACTS_WORDS).from_address(ex.native_facts_addr)
    for _ in range(3):
        facts[0] = 0
        facts[1] = 77 << 32 | 78
        fn(buf.addr)
    status = ctypes.c_uint64.from_address(ex.native_status_addr).value
    assert status == 0
    per_thread = coll.maps["per_thread"]
    assert int.from_bytes(per_thread.lookup((3).to_bytes(4, "little")), "little") == 3


def test_ineligible_programs_say_why(corpus_build) -> None:
    spec = load_object(str(corpus_build / "hello.bpf.o"))
    coll = Collection.load(spec, engine="jit", verifier="strict")
    for lp in coll.programs.values():
        reason = lp.executable.native_ineligible()
        if reason is None:
            continue
        with pytest.raises(NotSupportedError, match="native hit path"):
            lp.executable.native_entry()
        return
    pytest.fail("hello.bpf.o (printk) should have an ineligible program")


def test_ringbuf_records_drained_without_python_per_hit(corpus_build, tmp_path, capfd, monkeypatch) -> None:
    """Ring buffers are drained by the periodic poll and at exit: every record arrives, in order
    per thread, with the right pid/tgid from the C loop's facts block."""
    obj = _bpf_object(tmp_path, RINGBUF_C, "rb")
    rc, ev, err, runs = _run_cli(capfd, monkeypatch, corpus_build,
                                 [str(obj), "-f", "json", "-a", "emit=./counters:tick", "--", "./counters"])
    assert rc == 0, err
    assert runs == 0
    assert not ev.get("lost")
    recs = [bytes.fromhex(r["data"]) for r in ev["record"]]
    assert len(recs) == TICKS
    pid = ev["exit"][0]["pid"]
    tgids = {int.from_bytes(r[8:16], "little") >> 32 for r in recs}
    assert tgids == {pid}
    assert len({int.from_bytes(r[8:12], "little") for r in recs}) >= 2   # several target threads
