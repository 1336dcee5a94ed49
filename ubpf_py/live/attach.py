"""Which program goes where: attach requests from section names and ``--attach``.

A request is still symbolic (binary name, function or USDT probe, offset,
cookie).  Turning it into a file offset and runtime addresses is the probe
engine's side (``ubpf_py.probe``); this module only parses and plans, so the
userspace and kernel backends share it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ubpf_py.errors import UsageError
from ubpf_py.obj.spec import ObjectSpec, ProgramSpec

ENTRY_KINDS = {"uprobe", "kprobe"}
RETURN_KINDS = {"uretprobe", "kretprobe"}


@dataclass
class AttachRequest:
    """One program on one attach point."""

    program: str
    binary: str
    function: str = ""
    offset: int = 0
    retprobe: bool = False
    cookie: int = 0
    #: (provider, name) for USDT probes
    usdt: tuple[str, str] | None = None
    #: "section" when derived from the section name, "option" for --attach
    origin: str = "option"
    #: uprobe.multi: ``function`` is a glob (``expand_multi`` turns it into one request per match)
    multi: bool = False

    def describe(self) -> str:
        """The attach point in the kernel oracle's words (``uprobe ./hello:add+0 cookie=0``)."""
        if self.usdt:
            return f"usdt {self.binary}:{self.usdt[0]}:{self.usdt[1]} cookie={self.cookie}"
        kind = "uretprobe" if self.retprobe else "uprobe"
        return f"{kind} {self.binary}:{self.function}+{self.offset} cookie={self.cookie}"


_ATTACH_RE = re.compile(r"^(?P<prog>[A-Za-z_][\w.]*)=(?P<rest>.+)$")


def parse_attach_option(text: str, spec: ObjectSpec) -> AttachRequest:
    """Parse ``PROGRAM=BINARY:FUNCTION[+OFFSET][@COOKIE]`` (or, for USDT programs,
    ``PROGRAM=BINARY:PROVIDER:NAME[@COOKIE]``) against the object's programs."""
    m = _ATTACH_RE.match(text)
    if not m:
        raise UsageError(f"bad --attach {text!r}: expected PROGRAM=BINARY:FUNCTION[+OFFSET][@COOKIE]")
    prog_name, rest = m.group("prog"), m.group("rest")
    prog = spec.programs.get(prog_name)
    if prog is None:
        raise UsageError(f"bad --attach {text!r}: the object has no program {prog_name!r} "
                         f"(programs: {', '.join(spec.programs) or 'none'})")
    cookie = 0
    if "@" in rest:
        rest, _, cookie_text = rest.rpartition("@")
        try:
            cookie = int(cookie_text, 0)
        except ValueError:
            raise UsageError(f"bad --attach {text!r}: cookie {cookie_text!r} is not a number") from None
    if prog.kind == "usdt":
        parts = rest.rsplit(":", 2)
        if len(parts) != 3 or not all(parts):
            raise UsageError(f"bad --attach {text!r}: USDT program {prog_name} needs BINARY:PROVIDER:NAME")
        return AttachRequest(prog_name, parts[0], cookie=cookie, usdt=(parts[1], parts[2]))
    binary, sep, func = rest.rpartition(":")
    if not sep and prog.attach_label and prog.kind in ENTRY_KINDS | RETURN_KINDS:
        # SEC("uretprobe/readline") + --attach printret=/bin/bash: the label is the function,
        # as a loader calling bpf_program__attach_uprobe(prog, ..., "/bin/bash", "readline") does
        binary, sep, func = rest, ":", prog.attach_label
    if not sep or not binary or not func:
        raise UsageError(f"bad --attach {text!r}: expected PROGRAM=BINARY:FUNCTION[+OFFSET][@COOKIE]")
    offset = 0
    if "+" in func:
        func, _, off_text = func.partition("+")
        try:
            offset = int(off_text, 0)
        except ValueError:
            raise UsageError(f"bad --attach {text!r}: offset {off_text!r} is not a number") from None
    if prog.kind not in ENTRY_KINDS | RETURN_KINDS:
        raise UsageError(f"bad --attach {text!r}: program {prog_name} is a {prog.kind} program, "
                         f"not a uprobe")
    multi = prog.multi and any(c in func for c in "*?")
    return AttachRequest(prog_name, binary, func, offset, prog.kind in RETURN_KINDS, cookie, multi=multi)


def plan_attachments(spec: ObjectSpec, explicit: list[AttachRequest], auto: bool = True) -> list[AttachRequest]:
    """Explicit requests plus (when ``auto``) every program whose section names its target.

    Programs given explicitly are not auto-attached again.  Bare ``SEC("uprobe")``
    programs without an explicit request are simply not attached (as libbpf).  A
    program whose section libbpf cannot auto-attach (``uretprobe/readline``) is an
    error naming the program and the fix, as the skeleton's attach fails in libbpf.
    """
    plan = list(explicit)
    named = {r.program for r in explicit}
    if auto:
        for name, prog in spec.programs.items():
            if name in named or not prog.autoload:
                continue
            if prog.attach_error:
                raise UsageError(f"program {name} cannot be auto-attached: {prog.attach_error}; attach it by hand "
                                 f"with --attach {name}=BINARY{_target_hint(prog)}"
                                 f" or turn it off with --no-autoload {name}")
            if prog.attach is None:
                continue
            ap = prog.attach
            if prog.kind == "usdt":
                plan.append(AttachRequest(name, ap.binary, usdt=(ap.usdt_provider, ap.usdt_name),
                                          origin="section"))
            elif prog.kind in ENTRY_KINDS | RETURN_KINDS:
                plan.append(AttachRequest(name, ap.binary, ap.function, ap.offset,
                                          prog.kind in RETURN_KINDS, origin="section", multi=prog.multi))
    return plan


def expand_multi(plan: list[AttachRequest], pid: int | None, cwd: str | None = None,
                 exe: str | None = None) -> list[AttachRequest]:
    """uprobe.multi requests -> one request per function matching the glob (libbpf's
    ``elf_resolve_pattern_offsets`` rules, ``probe.symbols.match_functions``); several
    symbols at one offset (aliases) attach once.  No match is an error, as in libbpf."""
    from ubpf_py.errors import SymbolError
    from ubpf_py.probe import resolve, symbols

    out: list[AttachRequest] = []
    for req in plan:
        if not req.multi:
            out.append(req)
            continue
        path = resolve.resolve_binary(req.binary, pid=pid, cwd=cwd, exe=exe)
        seen: set[int] = set()
        for name, off in symbols.match_functions(path, req.function):
            if off not in seen:
                seen.add(off)
                out.append(AttachRequest(req.program, req.binary, name, 0, req.retprobe, req.cookie,
                                         origin=req.origin))
        if not seen:
            raise SymbolError(f"program {req.program}: no function in {path} matches {req.function!r} "
                              f"(list them with: ubpf-run --list 'uprobe:{req.binary}:*')")
    return out


def _target_hint(prog: ProgramSpec) -> str:
    if prog.kind == "usdt":
        return ":PROVIDER:NAME"
    return "" if prog.attach_label else ":FUNCTION"
