"""ubpf-py's verifier against the kernel's on the kernel's own verifier test programs.

Run (root, clang, bpftool; downloads the Debian ``linux-source`` package once):
  python3 benchmarks/verifier_selftests.py [--src KERNEL_SOURCE_DIR] [--out DIR] [-v]

The hand-written edge cases in tools/testing/selftests/bpf/progs/verifier_*.c of a
recent kernel are rebuilt with every program section renamed ``uprobe`` (the
program type ubpf-py verifies for), each program is verified by ubpf-py and
loaded by the running kernel as a kprobe program, and the verdicts are compared.
The figure: agree / we accept where the kernel rejects (a safety problem once
programs run unchecked) / we reject where the kernel accepts.  The sources are
fetched at run time and never committed.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ubpf-py" / "linux-source"
PROGS = "tools/testing/selftests/bpf/progs"
LIBBPF = ROOT.parent / "shared" / "realworld" / "libbpf"
_KEEP = re.compile(r'^(\.maps|license|version|\.data.*|\.rodata.*|\.bss.*|\.struct_ops.*)$')


def fetch_source() -> Path:
    """The newest linux-source-X package's tree (only what the tests need), cached."""
    found = sorted(CACHE.glob("linux-source-*/" + PROGS))
    if found:
        return found[-1].parents[4]
    CACHE.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(["apt-cache", "search", "--names-only", "^linux-source-[0-9.]+$"],
                         capture_output=True, text=True, check=True).stdout
    pkgs = sorted((ln.split()[0] for ln in out.splitlines() if ln.strip()),
                  key=lambda p: [int(x) for x in p.rsplit("-", 1)[1].split(".")])
    if not pkgs:
        sys.exit("no linux-source-X package found (apt-get update?)")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["apt-get", "download", pkgs[-1]], cwd=tmp, check=True, capture_output=True)
        deb = next(Path(tmp).glob("*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), tmp + "/x"], check=True)
        tar = next(Path(tmp, "x/usr/src").glob("linux-source-*.tar.*"))
        top = tar.name.split(".tar")[0]
        subprocess.run(["tar", "-xf", str(tar), "-C", str(CACHE), "--wildcards", f"{top}/{PROGS}/*"],
                       check=True)
    return CACHE / top


def build(src: Path, out: Path) -> list[Path]:
    """Compile every verifier_*.c with program sections renamed 'uprobe'."""
    inc = out / "include"
    (inc / "bpf").mkdir(parents=True, exist_ok=True)
    for h in glob.glob(str(LIBBPF / "*.h")):
        shutil.copy(h, inc / "bpf")
    if not (inc / "vmlinux.h").exists():
        with open(inc / "vmlinux.h", "w") as f:
            subprocess.run(["bpftool", "btf", "dump", "file", "/sys/kernel/btf/vmlinux", "format", "c"],
                           stdout=f, check=True)
    progs = src / PROGS
    objs = []
    for c in sorted(progs.glob("verifier_*.c")):
        text = c.read_text()
        text = re.sub(r'SEC\("([^"]*)"\)',
                      lambda m: m.group(0) if _KEEP.match(m.group(1)) else 'SEC("uprobe")', text)
        tmp = out / c.name
        tmp.write_text(text)
        obj = out / (c.stem + ".bpf.o")
        r = subprocess.run(["clang", "-O2", "-g", "-target", "bpf", "-D__TARGET_ARCH_x86", "-mcpu=v3",
                            f"-I{inc}", f"-I{progs}", f"-I{progs.parent}", "-idirafter",
                            "/usr/include/x86_64-linux-gnu", "-Wno-everything", "-c", str(tmp), "-o", str(obj)],
                           capture_output=True, text=True)
        if r.returncode == 0:
            objs.append(obj)
    return objs


def compare(objs: list[Path], verbose: bool) -> Counter:
    import warnings

    from ubpf_py.errors import KernelBackendError, UbpfError
    from ubpf_py.kernel.loader import load_collection
    from ubpf_py.obj.elf import load_object
    from ubpf_py.verifier import verify_program

    warnings.simplefilter("ignore")
    tally: Counter = Counter()
    for path in objs:
        try:
            spec = load_object(str(path))
        except UbpfError as e:
            tally["object not loadable"] += 1
            if verbose:
                print(f"skip {path.name}: {e}")
            continue
        # the kernel side loads one program at a time: no static prog-array slots to fill
        kspec = dataclasses.replace(spec, maps=[dataclasses.replace(m, init_slots={}) for m in spec.maps])
        for name, prog in spec.programs.items():
            try:
                coll = load_collection(kspec, programs=[name])
                coll.close()
                kok, kerr = True, ""
            except KernelBackendError as e:
                kok, kerr = False, (e.log.strip().splitlines() or [str(e)])[-2 if e.log else -1]
            except UbpfError:
                tally["kernel load error"] += 1
                continue
            rep = verify_program(prog, spec.maps, mode="warn", btf=spec.btf, time_budget=10)
            if rep.ok == kok:
                tally["agree"] += 1
            elif rep.ok:
                tally["we accept, kernel rejects"] += 1
                print(f"UNSAFE {path.stem}:{name}: kernel: {kerr}")
            else:
                tally["we reject, kernel accepts"] += 1
                if verbose:
                    print(f"FALSE-REJECT {path.stem}:{name}: {rep.error}")
    return tally


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, help="kernel source tree (default: fetch linux-source)")
    ap.add_argument("--out", type=Path, help="build directory (default: a temporary one)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root: programs are loaded into the kernel verifier")
    src = args.src or fetch_source()
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        objs = build(src, out)
        tally = compare(objs, args.verbose)
    total = tally["agree"] + tally["we accept, kernel rejects"] + tally["we reject, kernel accepts"]
    print(f"\n{len(objs)} objects, {total} programs compared: agree {tally['agree']} "
          f"({tally['agree'] / max(1, total):.1%}), we accept where the kernel rejects "
          f"{tally['we accept, kernel rejects']}, we reject where the kernel accepts "
          f"{tally['we reject, kernel accepts']}; {dict(tally)}")
    return 1 if tally["we accept, kernel rejects"] else 0


if __name__ == "__main__":
    sys.exit(main())
