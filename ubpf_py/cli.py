"""``ubpf-run``: run a libbpf-style uprobe object against a process, without kernel BPF.

Every failure a user can cause ends as one line ``ubpf-run: error: ...`` and a
documented exit code; tracebacks are shown only with ``--debug``.
"""

from __future__ import annotations

import argparse
import signal
import sys
import traceback
import warnings
from collections.abc import Sequence

from ubpf_py.errors import NoProgramError, UbpfError, UsageError
from ubpf_py.live.options import RunOptions

EXIT_CODES = """exit codes (the same for --check, runs and --backend kernel):
  0   success (the target's own exit status is reported, not returned)
  1   runtime error (a program fault or runaway program, a helper failure while running)
  2   the object cannot be loaded (not a BPF ELF, bad relocation, BTF, no runnable program)
  3   a program was rejected (verifier -- ours or the kernel's --, unknown helper)
  4   attaching failed (no such pid, permission, missing symbol or binary)
  5   the kernel backend failed (bpf() or perf_event_open refused, other than 3 and 6)
  6   a map cannot be created (bad definition, or more memory than --map-memory-limit)
  64  bad command line
  70  internal error (a bug in ubpf-run: please report it with --debug output)
  130 interrupted before tracing started
"""

EXAMPLES = """examples:
  ubpf-run hello.bpf.o -- ./hello                 trace a new process (auto-attach from SEC names)
  ubpf-run prog.o --pid 1234                      attach to a running process
  ubpf-run prog.o --attach add_entry=./hello:add -- ./hello
  ubpf-run prog.o --attach multi=./app:f+4@0x100 --pid 1234   offset and cookie
  ubpf-run funclat.bpf.o --set 'targ_tgid=$PID' -- ./funclat
  ubpf-run prog.o --format json -o events.jsonl -- ./app      machine-readable output
  ubpf-run --check prog.o                         verify every program; no target, no privileges
  ubpf-run dump prog.o [-j]                       programs (disassembly + source), maps, globals, BTF
  ubpf-run prog.bpf.c -i 1 -- ./app               compile with clang, print the maps every second
  ubpf-run prog.o --metrics 127.0.0.1:9435 --pid 1234   serve the maps to Prometheus
  ubpf-run --list 'uprobe:./app:*alloc*'          list probe-able functions (also --list PATTERN --pid N)
  ubpf-run prog.o --backend kernel -- ./app       the same object in the kernel (needs root)
"""


