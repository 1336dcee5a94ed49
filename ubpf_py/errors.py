"""Exception classes for every failure a user can cause or meet.

Every exception's ``str()`` is a single line meant for a human: it names the
thing that is wrong and, where one exists, the fix.  The CLI prints exactly that
line and exits non-zero; no traceback ever reaches the user.
"""

from __future__ import annotations


class UbpfError(Exception):
    """Base class of every error ubpf-py raises on purpose."""

    #: process exit code the CLI uses for this class of error
    exit_code: int = 1


class NotSupportedError(UbpfError):
    """A feature that is recognised but not built yet.

    The message always starts with ``not supported:`` so users can tell a gap in
    ubpf-py from a bug in their program.
    """

    def __init__(self, what: str) -> None:
        super().__init__(f"not supported: {what}")
        self.what = what


class InvalidInstructionError(UbpfError):
    """Bytecode that is not a valid BPF encoding."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(f"invalid instruction at index {index}: {reason}")
        self.index = index
        self.reason = reason


class AssemblerError(UbpfError):
    """Assembly text that cannot be assembled (line number and reason)."""


class ObjectLoadError(UbpfError):
    """An ELF object that cannot be turned into programs and maps."""

    exit_code = 2


class RelocationError(ObjectLoadError):
    """A relocation (map, global, call, CO-RE) that cannot be resolved."""


class BTFError(ObjectLoadError):
    """Malformed or unsupported BTF."""


class VerifierError(UbpfError):
    """The verifier rejected a program.

    ``str()`` is the one-line summary; ``log`` holds the full verifier log.
    """

    exit_code = 3

    def __init__(self, message: str, log: str = "", program: str | None = None,
                 insn_index: int | None = None) -> None:
        super().__init__(message)
        self.log = log
        self.program = program
        self.insn_index = insn_index


class VMFault(UbpfError):
    """A program did something the runtime checks forbid (bad memory access,
    division trap in a helper, call depth, ...).  Carries the instruction index."""

    def __init__(self, message: str, pc: int | None = None) -> None:
        where = f" at instruction {pc}" if pc is not None else ""
        super().__init__(f"program fault{where}: {message}")
        self.pc = pc
        self.reason = message


class MapError(UbpfError):
    """A map that cannot be created (bad type, sizes, flags, more memory than can be had).
    Raised only at creation, before any program runs; both backends use this exit code."""

    exit_code = 6


class HelperError(UbpfError):
    """A helper that cannot be provided (unknown id, not allowed)."""


class UnknownHelperError(HelperError):
    """A program calls a helper id this runtime does not know: the program is refused at load,
    as the kernel's verifier refuses it (``invalid func unknown#N``), so the exit code is the
    verifier's."""

    exit_code = 3


class ProbeError(UbpfError):
    """Attaching or running probes failed."""

    exit_code = 4


class TargetError(ProbeError):
    """The target process cannot be traced (no such pid, permission, ...)."""


class SymbolError(ProbeError):
    """An attach point (binary, function, USDT probe) cannot be resolved."""


class KernelBackendError(UbpfError):
    """The kernel refused an operation of the kernel backend (bpf(), perf_event_open)."""

    exit_code = 5

    def __init__(self, message: str, errno: int = 0, log: str = "") -> None:
        super().__init__(message)
        self.errno = errno
        self.log = log


class KernelVerifierError(KernelBackendError):
    """The kernel's verifier rejected a program: the same kind of problem (and exit code) as
    ubpf-py's own verifier rejecting it."""

    exit_code = VerifierError.exit_code


class KernelMapError(KernelBackendError):
    """BPF_MAP_CREATE refused a map: the same exit code as a map the userspace backend cannot
    create."""

    exit_code = MapError.exit_code


class UsageError(UbpfError):
    """Bad command-line syntax."""

    exit_code = 64


class NoProgramError(ObjectLoadError):
    """An object with no program ubpf-py can run (every executable section skipped or none)."""
