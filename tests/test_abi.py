"""The one-ABI rule: runtime/ubpf_abi.h is exactly what ubpf_py/abi generates, and C agrees."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from ubpf_py.abi.__main__ import c_header
from ubpf_py.abi.kernel import PT_REGS

REPO = Path(__file__).resolve().parents[1]


def test_committed_header_is_generated():
    assert (REPO / "runtime" / "ubpf_abi.h").read_text() == c_header(), \
        "regenerate with: python -m ubpf_py.abi > runtime/ubpf_abi.h"


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_header_static_asserts_hold_in_c(tmp_path):
    src = tmp_path / "t.c"
    src.write_text('#include "ubpf_abi.h"\nint f(void) { return 0; }\n')
    p = subprocess.run(["cc", "-ffreestanding", "-c", "-I", str(REPO / "runtime"), str(src),
                        "-o", str(tmp_path / "t.o")], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def test_pt_regs_is_the_kernel_layout():
    assert PT_REGS.size == 168
    assert PT_REGS.off("rip") == 16 * 8 and PT_REGS.off("rsp") == 19 * 8 and PT_REGS.off("rdi") == 14 * 8
