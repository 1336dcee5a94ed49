"""Start a target held at a gate, so kernel probes are attached before it runs.

The child is forked and blocks reading a pipe before ``exec`` (the kernel oracle's
method, here with a /bin/sh gate): we attach uprobes with its pid, then release it.  A uprobe attached to a pid
survives the exec, so the probes see the target from its first instruction of
``main``.  No ptrace is involved, so this does not disturb what is being measured.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from ubpf_py.errors import TargetError
from ubpf_py.probe import ptrace as P

_PR_SET_PDEATHSIG = 1


@dataclass
class GatedChild:
    proc: subprocess.Popen
    _gate_w: int
    released: bool = False
    argv: list[str] = field(default_factory=list)
    #: seized with PTRACE_O_TRACEEXIT (see ``watch_exit``)
    traced: bool = False
    #: /proc/PID/maps text at the target's exit (when ``watch_exit`` was called)
    exit_maps: str = ""
    #: stopped at its exec by ``run_to_exec`` (``release`` resumes it)
    held: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def release(self) -> None:
        """Let the child exec its program (or, held at its exec, run it)."""
        if self.held:
            self.held = False
            P.cont_quiet(self.pid)
            return
        if not self.released:
            os.write(self._gate_w, b"g\n")
            os.close(self._gate_w)
            self.released = True

    def watch_exit(self) -> None:
        """PTRACE_SEIZE the child with PTRACE_O_TRACEEXIT so that ``poll`` can capture
        /proc/PID/maps at its exit (the oracle's method; the stop costs nothing per hit).
        Call before ``release``."""
        try:
            P.seize(self.pid, P.PTRACE_O_TRACEEXIT | P.PTRACE_O_TRACEEXEC)
        except P.PtraceError as e:
            raise TargetError(f"cannot ptrace pid {self.pid} to watch its exit: {os.strerror(e.errno)}") from e
        self.traced = True

    def run_to_exec(self) -> None:
        """Open the gate and hold the child at its exec (after ``watch_exit``): the new image has
        not run an instruction yet, and what the ``/bin/sh`` gate did before (its own mallocs,
        reads) happened before any probe exists.  Probes attached now see only the target.
        ``release()`` then runs it.  If the command cannot be started, the child has exited
        when this returns (``poll()`` gives its status)."""
        self.release()
        while True:
            try:
                _, status = os.waitpid(self.pid, P.WALL)
            except ChildProcessError:
                return
            if not os.WIFSTOPPED(status):
                self.proc.returncode = os.waitstatus_to_exitcode(status)
                return
            if status >> 16 == P.PTRACE_EVENT_EXEC:
                self.held = True
                return
            P.cont_quiet(self.pid, 0 if status >> 16 else os.WSTOPSIG(status))

    def poll(self) -> int | None:
        """The exit code (negative signal) once the child has ended, else None; while
        watched, also resumes its ptrace stops and records its maps at exit."""
        if not self.traced:
            return self.proc.poll()
        if self.proc.returncode is not None:
            return self.proc.returncode
        while True:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG | P.WALL)
            except ChildProcessError:
                return self.proc.returncode
            if pid == 0:
                return None
            if os.WIFSTOPPED(status):
                sig = os.WSTOPSIG(status)
                event = status >> 16
                if event == P.PTRACE_EVENT_EXIT:
                    try:
                        self.exit_maps = Path(f"/proc/{self.pid}/maps").read_text()
                    except OSError:
                        pass
                    sig = 0
                elif event in (P.PTRACE_EVENT_STOP, P.PTRACE_EVENT_EXEC):
                    sig = 0
                P.cont_quiet(self.pid, sig)
                continue
            self.proc.returncode = os.waitstatus_to_exitcode(status)
            return self.proc.returncode

    def kill(self) -> None:
        if self.poll() is None:
            self.proc.kill()
        if not self.released:
            os.close(self._gate_w)
            self.released = True
        while self.poll() is None:
            os.sched_yield()


def spawn_gated(argv: list[str], *, cwd: str | None = None, stdout: int | None = None,
                stderr: int | None = None, env: dict[str, str] | None = None,
                cpu: int | None = None) -> GatedChild:
    """Start ``argv`` (resolved in PATH and relative to ``cwd``) blocked until ``release()``.

    The gate is a ``/bin/sh`` that reads one line from a pipe on its stdin and then ``exec``s the
    command, so the pid we attach to is the target's pid (exec keeps it) and Popen
    returns at once (a Python-level pre-exec hook would make Popen wait for the exec).
    ``cpu`` pins the target to one CPU."""
    if not argv:
        raise TargetError("no command to start; give the target after --")
    gate_r, gate_w = os.pipe()
    try:
        # the gate waits on fd 3; the target keeps our stdin (a terminal, a pipe), as under ptrace
        proc = subprocess.Popen(["/bin/sh", "-c", 'read -r _ <&3; exec 3<&-; exec "$@"', "sh", *argv],
                                cwd=cwd, stdout=stdout, stderr=stderr, env=env, close_fds=True,
                                pass_fds=(gate_r, 3), preexec_fn=lambda: _gate_child(gate_r))
    except OSError as exc:
        os.close(gate_r)
        os.close(gate_w)
        raise TargetError(f"cannot start {argv[0]!r}: {exc.strerror}; check the command and its path") from None
    os.close(gate_r)
    if cpu is not None:
        os.sched_setaffinity(proc.pid, {cpu})
    return GatedChild(proc, gate_w, argv=list(argv))


def _gate_child(gate_r: int) -> None:
    """In the forked child: the gate pipe becomes fd 3, and the child dies with its parent."""
    if gate_r != 3:
        os.dup2(gate_r, 3)
        os.close(gate_r)
    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
