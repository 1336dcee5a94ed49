"""Kernel BPF helper names by id (enum bpf_func_id, <linux/bpf.h>), for error messages.

Derived from ``protos.HELPER_NAMES_BY_ID``, the one table of names (the verifier's
messages use it and are checked against the kernel's, tests/test_mutation_kills_helpers.py):
a second hand-written copy could drift unnoticed.
"""

from __future__ import annotations

from ubpf_py.helpers.protos import HELPER_NAMES_BY_ID

HELPER_NAMES: dict[int, str] = {i: "bpf_" + n for i, n in enumerate(HELPER_NAMES_BY_ID) if i}
