"""Dataclasses describing a parsed BPF object.

Relocation contract (what ``ProgramSpec.instructions`` contain after parsing):

* map references: ``lddw`` with ``src = BPF_PSEUDO_MAP_IDX`` (5) and ``imm`` =
  index into ``ObjectSpec.maps`` (a list, in ELF order), or ``src =
  BPF_PSEUDO_MAP_IDX_VALUE`` (6) with ``imm`` = map index and ``imm_hi`` =
  offset into the map's value (globals: ``.data``/``.rodata``/``.bss``/
  ``.kconfig`` are maps).  The kernel backend maps indices to fds; the userspace
  loader replaces them with host addresses.
* calls to subprograms: every subprogram the program reaches is appended after
  the entry function (as libbpf does), and each ``call`` has ``src =
  BPF_PSEUDO_CALL`` with ``imm`` = relative offset (target - pc - 1).
* function pointers (callbacks): ``lddw`` with ``src = BPF_PSEUDO_FUNC`` and
  ``imm`` = relative offset of the target function.
* CO-RE relocations are applied by ``obj.core`` at load time (they depend on the
  target BTF), so the spec keeps them in ``ProgramSpec.core_relocs``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ubpf_py.abi.bpf import MAP_TYPE_NAMES
from ubpf_py.isa.instruction import Instruction

# map types by kernel number (enum bpf_map_type)
MAP_TYPES = MAP_TYPE_NAMES


@dataclass
class MapSpec:
    """A map as declared in the object (BTF ``.maps``, legacy ``maps``, or a global data section)."""

    name: str
    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int = 0
    #: BTF type ids of key/value (0 when unknown)
    key_type_id: int = 0
    value_type_id: int = 0
    #: for map-in-map: the inner map's template
    inner: MapSpec | None = None
    #: initial contents of a global-data map (value of key 0), else None
    data: bytes | None = None
    #: static initialisation of prog arrays / map-in-map: slot -> program or map name
    init_slots: dict[int, str] = field(default_factory=dict)
    #: ".data", ".rodata", ".bss", ".kconfig", ".rodata.str1.1", ... for global data maps
    section: str = ""
    #: global data map (created by the loader, not declared by the user)
    internal: bool = False
    #: read-only for programs once loaded (.rodata, .kconfig)
    readonly: bool = False
    map_extra: int = 0
    numa_node: int = 0
    pinning: int = 0

    @property
    def type_name(self) -> str:
        return MAP_TYPES.get(self.type, f"type#{self.type}")


@dataclass
class AttachPoint:
    """Where a section name says a program attaches (``uprobe/BINARY:FUNC[+OFF]``)."""

    binary: str
    function: str = ""
    offset: int = 0
    #: USDT provider:name for usdt sections
    usdt_provider: str = ""
    usdt_name: str = ""


@dataclass
class CoreReloc:
    """One CO-RE relocation from ``.BTF.ext`` (applied at load time)."""

    insn_index: int
    type_id: int
    access: str
    kind: int


@dataclass
class LineInfo:
    insn_index: int
    file: str
    line: int
    col: int
    source: str


@dataclass
class ProgramSpec:
    """An entry program with all the subprograms it reaches appended."""

    name: str
    section: str
    #: "uprobe", "uretprobe", "usdt", "kprobe", "kretprobe", ... (from the section name)
    kind: str
    instructions: list[Instruction]
    license: str = ""
    #: parsed from the section name when it names a target, else None
    attach: AttachPoint | None = None
    sleepable: bool = False
    multi: bool = False
    #: glob for uprobe.multi sections
    multi_pattern: str = ""
    #: instruction index where each function starts: index -> function name
    functions: dict[int, str] = field(default_factory=dict)
    #: function index -> BTF func type id (from func_info)
    func_info: dict[int, int] = field(default_factory=dict)
    line_info: list[LineInfo] = field(default_factory=list)
    core_relocs: list[CoreReloc] = field(default_factory=list)
    #: False for libbpf's SEC("?...") programs (not loaded unless asked for)
    autoload: bool = True
    #: why libbpf's auto-attach of this section fails (``uretprobe/readline``), "" otherwise
    attach_error: str = ""
    #: text after ``TYPE/`` when it names no complete target (the function for ``--attach PROG=BINARY``)
    attach_label: str = ""

    @property
    def is_return_probe(self) -> bool:
        return self.kind in ("uretprobe", "kretprobe")


@dataclass
class GlobalVar:
    """A global variable in a data section (for ``--set`` and map dumps)."""

    name: str
    map_name: str
    offset: int
    size: int
    type_id: int = 0
    #: BTF linkage: static, global, extern
    linkage: str = "global"


@dataclass
class ObjectSpec:
    """Everything parsed from one ELF object."""

    path: str
    programs: dict[str, ProgramSpec]
    maps: list[MapSpec]
    license: str = ""
    kern_version: int = 0
    globals: dict[str, GlobalVar] = field(default_factory=dict)
    #: parsed BTF (ubpf_py.obj.btf.Btf) or None
    btf: Any = None
    #: sections skipped because their program type is not a uprobe type: (section, reason)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    #: .kconfig externs the object needs: name -> GlobalVar
    kconfig: dict[str, GlobalVar] = field(default_factory=dict)
    #: libbpf's object name (file name up to the first '.'), prefix of internal map names
    name: str = ""
    #: parsed .BTF.ext (ubpf_py.obj.btf_ext.BtfExt) or None
    btf_ext: Any = None

    def map_by_name(self, name: str) -> MapSpec:
        for m in self.maps:
            if m.name == name:
                return m
        raise KeyError(name)