class _Parser(argparse.ArgumentParser):
    """argparse with our exit code for a bad command line (64, not argparse's 2, which
    --help documents as "object cannot be loaded") and our one-line error format."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see ubpf-run --help)")


def _count(text: str) -> int:
    n = int(text, 0)
    if n < 0:
        raise ValueError(text)
    return n


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="ubpf-run",
        usage="ubpf-run OBJECT.o|SOURCE.bpf.c [--pid PID | -- COMMAND [ARGS...]] [options]\n"
              "       ubpf-run --check OBJECT.o\n       ubpf-run --list 'uprobe:BINARY:PATTERN'\n"
              "       ubpf-run dump OBJECT.o [-j]",
        description="Run unmodified libbpf-style uprobe BPF objects in userspace (ptrace + JIT), "
                    "printing bpf_printk lines, ring/perf buffer events and maps like the kernel tools.",
        epilog=EXAMPLES + "\n" + EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("object", nargs="?", help="BPF object file (clang -target bpf), or a .c source to compile")
    p.add_argument("-p", "--pid", type=int, help="attach to this running process")
    p.add_argument("-a", "--attach", action="append", default=[], metavar="PROG=BINARY:FUNC[+OFF][@COOKIE]",
                   help="attach a program (repeatable); USDT programs take BINARY:PROVIDER:NAME")
    p.add_argument("--no-auto", action="store_true",
                   help="do not auto-attach programs from their section names")
    p.add_argument("--map-size", "--resize", action="append", default=[], metavar="MAP.FIELD=N",
                   help="resize a map before load like bpf_map__set_*: FIELD is max_entries, value_size "
                        "or key_size (repeatable; MAP.max_entries=N,value_size=M)")
    p.add_argument("--cgroup-map", action="append", default=[], metavar="MAP[INDEX]=CGROUP_DIR",
                   help="put a cgroup v2 directory in a CGROUP_ARRAY slot (as a loader's -c PATH does)")
    p.add_argument("--no-autoload", action="append", default=[], metavar="PROG",
                   help="do not load or attach this program (bpf_program__set_autoload(false))")
    p.add_argument("-s", "--set", action="append", default=[], metavar="NAME=VALUE",
                   help="set a global before load (numbers, strings, $PID for the traced pid)")
    p.add_argument("-d", "--duration", type=float, help="stop tracing after this many seconds")
    p.add_argument("--follow-forks", action="store_true", help="also trace children the target forks")
    p.add_argument("--keep-command", action="store_true",
                   help="let a command started with -- CMD run on when the session ends (default: it "
                        "ends with the session: SIGTERM, then SIGKILL after 2 s; a note says which). "
                        "Ctrl-C in a terminal reaches the command too: it shares our process group")
    p.add_argument("--engine", choices=["jit", "interp"], default="jit", help="execution engine (default jit)")
    p.add_argument("--mode", choices=["auto", "intarget", "ptrace"], default="auto",
                   help="where programs run on a hit: auto (default) = inside the target, entered from a "
                        "patched jump with no stop, wherever the program and the site allow it, else "
                        "through ptrace; intarget = the same, but a probe that cannot run in the target "
                        "is an error; ptrace = every hit stops the target (int3) and runs in the tracer")
    p.add_argument("--no-native-hits", action="store_true",
                   help="run every probe hit through Python even when the JIT program could run from "
                        "the C stop loop (also UBPF_NATIVE_HITS=0)")
    p.add_argument("--approx-facts", action="store_true",
                   help="per-hit CPU, uid/gid and thread name approximated (tracer's CPU, cached at first hit) "
                        "instead of read from /proc on every hit (5-11 us per hit)")
    p.add_argument("--no-memory-checks", action="store_true",
                   help="JIT without runtime memory checks (trust the verifier)")
    p.add_argument("--verifier", choices=["strict", "warn", "off"], default="strict",
                   help="strict: reject unsafe programs (default); warn: log and run; off")
    p.add_argument("--verifier-log", action="store_true", help="print the full verifier log")
    p.add_argument("--max-insns", type=_count, default=1_000_000, metavar="N",
                   help="per-hit budget of programs the verifier did not accept (--verifier warn|off): "
                        "instructions on the interpreter, backward jumps in JIT code; a program using it "
                        "up is stopped with a fault naming it and the instruction (default 1000000, "
                        "0 = unbounded; verified programs have no budget and pay nothing)")
    p.add_argument("--map-memory-limit", metavar="SIZE",
                   help="most memory maps may take (bytes, K/M/G suffix; default half of MemAvailable, "
                        "also UBPF_MAP_MEMORY_LIMIT): a map needing more is refused before anything runs")
    p.add_argument("--backend", choices=["userspace", "kernel"], default="userspace",
                   help="userspace (ptrace, default) or kernel (bpf() + perf_event uprobes, needs root)")
    p.add_argument("-f", "--format", choices=["text", "json"], default="text",
                   help="output format; with json and no -o, a launched command's stdout goes to stderr "
                        "so that every stdout line is JSON")
    p.add_argument("-o", "--output", metavar="FILE", help="write output here instead of stdout")
    p.add_argument("--event-type", metavar="STRUCT", help="decode ring/perf buffer records as this BTF struct")
    p.add_argument("-i", "--interval", type=float, metavar="S",
                   help="print the maps every S seconds while tracing (JSON: one record per print)")
    p.add_argument("--clear", action="store_true", help="with --interval: clear the maps after each print")
    p.add_argument("--metrics", metavar="HOST:PORT",
                   help="serve the maps as Prometheus metrics at http://HOST:PORT/metrics while tracing")
    p.add_argument("--hist", action="append", default=[], metavar="MAP[:log2|linear]",
                   help="draw this map as a histogram (log2 by default), whatever its type says")
    p.add_argument("--check", action="store_true", help="load and verify every program, attach nothing")
    p.add_argument("-l", "--list", nargs="?", const="*", metavar="PATTERN",
                   help="list probe-able functions (and USDT probes) of a binary or --pid")
    p.add_argument("-v", "--verbose", action="store_true", help="per-probe hit counts and overhead at exit")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks for internal errors")
    return p


def run_options(args: argparse.Namespace) -> RunOptions:
    """The plain options object everything below the CLI takes."""
    return RunOptions(
        object=args.object, pid=args.pid, command=list(args.command), attach=list(args.attach),
        auto_attach=not args.no_auto, map_size=list(args.map_size), no_autoload=list(args.no_autoload),
        cgroup_map=list(args.cgroup_map), exact_facts=not args.approx_facts, sets=list(args.set),
        duration=args.duration,
        follow_forks=args.follow_forks, backend=args.backend, engine=args.engine,
        native_hits=not args.no_native_hits, check_memory=not args.no_memory_checks, mode=args.mode,
        max_insns=args.max_insns, keep_command=args.keep_command,
        verifier=args.verifier, verifier_log=args.verifier_log, format=args.format, output=args.output,
        event_type=args.event_type, verbose=args.verbose, interval=args.interval, clear=args.clear,
        metrics=args.metrics, hist=parse_hist_options(args.hist))


def parse_hist_options(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, _, kind = item.partition(":")
        kind = kind or "log2"
        if not name or kind not in ("log2", "linear"):
            raise UsageError(f"bad --hist {item!r}: expected MAP, MAP:log2 or MAP:linear")
        out[name] = kind
    return out


def build_dump_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ubpf-run dump", description="Show what is inside a BPF object without loading it: programs "
        "(LLVM-syntax disassembly with C source lines from .BTF.ext), maps, globals, BTF types.")
    p.add_argument("object", help="BPF object file (or .bpf.c source, compiled first)")
    p.add_argument("-j", "--json", action="store_true", help="one JSON document (like bpftool -j)")
    p.add_argument("--no-btf", action="store_true", help="leave the BTF type listing out")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    options = argv[:argv.index("--")] if "--" in argv else argv   # a traced command may say --dump
    if argv[:1] == ["dump"] or "--dump" in options:
        rest = argv[1:] if argv[:1] == ["dump"] else [a for a in options if a != "--dump"]
        args = build_dump_parser().parse_args(rest)
        args.dump = True
        return args
    parser = build_parser()
    cmd: list[str] = []
    if "--" in argv:  # everything after -- is the command, untouched by option parsing
        i = argv.index("--")
        argv, cmd = argv[:i], argv[i + 1:]
    args = parser.parse_args(argv)
    args.command = cmd
    if args.list is not None:
        return args
    if not args.object:
        raise UsageError("no BPF object given: ubpf-run OBJECT.o [--pid PID | -- COMMAND ...] (see --help)")
    if args.check:
        return args
    if args.pid is None and not cmd:
        raise UsageError("nothing to trace: give --pid PID or a command after -- (or --check to only verify)")
    if args.pid is not None and cmd:
        raise UsageError("give either --pid or a command after --, not both")
    for item in args.set:
        if "=" not in item or not item.partition("=")[0]:
            raise UsageError(f"bad --set {item!r}: expected NAME=VALUE")
    if args.interval is not None and args.interval <= 0:
        raise UsageError(f"bad --interval {args.interval:g}: give a positive number of seconds")
    if args.clear and args.interval is None:
        raise UsageError("--clear needs --interval S (maps are cleared after each interval print)")
    return args


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings (a skipped program section, ...) as one line each, without the warnings
    module's source-location lines; control characters from a corrupted object are escaped."""
    print(f"ubpf-run: warning: {one_line(str(message))}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    warnings.showwarning = _show_warning
    try:
        args = parse_args(argv)
        return _dispatch(args)
    except UbpfError as e:
        _error(str(e))
        if debug:
            traceback.print_exc()
        return e.exit_code
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except BrokenPipeError:
        return 0
    except OSError as e:  # files we were told to read or write
        name = f"{e.filename}: " if e.filename else ""
        _error(f"{name}{e.strerror or e} (check the path and its permissions)")
        return 1
    except SystemExit:
        raise
    except Exception as e:  # the edge: nothing else may turn into a traceback for users
        _error(f"internal error: {type(e).__name__}: {e} (run with --debug for details and please report it)")
        if debug:
            traceback.print_exc()
        return 70


def _error(msg: str) -> None:
    print(f"ubpf-run: error: {one_line(msg)}", file=sys.stderr, flush=True)


def one_line(text: str) -> str:
    """``text`` as one printable line: newlines become spaces, other control characters (a
    corrupted object's names) are escaped."""
    text = " ".join(str(text).splitlines())
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


def _dispatch(args: argparse.Namespace) -> int:
    if getattr(args, "dump", False):    # `ubpf-run dump` has its own parser and loads nothing
        return _cmd_dump(args)
    if args.map_memory_limit is not None:
        from ubpf_py.maps.budget import parse_size, set_memory_limit

        set_memory_limit(parse_size(args.map_memory_limit))
    if args.list is not None:
        return _cmd_list(args)
    if args.check:
        return _cmd_check(args)
    # SIGTERM/SIGHUP end tracing like Ctrl-C: the session restores the target on the way out
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupt)
    from ubpf_py.runner import run

    return run(run_options(args))


