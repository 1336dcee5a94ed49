"""Shared by the edge-case and fuzz tests: turn a hang into a failure."""

from __future__ import annotations

import contextlib
import faulthandler
import sys


@contextlib.contextmanager
def no_hang(seconds: float):
    """Fail loudly instead of hanging: after ``seconds`` every thread's stack is printed and
    the test process exits (pytest reports the test as crashed).  Only for code that must
    never block that long; the limit is generous so a loaded machine does not trip it."""
    faulthandler.dump_traceback_later(seconds, exit=True, file=sys.__stderr__)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
