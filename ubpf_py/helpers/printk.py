"""bpf_trace_printk (6), bpf_snprintf (165) and bpf_trace_vprintk (177).

Formatting rules live in ``printk_format``; this module reads the program's
arguments, applies each helper's own checks and return value, and hands trace
messages to ``env.printk(hit, text)`` (the runtime's trace_pipe).  With no
``env.printk`` set the message is formatted and counted but goes nowhere, like
trace_printk with tracing off.
"""

from __future__ import annotations

import struct

from ubpf_py.helpers import printk_format as pf
from ubpf_py.helpers.context import HelperContext
from ubpf_py.vm.env import HelperFn

EINVAL = 22


def bind(hc: HelperContext, table: dict[int, HelperFn]) -> None:
    env = hc.env
    mem = env.memory

    def read_str(addr: int, kind: str, bufsz: int) -> bytes | None:
        if kind == "k":
            return hc.kernel_str(addr, bufsz)
        if kind == "u":
            return hc.user_str(addr, bufsz)
        return hc.any_str(addr, bufsz)

    def restricted() -> bool:
        return env.hit.uid != 0

    def emit(res: pf.FormatResult) -> int:
        if res.error:
            return res.error
        ret, text = pf.printk_message(res.output)
        if env.printk is not None:
            env.printk(env.hit, text)
        return ret

    def _varargs(args_addr: int, data_len: int) -> list[int] | int:
        if data_len & 7 or data_len > pf.MAX_BPRINTF_VARARGS * 8 or (data_len and not args_addr):
            return -EINVAL
        raw = mem.read(args_addr, data_len) if data_len else b""
        return list(struct.unpack(f"<{data_len // 8}Q", raw))

    def trace_printk(r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
        fmt = mem.read(r1, r2 & 0xFFFFFFFF)
        res = pf.format_fixed(fmt, (r3, r4, r5), pf.MAX_TRACE_PRINTK_VARARGS, read_str,
                              hc.kernel_read, restricted())
        return emit(res)

    def trace_vprintk(r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
        args = _varargs(r3, r4 & 0xFFFFFFFF)
        if isinstance(args, int):
            return args
        fmt = mem.read(r1, r2 & 0xFFFFFFFF)
        res = pf.format_fixed(fmt, args, len(args), read_str, hc.kernel_read, restricted())
        return emit(res)

    def snprintf(r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
        size = r2 & 0xFFFFFFFF
        args = _varargs(r4, r5 & 0xFFFFFFFF)
        if isinstance(args, int):
            return args
        res = pf.bprintf(hc.c_string(r3), args, len(args), read_str, hc.kernel_read, restricted())
        if res.error:
            return res.error
        if size:
            out = res.output[:size - 1] + b"\0"
            mem.write(r1, out)
        return len(res.output) + 1

    table.update({6: trace_printk, 165: snprintf, 177: trace_vprintk})
