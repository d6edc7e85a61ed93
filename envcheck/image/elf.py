"""The dynamic-linking facts of a shared object (SONAME, DT_NEEDED, DT_RPATH, DT_RUNPATH), read
from the layer stream in one forward pass, without holding the file.

A reader of our own, not pyelftools: pyelftools seeks (to the section headers at the end of
the file, then back), and a layer is a stream read once. What is needed sits where the program
headers say: PT_DYNAMIC gives the dynamic section's offset; its DT_STRTAB (an address, mapped to
a file offset through the PT_LOAD segments) gives the string table's. The string table is not
always before the dynamic section: the linker puts it near the start, but patchelf (which
NVIDIA's wheels are run through to set RUNPATH=$ORIGIN) writes a new one at the end of the file
(measured: libcudnn*.so.9 of nvidia-cudnn-cu12 9.7.0.66 have it after `.dynamic`, the JAX
plugin's xla_cuda_plugin.so 18 KB in). So the reader keeps the first PREFIX_BYTES of the file as
it passes and, when the table lies further on, reads forward to it.

Memory: at most PREFIX_BYTES + DYNAMIC_BYTES_MAX + STRINGS_BYTES_MAX (2.25 MiB) per file being
read, one file at a time per layer; the 480 MB xla_cuda_plugin.so costs that like any other.
"""

from __future__ import annotations

import re
import struct

import msgspec

PREFIX_BYTES = 1 << 20  # kept from the start of the file: the linker's string table is there
DYNAMIC_BYTES_MAX = 256 << 10  # a real .dynamic: a few hundred bytes
STRINGS_BYTES_MAX = 1 << 20  # read of a string table for the names the dynamic section uses
PHDRS_BYTES_MAX = 64 << 10
PT_LOAD, PT_DYNAMIC = 1, 2
DT_NULL, DT_NEEDED, DT_STRTAB, DT_STRSZ, DT_SONAME, DT_RPATH, DT_RUNPATH = 0, 1, 5, 10, 14, 15, 29
NAME_TAGS = (DT_NEEDED, DT_SONAME, DT_RPATH, DT_RUNPATH)
# Which files are read: the JAX CUDA plugin's shared objects, every library of the nvidia-* wheels,
# and the CUDA libraries of the system (wherever they are, by name).
ELF_RE = re.compile(
    r"(?:(?:^|/)(?:site|dist)-packages/(?:jax_plugins|jax_cuda\d+_plugin|jaxlib|nvidia)/.*\.so"
    r"|(?:^|/)lib(?:cuda|cudart|cublas|cublasLt|cudnn(?:_\w+)?|cufft|cufftw|cusolver|cusparse"
    r"|nccl|nvJitLink|nvrtc(?:-builtins)?|cupti|nvshmem_host|nvidia-ml)\.so)(?:\.[0-9.]+)?$")


class ElfError(ValueError):
    """The file is not an ELF shared object this reader can read; the message says why."""


class ElfFacts(msgspec.Struct, kw_only=True):
    path: str  # "/" + root-relative path
    layer: int  # the layer it was read from
    elf_class: int  # 32 or 64 (0: not an ELF file)
    machine: int  # e_machine (62: x86-64, 183: AArch64)
    soname: str | None = None
    needed: list[str] = []
    rpath: list[str] | None = None  # DT_RPATH's entries, $ORIGIN unexpanded
    runpath: list[str] | None = None
    problem: str | None = None  # why the dynamic facts could not be read (the rest is None)


def is_candidate(path: str) -> bool:
    return ".so" in path and ELF_RE.search(path) is not None


