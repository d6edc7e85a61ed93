"""glibc `/etc/ld.so.cache` reader in pure Python: new format 1.1 (with the extension directory:
generator string, glibc-hwcaps names), old `ld.so-1.7.0` format, and the compat layout (old header
followed by a new-format cache). Layouts from glibc `sysdeps/generic/dl-cache.h` and `elf/cache.c`
(../shared/reference/images-registry-ldcache.md §4). `render` prints what `ldconfig -p -C FILE`
prints, which is how the tests check this reader against the real ldconfig.
"""

from __future__ import annotations

import dataclasses
import struct

OLD_MAGIC = b"ld.so-1.7.0"
NEW_MAGIC = b"glibc-ld.so.cache1.1"
EXTENSION_MAGIC = 0xEAA42174
NEW_HEADER = struct.Struct("<20sIIB3xI12x")  # magic+version, nlibs, len_strings, flags, ext offset
NEW_ENTRY = struct.Struct("<iIIIQ")  # flags, key, value, osversion, hwcap
OLD_ENTRY = struct.Struct("<iII")  # flags, key, value
HWCAP_EXTENSION = 1 << 62
TAG_GENERATOR, TAG_GLIBC_HWCAPS = 0, 1
SIZE_MAX_BYTES = 64 * 1024 * 1024  # a real cache is tens of KB; refuse absurd inputs

TYPES = {0: "libc4", 1: "ELF", 2: "libc5", 3: "libc6"}
ARCHES = {
    0x0000: "", 0x0100: ",64bit", 0x0200: ",IA-64", 0x0300: ",x86-64", 0x0400: ",64bit",
    0x0500: ",64bit", 0x0600: ",N32", 0x0700: ",64bit", 0x0800: ",x32", 0x0900: ",hard-float",
    0x0A00: ",AArch64", 0x0B00: ",soft-float", 0x0C00: ",nan2008", 0x0D00: ",N32,nan2008",
    0x0E00: ",64bit,nan2008", 0x0F00: ",soft-float", 0x1000: ",double-float",
}
# What ld.so accepts on each architecture (_DL_CACHE_DEFAULT_ID).
DEFAULT_FLAGS = {"amd64": 0x0303, "arm64": 0x0A03}


class LdCacheError(ValueError):
    """A file that is not a readable ld.so.cache; the message says what is wrong."""


@dataclasses.dataclass(frozen=True)
class Entry:
    soname: str
    path: str
    flags: int
    osversion: int = 0
    hwcap: int = 0
    hwcap_name: str | None = None


@dataclasses.dataclass(frozen=True)
class LdCache:
    format: str  # "new", "old" or "compat"
    entries: tuple[Entry, ...]
    generator: str | None = None

    def lookup(self, soname: str, arch: str = "amd64") -> list[Entry]:
        """Entries ld.so could use for `soname` on `arch`, in cache order (hwcaps first)."""
        wanted = DEFAULT_FLAGS.get(arch)
        return [e for e in self.entries
                if e.soname == soname and (wanted is None or e.flags == wanted)]


def parse(data: bytes) -> LdCache:
    if len(data) > SIZE_MAX_BYTES:
        raise LdCacheError(f"ld.so.cache is {len(data)} bytes, over the {SIZE_MAX_BYTES} limit")
    if data.startswith(NEW_MAGIC):
        return _parse_new(data, 0, "new")
    if data.startswith(OLD_MAGIC):
        return _parse_old_or_compat(data)
    raise LdCacheError("not an ld.so.cache: unknown magic "
                       f"{data[:20]!r} (expected 'glibc-ld.so.cache1.1' or 'ld.so-1.7.0')")


def _string(data: bytes, offset: int) -> str:
    end = data.find(b"\0", offset)
    if offset >= len(data) or end < 0:
        raise LdCacheError(f"string offset {offset} points outside the file ({len(data)} bytes)")
    return data[offset:end].decode("utf-8", "surrogateescape")


