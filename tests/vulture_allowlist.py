"""Names vulture reports as unused in ubpf_py/ that are used, or are kept on purpose.

Read by tests/test_dead_code.py (never imported by the package).  vulture matches by
name only, so an entry is the bare name; the comment says where it is defined and why
it is not dead.  Before adding an entry, check the definition is really reached (by
name, from C, through a protocol); if it is not, delete the definition instead.
test_dead_code.py fails on an entry whose name no longer appears in ubpf_py/.
"""


class _Names:
    """Any attribute is its own name: vulture only needs each name to appear in code."""

    def __getattr__(self, name: str) -> str:
        return name


_ = _Names()

ALLOWED = [
    # --- protocols and hooks: called by Python or a library, never by name in ubpf_py ---
    _.__getattr__,          # ubpf_py/__init__.py: PEP 562 module __getattr__ (lazy public API)
    _.showwarning,          # cli.py: installs the warnings.showwarning hook (one-line warnings)
    _.collect,              # output/metrics.py: prometheus_client collector protocol (registry.register)
    _.data_layout,          # vm/jit backend.py, target.py: llvmlite ModuleRef property setter
    _.__cause__,            # vm/jit/runtime.py: exception chaining set explicitly on a wrapped VMFault
    _.config,               # kernel/perf.py: ctypes PerfEventAttr field updated with |= before the syscall
    _.mtime_ns,             # intarget/sites.py: _is_go_file lru_cache key (a rewritten file misses the cache)
    # --- references that keep memory alive while native code points into it ---
    _._hdrs,                # maps/perf.py: owns the per-CPU ring headers; the rings hold views into it
    _._region_table,        # vm/jit/runtime.py: ctypes region table whose address JIT code reads
    # --- read by name or from C ---
    _.EBUSY,                # maps/consts.py: written to runtime/ubpf_abi.h by name (abi/__main__ KERNEL_NAMES)
    # --- public API documented in README.md (used by callers, not by the package) ---
    _.as_dict,              # api/maps.py: MapView.as_dict()
    _.attach_spec,          # api/object.py: BPFObject.attach_spec("PROG=BINARY:FUNC")
    _.ctx_out,              # kernel/prog.py: TestRunResult field (kernel/__init__ documents it)
    # --- kernel ABI tables written in full (a gap would misnumber or misname the rest) ---
    # abi/bpf.py MapType (enum bpf_map_type): MAP_TYPE_NAMES names every number an object may declare
    _.DEVMAP, _.CPUMAP, _.XSKMAP, _.SOCKHASH, _.CGROUP_STORAGE, _.REUSEPORT_SOCKARRAY,
    _.PERCPU_CGROUP_STORAGE, _.SK_STORAGE, _.DEVMAP_HASH, _.STRUCT_OPS, _.INODE_STORAGE,
    _.TASK_STORAGE, _.USER_RINGBUF, _.CGRP_STORAGE, _.ARENA,
    # probe/ptrace.py: slot names of struct user_regs_struct, unpacked from one range(27)
    _.CS, _.SS, _.DS, _.ES, _.FS, _.GS, _.GS_BASE,
    # --- named on purpose ---
    _.run_s,                # probe/engine.py: SessionStats.run_s, a public session figure (api users)
    _.RC_POLL,              # probe/native.py: the C loop's "poll interval passed" result, named with
                            # the others; the loop handles it by going round (poll hooks run first)
]
