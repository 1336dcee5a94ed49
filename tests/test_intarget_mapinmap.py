"""Map-in-map lookups in code compiled for the target: the outer map's shared layout
(KIND_ARRAY_OF_MAPS / KIND_HASH_OF_MAPS in ubpf_py/abi/maps.py) gives the inner map's handle,
which the following map helpers and bpf_for_each_map_elem use; an empty slot gives NULL.

The tracer changing the outer maps while target code looks them up must stay safe: a lookup
sees the old or the new inner map, never a torn handle.  The target code runs in this process
(runtime and program linked here as into a target) in a C loop that does not hold the GIL,
while a Python thread swaps, deletes and re-inserts the inner maps.  The end-to-end run (in
the target, on the ptrace path and in the kernel) is in test_intarget_helpers_e2e.py."""

from __future__ import annotations

import ctypes
import struct
import threading
from pathlib import Path

import pytest
from bpf_build import compile_bpf
from intarget_fixture import driver, make_frame, needs_runtime

from ubpf_py.intarget import runtime_obj
from ubpf_py.intarget.arena import SharedArena
from ubpf_py.intarget.selfload import load_here
from ubpf_py.live.collection import Collection
from ubpf_py.live.intarget import program_reason
from ubpf_py.maps import consts as C
from ubpf_py.maps import create_map
from ubpf_py.obj.elf import load_object
from ubpf_py.obj.spec import MapSpec
from ubpf_py.vm.jit.target import compile_for_target

pytestmark = needs_runtime
SRC = Path(__file__).resolve().parent / "targets" / "mapinmap" / "mim.bpf.c"
STATS = struct.Struct("<7Q")   # array_hits, array_misses, hash_hits, hash_misses, inserts, walked, sum


@pytest.fixture(scope="module")
def obj(tmp_path_factory) -> Path:
    return compile_bpf(SRC.read_text(), tmp_path_factory.mktemp("mim"), "mim")


def _target(obj: Path, arena: SharedArena):
    coll = Collection.load(load_object(str(obj)), engine="jit", arena=arena)
    lp = coll.program("bump")
    assert program_reason(lp, "strict", runtime_obj.helper_ids()) is None
    code = compile_for_target(lp.instructions, "bump", coll.env.maps_by_addr)
    img = load_here([("runtime", runtime_obj.object_bytes()), ("prog", code.obj)])
    return coll, img.addr(code.entry)


def test_lookups_give_inner_maps_and_null_for_empty_slots(obj):
    arena = SharedArena(16 << 20)
    coll, entry = _target(obj, arena)
    f = make_frame(arena)
    run = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint64)(entry)
    for slot, j in [(0, 1), (1, 2), (2, 3), (3, 9), (4, 0), (1, 2)]:
        f.set_reg("rdi", slot)
        f.set_reg("rsi", j)
        run(f.regs_addr, f.addr)
    s = STATS.unpack(coll.maps["stats"].lookup(bytes(4)))
    assert s[:5] == (2, 4, 3, 3, 2)            # slots 0, 2 / 1, 3 hold maps; 1 got key 2 twice
    assert coll.maps["a0"].lookup(struct.pack("<I", 1)) == struct.pack("<Q", 2)
    assert coll.maps["a1"].lookup(struct.pack("<I", 3)) == struct.pack("<Q", 4)
    assert coll.maps["h0"].lookup(struct.pack("<I", 2)) == struct.pack("<Q", 2)
    assert coll.maps["h1"].lookup(struct.pack("<I", 1)) == struct.pack("<Q", 1)
    assert s[5] == 8                           # two walks of a 4-element inner array


def test_inner_map_outside_the_arena_is_refused(obj):
    """A handle outside the arena would mean nothing in the target: the update fails (-EINVAL)."""
    arena = SharedArena(16 << 20)
    coll = Collection.load(load_object(str(obj)), engine="jit", arena=arena)
    private = create_map(MapSpec("p", C.ARRAY, 4, 8, 4))
    assert coll.maps["outer_a"].update(struct.pack("<I", 1), private) == -C.EINVAL
    assert coll.maps["outer_a"].update(struct.pack("<I", 1), coll.maps["a1"]) == 0


def test_tracer_updates_racing_target_lookups(obj, tmp_path_factory):
    lib = driver(tmp_path_factory)
    if lib is None:
        pytest.skip("no C compiler for the driver")
    arena = SharedArena(16 << 20)
    coll, entry = _target(obj, arena)
    f = make_frame(arena)
    outer_a, outer_h = coll.maps["outer_a"], coll.maps["outer_h"]
    arrays, hashes = [coll.maps["a0"], coll.maps["a1"]], [coll.maps["h0"], coll.maps["h1"]]
    stop = threading.Event()
    changes = [0]

    def churn() -> None:
        i = 0
        while not stop.is_set():
            for slot in range(4):
                k = struct.pack("<I", slot)
                if (i + slot) % 3 == 0:
                    outer_a.delete(k)
                    outer_h.delete(k)
                else:
                    assert outer_a.update(k, arrays[(i + slot) & 1]) == 0
                    assert outer_h.update(k, hashes[(i + slot) & 1]) == 0
                changes[0] += 1
            i += 1

    t = threading.Thread(target=churn)
    t.start()
    calls = 0
    try:
        for rnd in range(300):
            f.set_reg("rdi", rnd % 4)
            f.set_reg("rsi", rnd % 11)
            lib.bench(entry, f.regs_addr, f.addr, 0, 0, 0, f.addr, 500)   # entry(ctx, hf), no GIL
            calls += 500
    finally:
        stop.set()
        t.join()
    s = STATS.unpack(coll.maps["stats"].lookup(bytes(4)))
    assert changes[0] > 100
    assert s[0] + s[1] == calls and s[2] + s[3] == calls
    assert s[0] > 0 and s[1] > 0 and s[2] > 0 and s[3] > 0     # both outcomes were seen
    assert s[5] == 4 * s[0]                   # every inner map handed out was a 4-element array
    total = sum(struct.unpack("<Q", v)[0] for m in arrays for _k, v in m.items())
    assert total >= s[0]                      # every array hit added at least 1