class _Forward:
    """A member's bytes, read forward only; the first PREFIX_BYTES are kept as they pass."""

    def __init__(self, data, size: int):
        self.data, self.size, self.at = data, size, 0
        self.prefix = bytearray()

    def _take(self, n: int) -> bytes:
        got = self.data.read(n)
        if len(self.prefix) < PREFIX_BYTES:
            self.prefix += got[:PREFIX_BYTES - len(self.prefix)]
        self.at += len(got)
        return got

    def bytes_at(self, offset: int, length: int, what: str) -> bytes:
        """`length` bytes at `offset`: from the kept prefix, or read after moving forward."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ElfError(f"{what} at {offset}+{length} lies outside the file ({self.size} bytes)")
        if offset + length <= len(self.prefix):
            return bytes(self.prefix[offset:offset + length])
        head = b""
        if offset < self.at:
            if self.at > len(self.prefix):  # what lies before `at` was skipped, not kept
                raise ElfError(f"{what} at offset {offset} lies before what was read "
                               f"({self.at}) and past the first {PREFIX_BYTES} bytes kept")
            head, length = bytes(self.prefix[offset:]), offset + length - self.at
        while self.at < offset:  # through the prefix, keeping it; past it, skipping
            if self.at < PREFIX_BYTES:
                moved = len(self._take(min(offset, PREFIX_BYTES) - self.at))
            else:
                moved = self.data.skip(offset - self.at)
                self.at += moved
            if not moved:
                raise ElfError(f"{what}: the file ends early (truncated)")
        got = self._take(length)
        if len(got) < length:
            raise ElfError(f"{what}: the file ends early (truncated)")
        return head + got


def read_elf(data, size: int, path: str, layer: int) -> ElfFacts:
    """The facts of the ELF file `data` (a MemberData: read/skip) holds; what cannot be read
    (no ELF at all, a dynamic part that points nowhere) is its `problem`."""
    try:
        return _read_elf(data, size, path, layer)
    except (ElfError, struct.error) as error:
        return ElfFacts(path="/" + path, layer=layer, elf_class=0, machine=0,
                        problem=str(error) or "malformed")


def _read_elf(data, size: int, path: str, layer: int) -> ElfFacts:
    stream = _Forward(data, size)
    ident = stream.bytes_at(0, 16, "ELF identification") if size >= 16 else b""
    if ident[:4] != b"\x7fELF":
        raise ElfError("not an ELF file")
    if ident[4] not in (1, 2) or ident[5] not in (1, 2):
        raise ElfError(f"ELF class {ident[4]} / data encoding {ident[5]} unknown")
    is64, order = ident[4] == 2, "<" if ident[5] == 1 else ">"
    header = stream.bytes_at(16, 48 if is64 else 36, "ELF header")
    fields = struct.unpack(order + ("HHIQQQIHHHHHH" if is64 else "HHIIIIIHHHHHH"), header)
    machine, phoff, phentsize, phnum = fields[1], fields[4], fields[8], fields[9]
    facts = ElfFacts(path="/" + path, layer=layer, elf_class=64 if is64 else 32,
                     machine=machine)
    try:
        dynamic_facts(stream, facts, is64, order, phoff, phentsize, phnum)
    except (ElfError, struct.error) as error:
        facts = ElfFacts(path=facts.path, layer=layer, elf_class=facts.elf_class,
                         machine=machine, problem=str(error) or "malformed")
    return facts


def dynamic_facts(stream: _Forward, facts: ElfFacts, is64: bool, order: str, phoff: int,
                  phentsize: int, phnum: int) -> None:
    """Fill in SONAME, NEEDED, RPATH and RUNPATH from PT_DYNAMIC and its string table."""
    width = 56 if is64 else 32
    if phnum and (phentsize < width or phentsize * phnum > PHDRS_BYTES_MAX):
        raise ElfError(f"program headers of {phnum} × {phentsize} bytes")
    table = stream.bytes_at(phoff, phentsize * phnum, "program headers")
    loads, dynamic = [], None
    for index in range(phnum):
        raw = table[index * phentsize:index * phentsize + width]
        if is64:
            kind, _, offset, vaddr, _, filesz, _, _ = struct.unpack(order + "IIQQQQQQ", raw)
        else:
            kind, offset, vaddr, _, filesz, _, _, _ = struct.unpack(order + "IIIIIIII", raw)
        if kind == PT_LOAD:
            loads.append((vaddr, offset, filesz))
        elif kind == PT_DYNAMIC:
            dynamic = (offset, filesz)
    if dynamic is None:
        return  # a static executable, or an object that links nothing
    if dynamic[1] > DYNAMIC_BYTES_MAX:
        raise ElfError(f"a dynamic section of {dynamic[1]} bytes")
    entries = dynamic_entries(stream.bytes_at(*dynamic, "dynamic section"), is64, order)
    strtab = next((value for tag, value in entries if tag == DT_STRTAB), None)
    used = [(tag, value) for tag, value in entries if tag in NAME_TAGS]
    if not used:
        return
    if strtab is None:
        raise ElfError("the dynamic section names libraries but has no DT_STRTAB")
    base = file_offset(strtab, loads)
    first, last = min(v for _, v in used), max(v for _, v in used)
    size = min(stream.size - base - first, last - first + 4096, STRINGS_BYTES_MAX)
    strings = stream.bytes_at(base + first, size, "string table")
    names = {tag: [] for tag in NAME_TAGS}
    for tag, value in used:
        end = strings.find(b"\0", value - first)
        if end < 0:
            raise ElfError(f"string at {value} of the string table has no end")
        names[tag].append(strings[value - first:end].decode("utf-8", "surrogateescape"))
    facts.needed = names[DT_NEEDED]
    facts.soname = names[DT_SONAME][0] if names[DT_SONAME] else None
    facts.rpath = ":".join(names[DT_RPATH]).split(":") if names[DT_RPATH] else None
    facts.runpath = ":".join(names[DT_RUNPATH]).split(":") if names[DT_RUNPATH] else None


def dynamic_entries(raw: bytes, is64: bool, order: str) -> list[tuple[int, int]]:
    """(d_tag, d_val) pairs up to DT_NULL."""
    form = order + ("qQ" if is64 else "iI")
    step = struct.calcsize(form)
    entries = []
    for at in range(0, len(raw) - step + 1, step):
        tag, value = struct.unpack_from(form, raw, at)
        if tag == DT_NULL:
            break
        entries.append((tag, value))
    return entries


def file_offset(address: int, loads: list[tuple[int, int, int]]) -> int:
    """The file offset of a virtual address, through the PT_LOAD segment holding it."""
    for vaddr, offset, filesz in loads:
        if vaddr <= address < vaddr + filesz:
            return address - vaddr + offset
    raise ElfError(f"DT_STRTAB address {address:#x} lies in no loaded segment")