def _parse_new(data: bytes, base: int, fmt: str) -> LdCache:
    if len(data) < base + NEW_HEADER.size:
        raise LdCacheError("truncated ld.so.cache header")
    _, nlibs, len_strings, flags, ext_offset = NEW_HEADER.unpack_from(data, base)
    if flags & 3 not in (0, 2):
        raise LdCacheError(f"ld.so.cache has wrong endianness or is marked invalid (flags {flags})")
    entries_end = base + NEW_HEADER.size + nlibs * NEW_ENTRY.size
    if entries_end > len(data):
        raise LdCacheError(f"ld.so.cache claims {nlibs} entries but is only {len(data)} bytes")
    # In the compat layout string offsets count from the new header, which is `base`.
    hwcaps, generator = _extensions(data, ext_offset, base) if ext_offset else ([], None)
    entries = []
    for index in range(nlibs):
        flag, key, value, osversion, hwcap = NEW_ENTRY.unpack_from(
            data, base + NEW_HEADER.size + index * NEW_ENTRY.size)
        name = None
        if hwcap & HWCAP_EXTENSION and hwcaps:
            slot = hwcap & 0xFFFFFFFF
            if slot >= len(hwcaps):
                raise LdCacheError(f"entry {index} names glibc-hwcaps slot {slot} of {len(hwcaps)}")
            name = hwcaps[slot]
        entries.append(Entry(_string(data, base + key), _string(data, base + value), flag,
                             osversion, hwcap, name))
    return LdCache(fmt, tuple(entries), generator)


def _extensions(data: bytes, offset: int, base: int) -> tuple[list[str], str | None]:
    """The extension directory (at a file offset). Its glibc-hwcaps names are string offsets
    from the new-format header, as ld.so reads them (in the compat layout `ldconfig -p` reads
    them from the file start instead and prints garbage; ld.so is what matters)."""
    if offset % 4 or offset + 8 > len(data):
        raise LdCacheError(f"extension directory offset {offset} is misaligned or past the end")
    magic, count = struct.unpack_from("<II", data, offset)
    if magic != EXTENSION_MAGIC:
        return [], None  # not an extension directory: glibc ignores it too
    if offset + 8 + count * 16 > len(data):
        raise LdCacheError(f"extension directory claims {count} sections past the end")
    hwcaps: list[str] = []
    generator = None
    for index in range(count):
        tag, _, start, size = struct.unpack_from("<IIII", data, offset + 8 + index * 16)
        if start + size > len(data):
            raise LdCacheError(f"extension section {index} lies past the end of the file")
        if tag == TAG_GENERATOR:
            generator = data[start:start + size].decode("utf-8", "replace")
        elif tag == TAG_GLIBC_HWCAPS:
            if start % 4 or size % 4:
                raise LdCacheError("glibc-hwcaps section is misaligned")
            hwcaps = [_string(data, base + s)
                      for s in struct.unpack_from(f"<{size // 4}I", data, start)]
    return hwcaps, generator


def _parse_old_or_compat(data: bytes) -> LdCache:
    if len(data) < 16:
        raise LdCacheError("truncated ld.so.cache header")
    (nlibs,) = struct.unpack_from("<I", data, 12)  # magic[11] padded to 12 by the int alignment
    entries_end = 16 + nlibs * OLD_ENTRY.size
    if entries_end > len(data):
        raise LdCacheError(f"ld.so.cache claims {nlibs} entries but is only {len(data)} bytes")
    # Compat: a new-format cache follows, aligned to 8 (ALIGN_CACHE of cache_file_new).
    new_base = (entries_end + 7) & ~7
    if data[new_base:new_base + len(NEW_MAGIC)] == NEW_MAGIC:
        return _parse_new(data, new_base, "compat")
    entries = []
    for index in range(nlibs):
        flag, key, value = OLD_ENTRY.unpack_from(data, 16 + index * OLD_ENTRY.size)
        entries.append(Entry(_string(data, entries_end + key), _string(data, entries_end + value),
                             flag))
    return LdCache("old", tuple(entries))


def render(cache: LdCache, path: str) -> str:
    """The text of `ldconfig -p -C path` for this cache."""
    lines = [f"{len(cache.entries)} libs found in cache `{path}'"]
    for entry in cache.entries:
        kind = TYPES.get(entry.flags & 0xFF, "unknown")
        arch = ARCHES.get(entry.flags & 0xFF00, f",{entry.flags & 0xFF00}")
        hwcap = (f', hwcap: "{entry.hwcap_name}"' if entry.hwcap_name is not None
                 else f", hwcap: {entry.hwcap:#018x}" if entry.hwcap else "")
        lines.append(f"\t{entry.soname} ({kind}{arch}{hwcap}) => {entry.path}")
    if cache.generator:
        lines.append(f"Cache generated by: {cache.generator}")
    return "\n".join(lines) + "\n"
