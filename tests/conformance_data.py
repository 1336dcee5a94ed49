"""Parser for bpf_conformance ``.data`` test files.

A file has sections introduced by ``-- name`` lines: ``asm`` (program text),
``raw`` (encoded instructions: one 64-bit little-endian word per token such as
``0x5566778800000018``, or lines of eight hex bytes ``07 00 01 00 ...``),
``mem`` (hex bytes handed to the program: r1 = address, r2 = length),
``result`` (expected r0) and ``error`` (expected failure text).  ``#`` starts a
comment; ``-- no register offset`` / ``-- c`` sections are ignored, exactly as
the suite's own parser does.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

from ubpf_py.isa.instruction import Instruction, decode


@dataclass
class ConformanceTest:
    path: Path
    asm: str = ""
    raw: list[int] | None = None       # 64-bit instruction words
    mem: bytes = b""
    result: int | None = None
    error: str | None = None
    unknown_directive: str | None = None
    sections: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.stem

    def raw_instructions(self) -> list[Instruction] | None:
        if self.raw is None:
            return None
        return decode(b"".join(struct.pack("<Q", w) for w in self.raw))

    def program(self) -> list[Instruction]:
        """The program to run: raw when present (as the suite does), else the assembled asm."""
        from ubpf_py.isa.asm import assemble

        raw = self.raw_instructions()
        return raw if raw is not None else assemble(self.asm)


def _section_of(line: str) -> str | None:
    """The suite's directive matching (substring based, same precedence)."""
    for key in ("asm", "result", "mem", "raw"):
        if key in line:
            return key
    if "no register offset" in line or " c" in line:
        return "ignore"
    if "error" in line:
        return "error"
    return None


def _parse_raw(tokens_by_line: list[list[str]]) -> list[int]:
    words: list[int] = []
    for tokens in tokens_by_line:
        if len(tokens) == 8 and all(len(t) == 2 and not t.startswith("0x") for t in tokens):
            words.append(int.from_bytes(bytes(int(t, 16) for t in tokens), "little"))
        else:
            words.extend(int(t, 16) if t.startswith("0x") else int(t) for t in tokens)
    return words


def parse_file(path: Path) -> ConformanceTest:
    test = ConformanceTest(path)
    state = "ignore"
    asm_lines: list[str] = []
    raw_lines: list[list[str]] = []
    mem_tokens: list[str] = []
    error_seen = False
    for raw_line in path.read_text().splitlines():
        line = raw_line.rstrip("\r").split("#", 1)[0]
        if "--" in line:
            section = _section_of(line)
            if section is None:
                test.unknown_directive = line.strip()
                break
            test.sections.append(section)
            state = section
            if section == "error":
                error_seen = True
            continue
        if not line.strip():
            continue
        if state == "asm":
            asm_lines.append(line)
        elif state == "result":
            text = line.strip()
            test.result = int(text, 16) if "0x" in text else int(text)
        elif state == "mem":
            mem_tokens.extend(line.split())
        elif state == "error":
            test.error = line.strip()
        elif state == "raw":
            raw_lines.append(line.split())
    test.asm = "\n".join(asm_lines)
    if raw_lines:
        test.raw = _parse_raw(raw_lines)
    test.mem = bytes(int(t, 16) for t in mem_tokens)
    if error_seen and test.error is None:
        test.error = ""
    return test


def data_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.data"))
