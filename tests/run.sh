#!/usr/bin/env bash
# Install everything the tests need on a fresh Debian machine (as root), build the
# shared corpus, and run the whole test suite.  .ci/run calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
	need=""
	for p in clang llvm libbpf-dev bpftool golang-go systemtap-sdt-dev gcc musl-tools; do
		dpkg -s "$p" >/dev/null 2>&1 || need="$need $p"
	done
	if [ -n "$need" ]; then
		apt-get update -q
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q $need
	fi
	# the unprivileged-user test runs this same Python as uid 65534: let it reach the interpreter
	py=$(python3 -c 'import sys; print(sys.prefix)')
	d=$py; while [ "$d" != / ]; do chmod o+x "$d" 2>/dev/null || true; d=$(dirname "$d"); done
	# tracefs for the kernel oracle's trace_pipe
	[ -e /sys/kernel/tracing/trace_pipe ] || mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null || true
fi

PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install -q -e '.[test]'

build=${UBPF_CORPUS_BUILD:-$PWD/.corpus-build}
if [ ! -e "$build/.built" ]; then
	bash ../shared/corpus/build.sh "$build" >/dev/null
	touch "$build/.built"
fi

# phase 1: everything that does not measure time, on two workers; phase 2: the timed tests, alone
rc=0
python3 -m pytest -q -n 2 --dist loadgroup -p no:cacheprovider -m "not serial" "$@" tests || rc=$?
python3 -m pytest -q -p no:cacheprovider -m serial "$@" tests || rc=$((rc ? rc : $?))
exit $rc
