"""Where the shared corpus, the conformance suite and the corpus build live.

``../shared`` sits next to the project root (override with UBPF_SHARED); the
corpus is built once into ``.corpus-build`` (override with UBPF_CORPUS_BUILD).
"""

from __future__ import annotations

import fcntl
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("UBPF_SHARED", REPO.parent / "shared")).resolve()
CORPUS = SHARED / "corpus"
CONFORMANCE = SHARED / "conformance" / "bpf_conformance"
BUILD = Path(os.environ.get("UBPF_CORPUS_BUILD", REPO / ".corpus-build")).resolve()
REALWORLD = SHARED / "realworld"
#: where realworld/build.sh writes its objects (a cache dir outside the shared folder)
REALWORLD_BUILD = Path(os.environ.get("UBPF_REALWORLD_BUILD", REPO / ".realworld-build")).resolve()


def build_corpus() -> Path:
    """Build the corpus into BUILD once (safe under pytest-xdist: a file lock
    serialises workers, and a stamp file marks a finished build)."""
    BUILD.mkdir(parents=True, exist_ok=True)
    stamp = BUILD / ".built"
    with open(BUILD / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not stamp.exists():
            subprocess.run(["bash", str(CORPUS / "build.sh"), str(BUILD)], check=True,
                           stdout=subprocess.DEVNULL)
            stamp.write_text("ok\n")
    return BUILD


def build_realworld() -> Path:
    """Build ``../shared/realworld`` with its build.sh into REALWORLD_BUILD once (locked like
    the corpus).  Objects the system headers cannot build are simply absent (build.sh says so)."""
    REALWORLD_BUILD.mkdir(parents=True, exist_ok=True)
    stamp = REALWORLD_BUILD / ".built"
    with open(REALWORLD_BUILD / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not stamp.exists():
            r = subprocess.run(["bash", str(REALWORLD / "build.sh"), str(REALWORLD_BUILD)],
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"realworld/build.sh failed: {r.stdout[-500:]}")
            stamp.write_text(r.stdout)
    return REALWORLD_BUILD
