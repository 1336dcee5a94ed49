"""Program type and attach point from an ELF section name, by libbpf's rules.

libbpf matches ``SEC("type+")`` definitions as: the exact name ``type`` or
``type/extras``.  For the probe types ubpf-py runs:

* ``uprobe[.s]`` / ``uretprobe[.s]``: ``%[^/]/%[^:]:%[^\\n]`` = TYPE/BINARY:FUNC,
  FUNC may end in ``+OFFSET`` (strtol base 0); uretprobes cannot take an offset.
* ``uprobe.multi[.s]`` / ``uretprobe.multi[.s]``: TYPE/BINARY:GLOB.
* ``usdt``: bare, or ``usdt/BINARY:PROVIDER:NAME``.

libbpf matches the section *type* when it opens the object and parses the
target only when it auto-attaches.  So every ``uprobe+``/``usdt+`` section
loads (``uprobe/do_handshake``, ``uretprobe/readline``, ``usdt.s``, a
``uretprobe`` with an offset ...); the ones whose text is not a valid target
carry :attr:`SectionInfo.attach_error` (libbpf's auto-attach failure, raised
only when such a program is auto-attached) and the label after the type
(:attr:`SectionInfo.label`, e.g. ``readline``) that ``--attach PROG=BINARY``
uses as the function name, as a loader attaching by hand would.
* ``kprobe/FUNC[+OFF]`` / ``kretprobe/FUNC``: accepted and run as uprobes (kind
  stays ``kprobe``/``kretprobe``; the binary must be given when attaching).

Every other libbpf program type (tracepoint, xdp, fentry, ...) is recognised so
that it can be reported as skipped with a reason; unknown names are skipped as
"unknown program type".  A leading ``?`` (libbpf's "do not auto-load") is
stripped and reported through :attr:`SectionInfo.autoload`.

Skipping is reported with :mod:`warnings` (category :class:`SkippedProgramWarning`)
so library users can filter or escalate it, and the CLI can print it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ubpf_py.errors import ObjectLoadError
from ubpf_py.obj.spec import AttachPoint


class SkippedProgramWarning(UserWarning):
    """A program section whose type ubpf-py does not run (tracepoint, xdp, ...)."""


@dataclass(frozen=True)
class SectionInfo:
    kind: str
    sleepable: bool = False
    multi: bool = False
    attach: AttachPoint | None = None
    multi_pattern: str = ""
    autoload: bool = True
    #: why libbpf's auto-attach of this section fails ("" when it attaches or is bare)
    attach_error: str = ""
    #: text after ``TYPE/`` when it names no complete target (``readline`` in ``uretprobe/readline``)
    label: str = ""


# (prefix, kind, sleepable, multi) for the types we run; "+"-matching (exact or
# followed by "/") keeps "uprobe" from matching "uprobe.multi/..."
_RUNNABLE = [
    ("uretprobe.multi.s", "uretprobe", True, True),
    ("uprobe.multi.s", "uprobe", True, True),
    ("uretprobe.multi", "uretprobe", False, True),
    ("uprobe.multi", "uprobe", False, True),
    ("uretprobe.s", "uretprobe", True, False),
    ("uprobe.s", "uprobe", True, False),
    ("uretprobe", "uretprobe", False, False),
    ("uprobe", "uprobe", False, False),
    ("usdt.s", "usdt", True, False),
    ("usdt", "usdt", False, False),
    ("kretprobe", "kretprobe", False, False),
    ("kprobe", "kprobe", False, False),
]

# libbpf section_defs entries of program types ubpf-py does not run:
# (name, is "+"-style (exact or with "/extras"), program type)
_OTHER_TYPES = [
    ("socket", True, "socket_filter"), ("sk_reuseport", True, "sk_reuseport"),
    ("kprobe.multi", True, "kprobe_multi"), ("kretprobe.multi", True, "kprobe_multi"),
    ("kprobe.session", True, "kprobe_session"), ("uprobe.session", True, "uprobe_session"),
    ("uprobe.session.s", True, "uprobe_session"),
    ("ksyscall", True, "ksyscall"), ("kretsyscall", True, "ksyscall"),
    ("tc", True, "sched_cls"), ("tcx", True, "sched_cls"), ("classifier", True, "sched_cls"),
    ("action", True, "sched_act"), ("netkit", True, "sched_cls"),
    ("tracepoint", True, "tracepoint"), ("tp", True, "tracepoint"),
    ("tracepoint.s", True, "tracepoint"), ("tp.s", True, "tracepoint"),
    ("raw_tracepoint", True, "raw_tracepoint"), ("raw_tp", True, "raw_tracepoint"),
    ("raw_tracepoint.s", True, "raw_tracepoint"), ("raw_tp.s", True, "raw_tracepoint"),
    ("raw_tracepoint.w", True, "raw_tracepoint_writable"), ("raw_tp.w", True, "raw_tracepoint_writable"),
    ("tp_btf", True, "tracing"), ("tp_btf.s", True, "tracing"),
    ("fentry", True, "tracing"), ("fexit", True, "tracing"), ("fmod_ret", True, "tracing"),
    ("fentry.s", True, "tracing"), ("fexit.s", True, "tracing"), ("fmod_ret.s", True, "tracing"),
    ("fsession", True, "tracing"), ("fentry.multi", True, "tracing"), ("fexit.multi", True, "tracing"),
    ("freplace", True, "ext"), ("lsm", True, "lsm"), ("lsm.s", True, "lsm"), ("lsm_cgroup", True, "lsm"),
    ("iter", True, "tracing"), ("iter.s", True, "tracing"), ("syscall", False, "syscall"),
    ("xdp.frags", True, "xdp"), ("xdp", True, "xdp"), ("xdp_devmap", True, "xdp"),
    ("xdp_cpumap", True, "xdp"), ("perf_event", False, "perf_event"),
    ("lwt_in", False, "lwt_in"), ("lwt_out", False, "lwt_out"), ("lwt_xmit", False, "lwt_xmit"),
    ("lwt_seg6local", False, "lwt_seg6local"), ("sockops", False, "sock_ops"),
    ("sk_skb", True, "sk_skb"), ("sk_msg", False, "sk_msg"), ("lirc_mode2", False, "lirc_mode2"),
    ("flow_dissector", False, "flow_dissector"), ("cgroup_skb", True, "cgroup_skb"),
    ("cgroup", True, "cgroup"), ("struct_ops", True, "struct_ops"), ("struct_ops.s", True, "struct_ops"),
    ("sk_lookup", False, "sk_lookup"), ("netfilter", False, "netfilter"),
]


def parse_strtol(text: str) -> int | None:
    """C ``strtol(text, &end, 0)`` that must consume the whole string (sign, 0x, octal)."""
    m = re.fullmatch(r"\s*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)", text)
    if not m:
        return None
    sign, digits = m.groups()
    if digits[:2].lower() == "0x":
        v = int(digits, 16)
    elif digits.startswith("0") and len(digits) > 1:
        v = int(digits, 8)
    else:
        v = int(digits, 10)
    return -v if sign == "-" else v


def _match_plus(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + "/")


def classify_section(section: str) -> SectionInfo | str:
    """SectionInfo for a runnable probe section, else the reason it is skipped.

    Never raises for a probe type: a malformed target is recorded in
    ``attach_error`` (libbpf refuses it only at auto-attach).
    """
    autoload = True
    name = section
    if name.startswith("?"):
        autoload = False
        name = name[1:]
    for prefix, kind, sleepable, multi in _RUNNABLE:
        if not _match_plus(name, prefix):
            continue
        try:
            attach, pattern = _parse_attach(section, name, prefix, kind, multi)
        except ObjectLoadError as e:
            plain_uprobe = kind in ("uprobe", "uretprobe") and not multi
            return SectionInfo(kind, sleepable, multi, None, "", autoload, attach_error=str(e),
                               label=name[len(prefix) + 1:].split(":")[0] if plain_uprobe else "")
        return SectionInfo(kind, sleepable, multi, attach, pattern, autoload)
    for other, plus, ptype in _OTHER_TYPES:
        if (_match_plus(name, other) if plus else name == other):
            return f"program type {ptype} (section '{section}') is not a uprobe type"
    return f"unknown program type for section '{section}'"


def _bad(section: str, why: str) -> ObjectLoadError:
    return ObjectLoadError(f"section '{section}': {why}")


def _parse_attach(section: str, name: str, prefix: str, kind: str,
                  multi: bool) -> tuple[AttachPoint | None, str]:
    """The target a section names, as libbpf's auto-attach parses it (sscanf rules).

    Returns (None, "") when the section names no target (auto-attach is then
    skipped, as libbpf does); raises ObjectLoadError when libbpf's auto-attach
    would fail (the caller keeps that as ``attach_error``, not a load error).
    """
    if name == prefix:
        return None, ""
    rest = name[len(prefix) + 1:]
    if kind in ("kprobe", "kretprobe"):
        m = re.fullmatch(r"([A-Za-z0-9_.]+)(?:\+(.*))?", rest)
        if not m:
            raise _bad(section, "invalid function name; expected kprobe/FUNC[+OFFSET]")
        off = 0
        if m.group(2) is not None:
            v = parse_strtol(m.group(2))
            if v is None or v < 0:
                raise _bad(section, "kprobe offset must be a non-negative integer")
            off = v
        if kind == "kretprobe" and off:
            raise _bad(section, "kretprobes do not support an offset; drop '+OFFSET'")
        return AttachPoint(binary="", function=m.group(1), offset=off), ""
    if kind == "usdt":
        # "usdt/%m[^:]:%m[^:]:%m[^:]": three non-empty fields, anything after a 4th ':' ignored
        parts = rest.split(":")
        if len(parts) < 3 or not all(parts[:3]):
            raise _bad(section, 'expected SEC("usdt/<path>:<provider>:<name>")')
        return AttachPoint(binary=parts[0], usdt_provider=parts[1], usdt_name=parts[2]), ""
    # uprobe family: "%m[^/]/%m[^:]:%m[^\n]" -- BINARY stops at the first ':'
    binary, sep, func = rest.partition(":")
    if not binary:
        return None, ""  # sscanf matched only the type: valid, no auto-attach
    if not sep or not func:
        raise _bad(section, "missing ':function[+offset]' after the binary path")
    if multi:
        return AttachPoint(binary=binary, function=func), func
    off = 0
    plus = func.rfind("+")
    if plus >= 0:
        v = parse_strtol(func[plus + 1:])
        if v is not None and not func[plus + 1:].startswith((" ", "\t")):
            off = v
            func = func[:plus]
    if kind == "uretprobe" and off:
        raise _bad(section, "uretprobes do not support an offset; drop '+OFFSET'")
    if off < 0:
        raise _bad(section, "offset must be non-negative")
    return AttachPoint(binary=binary, function=func, offset=off), ""
