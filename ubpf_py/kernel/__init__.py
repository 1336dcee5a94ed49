"""Kernel backend: run the same ObjectSpec in the kernel with bpf() and PMU uprobes.

It is ``ubpf-run --backend kernel`` and the oracle tests compare the userspace engine with.

Low-level API (stable; other tests depend on it):

* ``syscall.bpf(cmd, attr) -> int`` (raises KernelBackendError naming the command and errno),
  ``syscall.bpf_rc(cmd, attr) -> int`` (``-errno``), ``syscall.kernel_bpf_skip_reason() -> str | None``
* ``maps.KernelMap.create(map_type, key_size, value_size, max_entries, flags=0, *, name, inner_map_fd,
  map_extra, numa_node, btf_fd, btf_key_type_id, btf_value_type_id)``; ``lookup / lookup_percpu /
  update / delete / get_next_key / all_keys / items / push / pop / peek / lookup_and_delete / freeze``
  (operations return 0 or ``-errno``); ``maps.possible_cpus()``
* ``prog.prog_load(insns, prog_type, license="GPL", *, log_level, log_size, expected_attach_type,
  kern_version, prog_name, prog_flags, btf_fd, func_info, line_info, fd_array, attach_btf_id) -> fd``
  (KernelBackendError with ``.log``/``.errno``), ``prog.prog_test_run(fd, data_in=b"", ctx_in=None,
  repeat=1) -> TestRunResult(retval, duration_ns, data_out, ctx_out)``, ``prog.btf_load(raw) -> fd``

Backend (modules by concern):

* ``loader.load_collection(spec) -> KernelCollection`` (maps, BTF, relocations, CO-RE, programs)
* ``perf.attach_uprobe(prog_fd, path, offset, pid=, retprobe=, cookie=, ref_ctr_offset=)``
* ``events``: ``PrintkEvent``, ``RecordEvent``, ``LostEvent``; trace_pipe / ring buffer / perf buffer readers
* ``target.spawn_gated(argv, cwd=, stdout=, cpu=)``: a target held before exec
* ``backend.KernelSession(spec, attach_requests, target_pid)`` with ``poll()``, ``dump_maps()``,
  ``read_globals()``; ``backend.run_command(spec, attach_requests, argv, cwd=...) -> RunResult``
  (see the backend module docstring for the exact structures)
"""

from ubpf_py.kernel.maps import KernelMap, possible_cpus
from ubpf_py.kernel.prog import TestRunResult, btf_load, prog_load, prog_test_run
from ubpf_py.kernel.syscall import bpf, bpf_rc, kernel_bpf_skip_reason

__all__ = ["KernelMap", "TestRunResult", "bpf", "bpf_rc", "btf_load", "kernel_bpf_skip_reason",
           "possible_cpus", "prog_load", "prog_test_run"]
