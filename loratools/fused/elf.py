"""The symbols an ELF object file imports, read from its symbol table (what ``nm -u`` lists).

An image's objects are checked against them before they are linked (:mod:`loratools.fused.native`):
MCJIT aborts the process on a symbol it cannot resolve, and code generation adds imports (``memset``,
compiler builtins) that the LLVM module never declared, so the object itself is the only full list.
"""

from __future__ import annotations

import struct

_SHT_SYMTAB = 2
_SHN_UNDEF = 0
_GLOBAL_OR_WEAK = (1, 2)  # STB_GLOBAL, STB_WEAK
_HEADER = struct.Struct("<IIQQQQIIQQ")  # Elf64_Shdr: name, type, flags, addr, offset, size, link, info, addralign, entsize
_SYMBOL = struct.Struct("<IBBHQQ")  # Elf64_Sym: name, info, other, shndx, value, size


def imports(code: bytes) -> tuple[str, ...]:
    """The undefined global and weak symbols of ``code``, a 64-bit little-endian ELF object, sorted; ValueError for
    anything else (another object format, or a file cut short)."""
    if len(code) < 64 or code[:4] != b"\x7fELF" or code[4] != 2 or code[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF object")
    try:
        (shoff,) = struct.unpack_from("<Q", code, 0x28)
        shentsize, shnum = struct.unpack_from("<HH", code, 0x3A)
        sections = [_HEADER.unpack_from(code, shoff + i * shentsize) for i in range(shnum)]
        names: set[str] = set()
        for _, kind, _, _, offset, size, link, _, _, entsize in sections:
            if kind != _SHT_SYMTAB:
                continue
            strings = sections[link][4]
            for pos in range(offset, offset + size, entsize or _SYMBOL.size):
                name, info, _, shndx, _, _ = _SYMBOL.unpack_from(code, pos)
                if shndx == _SHN_UNDEF and name and info >> 4 in _GLOBAL_OR_WEAK:
                    start = strings + name
                    names.add(code[start : code.index(b"\0", start)].decode())
    except (struct.error, IndexError, ValueError) as err:
        raise ValueError(f"a malformed ELF object: {err}") from None
    return tuple(sorted(names))
