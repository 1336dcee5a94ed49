"""Execution engines for BPF programs and the memory/helper contracts they share.

The VM knows nothing about processes: per-hit facts arrive through
``vm.env.HitContext`` and user memory through the ``UserMemory`` protocol.
"""
