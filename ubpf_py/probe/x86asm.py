"""x86-64 assembly text to position-independent machine code, through LLVM (llvmlite).

The code we place in a target (in-target trampolines, the trap guard) is written as Intel-syntax
assembly and assembled here, so no assembler has to be installed and no byte string is written
by hand.  The result must need no relocation: it is copied to an address only known at run time.
"""

from __future__ import annotations

import io


def assemble(text: str) -> tuple[bytes, dict[str, int]]:
    """Assemble ``text`` (Intel syntax, ``.set`` lines included); returns the code and the offset of
    every label.  Raises AssertionError when the code would need relocations."""
    import llvmlite.binding as llvm
    from elftools.elf.elffile import ELFFile

    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    llvm.initialize_native_asmparser()
    text = ".intel_syntax noprefix\n.text\n" + text
    escaped = "".join(c if c.isalnum() or c in " _.,:[]+-*#" else f"\\{ord(c):02X}" for c in text)
    mod = llvm.parse_assembly(f'module asm "{escaped}"\n')
    tm = llvm.Target.from_triple("x86_64-unknown-linux-gnu").create_target_machine(reloc="pic")
    elf = ELFFile(io.BytesIO(tm.emit_object(mod)))
    if elf.get_section_by_name(".rela.text") is not None:
        raise AssertionError("position-independent assembly must not need relocations")
    code = elf.get_section_by_name(".text").data()
    text_idx = next(i for i, s in enumerate(elf.iter_sections()) if s.name == ".text")
    labels = {s.name: s["st_value"] for s in elf.get_section_by_name(".symtab").iter_symbols()
              if s.name and s["st_shndx"] == text_idx}
    return bytes(code), labels
