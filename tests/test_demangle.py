"""Demangled names: Rust legacy and v0, C++ Itanium, Go -- checked against
binutils' c++filt and resolved to the same offsets as the mangled symbols."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from ubpf_py.errors import SymbolError
from ubpf_py.probe import demangle as dm
from ubpf_py.probe.symbols import load_elf, lookup_function, match_functions, resolve_function

CXXFILT = shutil.which("c++filt")


def _cxxfilt(names: list[str]) -> list[str]:
    out = subprocess.run([CXXFILT], input="\n".join(names) + "\n", capture_output=True, text=True,
                         check=True).stdout
    return out.splitlines()


def test_kinds() -> None:
    assert dm.kind("_ZN9rust_args5hello17h202ed30fdc9d599bE") == "rust-legacy"
    assert dm.kind("_RNvCs2Rc0TF4iEOx_9rust_args5hello") == "rust-v0"
    assert dm.kind("_ZNK3Foo3getEv") == "c++"
    assert dm.kind("main.computeE") == "plain"
    assert dm.kind("_Row") == "plain" and dm.kind("_R") == "plain"
    assert dm.demangle("main.computeE") is None and dm.demangle("malloc") is None
    assert dm.demangle("_Znot_really") is None


def test_cxx_param_stripping() -> None:
    assert dm.strip_cxx_params("ns::Foo::get() const") == "ns::Foo::get"
    assert dm.strip_cxx_params("ns::Foo::operator()(int)") == "ns::Foo::operator()"
    assert dm.strip_cxx_params("f(void (*)(int), int)") == "f"
    assert dm.strip_cxx_params("add(int, int) (.isra.0)") == "add"
    assert dm.strip_cxx_params("plain") == "plain"


def test_rust_legacy_corpus_binary(corpus_build: Path) -> None:
    path = str(corpus_build / "rust_args")
    info = load_elf(path)
    # the crate itself is legacy-mangled; rustc 1.95's std is v0 even here
    legacy = [s.name for s in info.symtab if dm.kind(s.name) == "rust-legacy"]
    assert len(legacy) >= 5 and any("$u7b$" in s for s in legacy)
    if CXXFILT:
        # c++filt prints the hash as the last path segment; ours drops it
        for raw, ref in zip(legacy, _cxxfilt(legacy), strict=True):
            assert dm.demangle(raw) == re.sub(r"::h[0-9a-f]{16}$", "", ref), raw
            assert dm.name_variants(raw)[0] == ref
    hello = next(s for s in legacy if "rust_args5hello" in s)
    assert dm.demangle(hello) == "rust_args::hello"


@pytest.fixture(scope="module")
def rust_v0(tmp_path_factory: pytest.TempPathFactory, corpus_build: Path) -> str:
    from paths import CORPUS

    if shutil.which("rustc") is None:
        pytest.skip("rustc not installed")
    out = tmp_path_factory.mktemp("v0") / "rust_args_v0"
    subprocess.run(["rustc", "-O", "-C", "symbol-mangling-version=v0", "-o", str(out),
                    str(CORPUS / "targets" / "rust_args.rs")], check=True, capture_output=True)
    return str(out)


def test_rust_v0(rust_v0: str, corpus_build: Path) -> None:
    info = load_elf(rust_v0)
    v0 = [s.name for s in info.symtab if dm.kind(s.name) == "rust-v0"]
    assert len(v0) > 50
    mine = [s for s in v0 if "9rust_args" in s]
    assert mine
    if CXXFILT:
        for raw, ref in zip(mine, _cxxfilt(mine), strict=True):
            # c++filt adds crate disambiguators: core[c1f1a4ba060b9bfa]::...
            assert dm.demangle(raw) == re.sub(r"\[[0-9a-f]+\]", "", ref), raw
    hello = next(s for s in v0 if s.endswith("9rust_args5hello"))
    m = lookup_function(rust_v0, "rust_args::hello")
    assert m.symbol.name == hello and m.file_offset == resolve_function(rust_v0, hello)
    # the same function in the legacy build sits at the same kind of place
    assert lookup_function(str(corpus_build / "rust_args"), "rust_args::hello").demangled == \
        "rust_args::hello"
    assert [n for n, _ in match_functions(rust_v0, "rust_args::*")] == \
        sorted([n for n, _ in match_functions(rust_v0, "rust_args::*")],
               key=lambda n: resolve_function(rust_v0, n))


CXX_SRC = r"""
#include <cstdio>
namespace ns {
struct Foo {
    int v;
    __attribute__((noipa)) int bar(int x) const { return v + x; }
    __attribute__((noipa)) double bar(double x) const { return v * x; }
    __attribute__((noipa)) static int solo(long x) { return (int)x * 3; }
};
template <typename T> __attribute__((noipa)) T twice(T x) { return x + x; }
}
int main(int argc, char **) {
    ns::Foo f{argc};
    std::printf("%d %f %d %d\n", f.bar(argc), f.bar(1.5), ns::Foo::solo(argc), ns::twice<int>(argc));
    return 0;
}
"""


@pytest.fixture(scope="module")
def cxx_bin(tmp_path_factory: pytest.TempPathFactory) -> str:
    if shutil.which("g++") is None:
        pytest.skip("g++ not installed")
    d = tmp_path_factory.mktemp("cxx")
    (d / "t.cc").write_text(CXX_SRC)
    subprocess.run(["g++", "-O2", "-o", str(d / "t"), str(d / "t.cc")], check=True, capture_output=True)
    return str(d / "t")


def test_cxx(cxx_bin: str) -> None:
    info = load_elf(cxx_bin)
    mangled = [s.name for s in info.symtab if dm.kind(s.name) == "c++"]
    assert mangled
    if CXXFILT:
        for raw, ref in zip(mangled, _cxxfilt(mangled), strict=True):
            # LLVM prints clones as " (.isra.0)", binutils as " [clone .isra.0]"
            ref = re.sub(r" \[clone (\.[\w.]+)\]", r" (\1)", ref)
            assert dm.demangle(raw) == ref, raw
    solo = lookup_function(cxx_bin, "ns::Foo::solo")
    assert solo.symbol.name == "_ZN2ns3Foo4soloEl"
    assert resolve_function(cxx_bin, "ns::Foo::solo(long)") == solo.file_offset
    assert resolve_function(cxx_bin, "ns::Foo::bar(int) const") == resolve_function(cxx_bin, "_ZNK2ns3Foo3barEi")
    assert resolve_function(cxx_bin, "int ns::twice<int>(int)") == resolve_function(cxx_bin, "_ZN2ns5twiceIiEET_S1_")
    with pytest.raises(SymbolError, match=r"ambiguous function 'ns::Foo::bar'.*_ZNK2ns3Foo3barE"):
        resolve_function(cxx_bin, "ns::Foo::bar")
    with pytest.raises(SymbolError, match="did you mean 'ns::Foo::solo"):
        resolve_function(cxx_bin, "ns::Foo::sol")


def test_go_names_are_plain(corpus_build: Path) -> None:
    path = str(corpus_build / "go_args")
    info = load_elf(path)
    go = [s.name for s in info.symtab if s.name.startswith("main.")]
    assert "main.computeE" in go
    assert all(dm.demangle(n) is None for n in go)
    assert dm.display_name("main.computeE") == "main.computeE"
    assert dict(match_functions(path, "main.compute*"))["main.computeE"] == resolve_function(path, "main.computeE")
