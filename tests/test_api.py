"""The public Python API (``ubpf_py.BPFObject``): the README's examples run as written, both
backends give the same counts through the same calls, and the rules of a skeleton's life
(sizes and globals before load, target before load) hold."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_util import REPO

from ubpf_py import BPFObject
from ubpf_py.errors import UsageError
from ubpf_py.kernel.syscall import kernel_bpf_skip_reason

EXAMPLE = str(REPO / "ubpf_py" / "examples" / "allocs.bpf.c")
#: a target whose malloc() calls are the same on every run: 100 bytearrays of growing sizes
TARGET = ["python3", "-c", "b = [bytearray(n) for n in range(0, 300000, 3000)]"]

pytestmark = pytest.mark.skipif(shutil.which("clang") is None, reason="clang builds the examples")


def readme_python_blocks() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)\n```", section, re.S)


@pytest.mark.parametrize("index", range(2))
def test_readme_python_example_runs(index):
    blocks = readme_python_blocks()
    assert len(blocks) == 2
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.run([sys.executable, "-c", blocks[index]], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "Traceback" not in p.stderr


def _python3_calls(backend: str, by_offset: bool = False) -> tuple[int, list[int], dict]:
    """Mallocs of python3 counted through the API; ``by_offset``: attach at libc's file offset of
    malloc (an empty symbol makes the offset a file offset, libbpf's rule) instead of by name."""
    from ubpf_py.probe.resolve import resolve_binary
    from ubpf_py.probe.symbols import resolve_function

    with BPFObject.open(EXAMPLE, backend=backend) as obj:
        obj.launch(TARGET, stdout=subprocess.DEVNULL)
        obj.load()
        if by_offset:
            libc = resolve_binary("libc.so.6")
            link = obj.attach_uprobe("malloc_entry", binary=libc, offset=resolve_function(libc, "malloc"))
        else:
            link = obj.attach_uprobe("malloc_entry", binary="libc.so.6", sym="malloc")
            assert link.target == "uprobe libc.so.6:malloc+0 cookie=0"
        assert obj.run(duration=60) == 0
        counts = {k["comm"]: v for k, v in obj.maps["counts"].items()}
        raw = obj.maps["counts"].items(raw=True)
        assert all(isinstance(k, bytes) and len(k) == 20 and len(v) == 8 for k, v in raw)
        return counts["python3"], obj.maps["sizes"][0]["slots"], obj.globals.raw("min_size")


def test_both_backends_behind_one_api_agree():
    """The kernel is the oracle: the same calls on both backends count the same mallocs of the
    same process (the kernel also sees the /bin/sh gate's own mallocs, under comm 'sh'); the
    userspace side attaches by file offset, the kernel side by symbol."""
    reason = kernel_bpf_skip_reason()
    if reason:
        pytest.skip(reason)
    user = _python3_calls("userspace", by_offset=True)
    kern = _python3_calls("kernel")
    assert user[0] == kern[0] > 1000, (user[0], kern[0])
    assert user[2] == kern[2] == (65536).to_bytes(8, "little")


def test_sizes_and_globals_before_load_only(tmp_path):
    obj = BPFObject.open(EXAMPLE)
    try:
        counts = obj.maps["counts"]
        counts.max_entries = 1                     # one process fits; a second key would not
        with pytest.raises(UsageError):
            counts.value_size = 0
        obj.globals["min_size"] = 1 << 40          # no allocation is this big: no events
        with pytest.raises(UsageError, match="before load"):
            obj.load()                             # no target yet
        obj.launch(TARGET, stdout=subprocess.DEVNULL)
        obj.load()
        with pytest.raises(UsageError, match="before load"):
            counts.max_entries = 8
        with pytest.raises(UsageError, match="before load"):
            obj.globals["min_size"] = 1
        events = []
        obj.ring_buffer("events", events.append)
        obj.attach_uprobe("malloc_entry", binary="libc.so.6", sym="malloc")
        assert obj.run() == 0
        assert events == [] and obj.globals["big"] == 0 and obj.globals["min_size"] == 1 << 40
        assert len(counts) == 1 and counts.keys()[0]["comm"] == "python3"
        key = counts.keys(raw=True)[0]
        assert counts[key] == counts.values()[0] > 1000      # raw bytes index the decoded view
        with pytest.raises(KeyError):
            counts[bytes(20)]
        (hist,) = obj.maps["sizes"].histograms()                  # struct hist { slots[] }, by type
        assert hist.kind == "log2" and hist.slots == obj.maps["sizes"][0]["slots"]
        drawn = io.StringIO()
        obj.maps["sizes"].print_hist(file=drawn)
        assert drawn.getvalue().startswith("@sizes:\n") and re.search(r"^\[128K, 256K\)\s+\d+ \|@", drawn.getvalue(), re.M)
        assert obj.maps["counts"].histograms() == []
        obj.maps["sizes"].clear()
        assert sum(obj.maps["sizes"][0]["slots"]) == 0
    finally:
        obj.close()


def test_usdt_and_printk_through_the_api(corpus_build: Path, monkeypatch):
    """attach_usdt with a cookie (libbpf's spec ids) and the printk callback, on the corpus case."""
    monkeypatch.chdir(corpus_build)
    lines = []
    with BPFObject.open("usdt.bpf.o") as obj:
        obj.launch(["./usdt"], stdout=subprocess.DEVNULL)
        obj.load()
        obj.on_printk(lambda ev: lines.append(ev.message))
        links = obj.attach_auto()
        links.append(obj.attach_usdt("on_tick", binary="./usdt", provider="corpus", name="tick", cookie=77))
        assert sorted(link.program for link in links) == ["on_label", "on_tick"]
        assert obj.run() == 0
    assert "tick i=0 sq=1000000000000 cookie=77" in lines and "label alpha n=100 neg=0" in lines


@pytest.mark.parametrize("backend", ["userspace", "kernel"])
def test_perf_buffer_callback_and_uretprobe(corpus_build: Path, monkeypatch, backend):
    """attach_uretprobe + perf_buffer on the corpus readline case: 5 samples, decoded through the
    object's types (pid, comm, line), on both backends."""
    if backend == "kernel" and kernel_bpf_skip_reason():
        pytest.skip(kernel_bpf_skip_reason())
    monkeypatch.chdir(corpus_build)
    records = []
    with BPFObject.open("readline.bpf.o", backend=backend) as obj:
        pid = obj.launch(["./readline"], stdout=subprocess.DEVNULL)
        obj.load()
        obj.perf_buffer("events", records.append, lost=lambda *a: records.append(a))
        obj.attach_uretprobe("readline_ret", binary="./readline", sym="readline")
        assert obj.run() == 0
    assert len(records) == 5 and {r.kind for r in records} == {"perfbuf"}
    assert all(len(r.data) >= 100 and r.value["pid"] == pid and r.value["comm"] == "readline" for r in records)


def test_bad_calls_are_one_line_errors():
    obj = BPFObject.open(EXAMPLE)
    with pytest.raises(KeyError, match="maps: counts"):
        obj.maps["nope"]
    with pytest.raises(UsageError, match="no program 'nope'"):
        obj.attach_uprobe("nope", binary="libc.so.6", sym="malloc")
    with pytest.raises(UsageError, match="ringbuf"):
        obj.ring_buffer("counts", print)
    with pytest.raises(UsageError, match="unknown backend"):
        BPFObject(obj.spec, backend="gpu")
