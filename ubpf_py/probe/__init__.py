"""The probe engine: attach points (procmaps, symbols, demangle, usdt, resolve,
listing) and the ptrace machinery that patches and runs probes.

Kept import-free on purpose: the CLI imports submodules it needs, so listing
functions never pays for ptrace or capstone start-up.
"""