def _raise_interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def _cmd_check(args: argparse.Namespace) -> int:
    from ubpf_py.maps.budget import check_spec_maps
    from ubpf_py.obj.elf import load_object
    from ubpf_py.verifier import check_spec, format_verdict
    from ubpf_py.verifier.btfptr import KernelFieldWarning

    spec = load_object(args.object)
    check_spec_maps(spec)          # the map a run could not create fails --check the same way
    reports = check_spec(spec, mode="strict" if args.verifier == "off" else args.verifier)
    if not reports:
        raise NoProgramError(f"{args.object}: no runnable program (every executable section was "
                             f"skipped or there is none): nothing to verify or run")
    rejected = 0
    for rep in reports:
        print(format_verdict(rep))
        rejected += not rep.ok
        for note in rep.notes if rep.ok else ():   # fields read directly that have no value here
            warnings.warn(f"program '{rep.program}': {note}", KernelFieldWarning, stacklevel=1)
        if rep.log and (args.verifier_log or not rep.ok):  # the log on rejection, always
            print(rep.log.rstrip())
    return 3 if rejected else 0


def _cmd_dump(args: argparse.Namespace) -> int:
    import json

    from ubpf_py.obj.compile import compile_source, is_source
    from ubpf_py.obj.elf import load_object
    from ubpf_py.output.inspect import describe, render

    path = compile_source(args.object) if is_source(args.object) else args.object
    desc = describe(load_object(path))
    if args.no_btf:
        desc.pop("btf")
    if args.json:
        print(json.dumps(desc))
    else:
        print("\n".join(render(desc, btf=not args.no_btf)))
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from ubpf_py.probe.listing import list_functions, parse_list_pattern

    kind, binary, glob = parse_list_pattern(args.list)
    target: str | int | None = binary or (args.pid if args.pid is not None else args.object)
    if target is None:
        raise UsageError("--list needs a binary (ubpf-run --list 'uprobe:BINARY:PATTERN') or --pid")
    for item in list_functions(target, glob, kind=kind):
        print(item)
    return 0

if __name__ == "__main__":
    sys.exit(main())
