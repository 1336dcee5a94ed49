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
