"""What a libbpf loader does between open and load, as command-line options.

Real tools change their object before loading it: ``memleak`` sizes its stack
map with ``bpf_map__set_value_size`` / ``bpf_map__set_max_entries``,
``funclatency`` turns programs off with ``bpf_program__set_autoload(false)``.
``ubpf-run`` offers the same on the command line so an unmodified object can be
run the way its loader would run it:

* ``--map-size NAME.FIELD=N`` (alias ``--resize``): FIELD is ``max_entries``,
  ``value_size`` or ``key_size`` (``bpf_map__set_*``); several fields of one
  map may be joined: ``stack_traces.max_entries=1024,value_size=1016``.
* ``--cgroup-map MAP[INDEX]=DIR``: a cgroup in a CGROUP_ARRAY slot, stored as the
  loader does (an open directory fd), for ``bpf_current_task_under_cgroup``;
* ``--no-autoload PROG``: the program is neither loaded nor attached (libbpf's
  ``SEC("?...")`` programs start like this; ``--attach`` turns one back on,
  like ``bpf_program__set_autoload(true)``).

Both backends call :func:`apply_loader_options` on the spec before loading, so
the kernel oracle sees exactly the same object as the userspace runtime.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

from ubpf_py.errors import UsageError
from ubpf_py.obj.spec import ObjectSpec

MAP_FIELDS = ("max_entries", "value_size", "key_size")


def parse_map_size(text: str) -> tuple[str, dict[str, int]]:
    """``NAME.FIELD=N[,FIELD=N...]`` -> (map name, {field: value})."""
    head, eq, _ = text.partition("=")
    name, dot, first = head.rpartition(".")  # map names may hold dots (forms.bss)
    rest = first + text[len(head):]
    if not dot or not name or not eq:
        raise UsageError(f"bad --map-size {text!r}: expected MAP.max_entries=N "
                         f"(fields: {', '.join(MAP_FIELDS)})")
    fields: dict[str, int] = {}
    for item in rest.split(","):
        field, _, value = item.partition("=")
        if field not in MAP_FIELDS:
            raise UsageError(f"bad --map-size {text!r}: unknown field {field!r} "
                             f"(fields: {', '.join(MAP_FIELDS)})")
        try:
            n = int(value, 0)
        except ValueError:
            raise UsageError(f"bad --map-size {text!r}: {value!r} is not a number") from None
        if not 0 < n < 1 << 32:
            raise UsageError(f"bad --map-size {text!r}: {field} must be between 1 and 2^32-1")
        fields[field] = n
    return name, fields


def resize_map(spec: ObjectSpec, name: str, fields: dict[str, int]) -> None:
    """Change a declared map's sizes before load (libbpf's ``bpf_map__set_*``)."""
    try:
        m = spec.map_by_name(name)
    except KeyError:
        user_maps = [x.name for x in spec.maps if not x.internal]
        raise UsageError(f"--map-size: the object has no map {name!r} "
                         f"(maps: {', '.join(user_maps) or 'none'})") from None
    if m.internal:
        raise UsageError(f"--map-size: {name!r} holds global variables; its size is fixed by the object "
                         "(use --set to change a value)")
    for field, n in fields.items():
        setattr(m, field, n)
        if field == "key_size":
            m.key_type_id = 0  # the BTF type no longer describes the key (libbpf drops it too)
        elif field == "value_size":
            m.value_type_id = 0


def apply_loader_options(spec: ObjectSpec, map_sizes: Iterable[str] = (), no_autoload: Iterable[str] = (),
                         attached: Iterable[str] = ()) -> None:
    """Apply ``--map-size`` and ``--no-autoload`` to ``spec``; programs named in ``attached``
    (explicit ``--attach``) are turned on, programs left off are removed from the spec."""
    for text in map_sizes:
        resize_map(spec, *parse_map_size(text))
    attached = set(attached)
    for name in no_autoload:
        if name not in spec.programs:
            raise UsageError(f"--no-autoload: the object has no program {name!r} "
                             f"(programs: {', '.join(spec.programs) or 'none'})")
        if name in attached:
            raise UsageError(f"program {name} is given both --attach and --no-autoload; drop one")
        spec.programs[name].autoload = False
    for name in attached:
        if name in spec.programs:
            spec.programs[name].autoload = True
    for name in [n for n, p in spec.programs.items() if not p.autoload]:
        del spec.programs[name]


def parse_cgroup_map(text: str) -> tuple[str, int, str]:
    """``MAP[INDEX]=PATH`` or ``MAP=PATH`` (index 0) -> (map, index, cgroup directory)."""
    head, eq, path = text.partition("=")
    name, _, idx_text = head.partition("[")
    try:
        index = int(idx_text.rstrip("]"), 0) if idx_text else 0
    except ValueError:
        raise UsageError(f"bad --cgroup-map {text!r}: expected MAP[INDEX]=CGROUP_DIR") from None
    if not eq or not name or not path:
        raise UsageError(f"bad --cgroup-map {text!r}: expected MAP[INDEX]=CGROUP_DIR")
    if not os.path.isdir(path):
        raise UsageError(f"--cgroup-map: {path} is not a directory (give a cgroup v2 directory, "
                         "e.g. /sys/fs/cgroup/NAME)")
    return name, index, path


def fill_cgroup_maps(texts: Iterable[str], update: Callable[[str, int, int], int]) -> None:
    """Store each ``--cgroup-map`` cgroup the kernel way, as an open directory fd in slot INDEX of a
    CGROUP_ARRAY (what funclatency/memleak ``-c PATH`` do); ``update(map, index, fd) -> 0 | -errno``."""
    for text in texts:
        name, index, path = parse_cgroup_map(text)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            rc = update(name, index, fd)
        finally:
            os.close(fd)
        if rc:
            raise UsageError(f"--cgroup-map {text}: the map refused the cgroup ({os.strerror(-rc)}); "
                             "give a CGROUP_ARRAY map and an index below its max_entries")
