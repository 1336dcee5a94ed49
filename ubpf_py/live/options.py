"""What one ``ubpf-run`` tracing run was asked to do, as plain data.

The CLI builds a :class:`RunOptions` from its command line; everything below the
CLI (the runner, both backends) reads this object and never an argparse
namespace, so the same run can be started from Python or a test without
spelling a command line.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RunOptions:
    """One tracing run.  Defaults are the CLI's defaults."""

    #: the BPF object (``.o``) or C source (``.bpf.c``, compiled with clang first)
    object: str
    #: trace this running process ...
    pid: int | None = None
    #: ... or start this command (stopped before ``main`` until the probes are in)
    command: list[str] = field(default_factory=list)
    #: ``PROG=BINARY:FUNC[+OFF][@COOKIE]`` / ``PROG=BINARY:PROVIDER:NAME[@COOKIE]``
    attach: list[str] = field(default_factory=list)
    #: attach programs whose section names a target
    auto_attach: bool = True
    #: ``NAME=VALUE`` globals written before load (``$PID`` = the traced pid)
    sets: list[str] = field(default_factory=list)
    duration: float | None = None
    follow_forks: bool = False
    backend: str = "userspace"
    engine: str = "jit"
    #: let eligible JIT programs run from the C stop loop
    native_hits: bool = True
    #: where programs run on a hit: "auto" (in the target where possible), "intarget", "ptrace"
    mode: str = "auto"
    #: per-hit budget of programs the verifier did not accept (``vm.budget``; 0 = unbounded)
    max_insns: int = 1_000_000
    #: a command started with ``command`` keeps running when the session ends
    keep_command: bool = False
    check_memory: bool = True
    verifier: str = "strict"
    verifier_log: bool = False
    #: "text" or "json"
    format: str = "text"
    #: output file (None: stdout)
    output: str | None = None
    #: BTF struct to decode ring/perf records with
    event_type: str | None = None
    verbose: bool = False
    #: print maps every this many seconds while tracing (None: only at exit)
    interval: float | None = None
    #: clear the printed maps after each interval print (libbpf-tools' default)
    clear: bool = False
    #: serve maps as Prometheus metrics on this HOST:PORT
    metrics: str | None = None
    #: map name -> "log2" | "linear": draw this map as a histogram whatever its type says
    hist: dict[str, str] = field(default_factory=dict)
