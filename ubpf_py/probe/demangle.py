"""Demangled names of Rust (legacy and v0), C++ (Itanium) and Go symbols.

Demangling itself is done by ``pydemumble`` (a binding of demumble, which uses
LLVM's Itanium, Rust v0 and Swift demanglers): writing a faithful Itanium or
Rust v0 demangler by hand is a project of its own.  This module adds what a
user types on a command line on top of it:

* Rust legacy symbols (``_ZN9rust_args5hello17h202ed30fdc9d599bE``) are shown as
  ``rust_args::hello`` and also match ``rust_args::hello::h202ed30fdc9d599b``
  (rustc-demangle's ``{}`` form, with the hash).
* C++ names also match without their parameter list and qualifiers
  (``Foo::get`` for ``Foo::get() const``), so overloads become an ambiguity the
  caller reports rather than a silent pick.
* Go symbols are already plain (``main.computeE``, ``main.(*T).M``): they are
  their own demangled form.
"""

from __future__ import annotations

import re
from functools import lru_cache

from ubpf_py.errors import NotSupportedError

try:  # optional at import time so that plain C names never need it
    from pydemumble import demangle as _demumble
except ImportError:  # pragma: no cover - exercised only on broken installs
    _demumble = None

_RUST_LEGACY_HASH = re.compile(r"17h([0-9a-f]{16})E(?:\.llvm\.\d+)?$")
_CXX_TRAILING_QUALS = (" const", " volatile", " &&", " &", " noexcept")
_CLONE_SUFFIX = re.compile(r" \(\.[A-Za-z0-9_.]+\)$")


def kind(symbol: str) -> str:
    """Which mangling ``symbol`` uses: ``rust-legacy``, ``rust-v0``, ``c++`` or ``plain``."""
    if symbol.startswith("_R") and len(symbol) > 2 and (symbol[2].isupper() or symbol[2].isdigit()):
        return "rust-v0"
    if symbol.startswith("_ZN") and _RUST_LEGACY_HASH.search(symbol):
        return "rust-legacy"
    if symbol.startswith("_Z"):
        return "c++"
    return "plain"


def _backend(symbol: str) -> str:
    if _demumble is None:
        raise NotSupportedError(f"demangling {symbol!r} without the pydemumble package "
                                "(pip install pydemumble)")
    return _demumble(symbol)


@lru_cache(maxsize=65536)
def demangle(symbol: str) -> str | None:
    """The human-readable name of a mangled symbol, or None for plain names.

    Rust legacy names lose their ``::h<hash>`` part (like ``rustc-demangle``'s
    alternate form and ``bpftrace``); see :func:`name_variants` for the full form.
    """
    k = kind(symbol)
    if k == "plain":
        return None
    out = _backend(symbol)
    return out or None


def rust_legacy_hash(symbol: str) -> str | None:
    """The 16-hex-digit hash of a Rust legacy symbol (``17h<hash>E``), or None."""
    if not symbol.startswith("_ZN"):
        return None
    m = _RUST_LEGACY_HASH.search(symbol)
    return m.group(1) if m else None


def strip_cxx_params(name: str) -> str:
    """``ns::Foo::get`` from ``ns::Foo::get(int) const``; unchanged if no parameter list."""
    s = _CLONE_SUFFIX.sub("", name)
    changed = True
    while changed:
        changed = False
        for q in _CXX_TRAILING_QUALS:
            if s.endswith(q):
                s = s[: -len(q)]
                changed = True
    if not s.endswith(")"):
        return name
    depth = 0
    for i in range(len(s) - 1, -1, -1):
        c = s[i]
        if c == ")":
            depth += 1
        elif c == "(":
            depth -= 1
            if depth == 0:
                return s[:i] if i > 0 else name
    return name


@lru_cache(maxsize=65536)
def name_variants(symbol: str) -> tuple[str, ...]:
    """Every spelling of ``symbol`` a user may type to mean it, most exact first.

    Does not include ``symbol`` itself (the raw name always matches).
    """
    dem = demangle(symbol)
    if dem is None:
        return ()
    out = [dem]
    k = kind(symbol)
    if k == "rust-legacy":
        h = rust_legacy_hash(symbol)
        if h is not None:
            out.insert(0, f"{dem}::h{h}")
    elif k == "c++":
        no_clone = _CLONE_SUFFIX.sub("", dem)
        if no_clone != dem:
            out.append(no_clone)
        bare = strip_cxx_params(dem)
        if bare != dem and bare not in out:
            out.append(bare)
    return tuple(out)


def display_name(symbol: str) -> str:
    """What listings show: the demangled name when there is one, else the symbol."""
    return demangle(symbol) or symbol
