"""The tar walker under every layer scan and the one-pass `docker save` reader: headers (ustar,
GNU long names and sparse files, PAX) read from an iterator of chunks, file data skipped without
copying it, or handed out whole or as a stream (MemberData)."""

from __future__ import annotations

import dataclasses
import tarfile
import zlib
from collections.abc import Callable, Iterator

from envcheck.image.blobstream import GZIP_MAGIC, ZSTD_MAGIC, StreamError
from envcheck.image.errors import LayerError

ZERO_BLOCK = bytes(512)
PAX_BYTES_MAX = 1024 * 1024  # a PAX or GNU long-name header larger than this is hostile


class StreamCut(Exception):
    """The tar stream a member is read from broke (cut short, or its compression corrupt): a
    fault of the archive around a layer, not of the layer itself."""


class Chunks:
    """Byte-exact reads and cheap skips over an iterator of chunks."""

    def __init__(self, iterator: Iterator[bytes]):
        self._iterator = iterator
        self._chunk = memoryview(b"")

    def _fill(self) -> bool:
        while not self._chunk:
            nxt = next(self._iterator, None)
            if nxt is None:
                return False
            self._chunk = memoryview(nxt)
        return True

    def read(self, n: int) -> bytes:
        parts = []
        while n > 0 and self._fill():
            part = self._chunk[:n]
            self._chunk = self._chunk[len(part):]
            parts.append(bytes(part))
            n -= len(part)
        return b"".join(parts)

    def readinto(self, buffer) -> int:
        """Up to len(buffer) bytes, copied once; 0 at the end."""
        if not self._fill():
            return 0
        n = min(len(buffer), len(self._chunk))
        buffer[:n] = self._chunk[:n]
        self._chunk = self._chunk[n:]
        return n

    def skip(self, n: int) -> int:
        skipped = 0
        while n > skipped and self._fill():
            step = min(n - skipped, len(self._chunk))
            self._chunk = self._chunk[step:]
            skipped += step
        return skipped


def _pax_records(raw: bytes) -> dict[str, str]:
    """'%d key=value\n' records of a PAX extended header."""
    records, position = {}, 0
    while position < len(raw) and raw[position:position + 1] != b"\0":
        space = raw.find(b" ", position)
        try:
            length = int(raw[position:space])
        except ValueError:
            raise LayerError("malformed PAX extended header") from None
        if length <= 0 or space < 0 or position + length > len(raw):
            raise LayerError("malformed PAX extended header")
        key, _, value = raw[space + 1:position + length - 1].partition(b"=")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        position += length
    return records


def _padded(size: int) -> int:
    return (size + 511) // 512 * 512


def _data(chunks: Chunks, size: int, what: str) -> bytes:
    if size > PAX_BYTES_MAX:
        raise LayerError(f"{what} of {size} bytes is over the {PAX_BYTES_MAX}-byte limit")
    raw = chunks.read(_padded(size))
    if len(raw) < _padded(size):
        raise LayerError("truncated tar stream")
    return raw[:size]


@dataclasses.dataclass(slots=True)
class Header:
    """The fields of a tar header that the scan uses (tarfile.TarInfo costs 3x more to make)."""

    name: str
    linkname: str
    size: int  # bytes of data stored in the archive after the header
    mode: int
    type: bytes
    real_size: int = -1  # a sparse file's size (holes included); else -1, meaning `size`

    def isreg(self) -> bool:
        return self.type in tarfile.REGULAR_TYPES

    isfile = isreg  # tarfile.TarInfo's name for it

    def isdir(self) -> bool:
        return self.type == tarfile.DIRTYPE

    def issym(self) -> bool:
        return self.type == tarfile.SYMTYPE

    def islnk(self) -> bool:
        return self.type == tarfile.LNKTYPE

    def file_size(self) -> int:
        return self.size if self.real_size < 0 else self.real_size


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _number(field: bytes) -> int:
    """An octal field, or GNU base-256 (first byte 0o200 or 0o377). Read as tarfile reads it:
    ASCII, and str.strip's whitespace (bytes.strip keeps \\x1c-\\x1f, which str.strip drops)."""
    if field[0] in (0o200, 0o377):
        return tarfile.nti(field)
    try:
        return int(field.split(b"\0", 1)[0].decode("ascii").strip() or "0", 8)
    except ValueError:  # UnicodeDecodeError included
        raise LayerError("bad tar header (invalid number)") from None


def _checksum_ok(block: bytes) -> bool:
    """The header checksum: the byte sum with the checksum field as spaces. adler32's low half
    is that sum mod 65521, 30x cheaper than summing in Python; a header that fails it gets the
    exact test, signed sums included (some old tars sign their bytes)."""
    stored = _number(block[148:156])
    spaces_for_field = 256 - sum(block[148:156])
    if (stored - spaces_for_field) % 65521 == ((zlib.adler32(block) & 0xFFFF) - 1) % 65521:
        return True
    return stored in tarfile.calc_chksums(block)


def _header(block: bytes) -> Header:
    if len(block) < 512:
        raise LayerError("truncated tar stream")
    if not _checksum_ok(block):
        raise LayerError("bad tar header (bad checksum)")
    name, kind = _text(block[0:100]), block[156:157]
    if kind == tarfile.AREGTYPE and name.endswith("/"):
        kind = tarfile.DIRTYPE  # the old V7 way to store a directory
    prefix = _text(block[345:500]) if kind not in tarfile.GNU_TYPES else ""
    if prefix:  # ustar splits long names in two
        name = prefix + "/" + name
    header = Header(name, _text(block[157:257]), _number(block[124:136]),
                    _number(block[100:108]), kind)
    if kind == tarfile.GNUTYPE_SPARSE:
        header.real_size = _number(block[483:495])
    return header


def _sparse_extensions(chunks: Chunks, block: bytes) -> None:
    """Skip the extension headers of an old GNU sparse file (more than 4 data runs)."""
    extended = block[482]
    while extended:
        extension = chunks.read(512)
        if len(extension) < 512:
            raise LayerError("truncated tar stream")
        extended = extension[504]


def _extended(info: Header, pax: dict[str, str], long_names: dict[bytes, str]) -> None:
    """Apply what PAX records and GNU long-name entries say about the entry after them."""
    info.name = (pax.get("GNU.sparse.name") or pax.get("path")
                 or long_names.get(tarfile.GNUTYPE_LONGNAME) or info.name)
    info.linkname = (pax.get("linkpath") or long_names.get(tarfile.GNUTYPE_LONGLINK)
                     or info.linkname)
    for key, field in (("size", "size"), ("GNU.sparse.realsize", "real_size"),
                       ("GNU.sparse.size", "real_size")):
        if key in pax:
            try:
                setattr(info, field, int(pax[key]))
            except ValueError:
                raise LayerError(f"PAX {key} {pax[key][:40]!r} is not a number") from None
    if info.size < 0 or (info.real_size < 0 and info.real_size != -1):
        raise LayerError(f"tar entry {info.name[:80]!r} has a negative size")


def starts_a_layer(head: bytes) -> bool:
    """Whether an archive member's first 512 bytes start a layer blob: gzip or zstd, or a tar
    header (or the end-of-archive block of an empty tar)."""
    if head.startswith((GZIP_MAGIC, ZSTD_MAGIC)):
        return True
    try:
        return len(head) == 512 and (head == ZERO_BLOCK or _checksum_ok(head))
    except LayerError:  # a checksum field that is no number
        return False


def walk_chunks(chunks: Iterator[bytes], on_member: Callable) -> None:
    """walk_tar over an iterator of chunks."""
    walk_tar(Chunks(chunks), on_member)


def walk_tar(chunks: Chunks, on_member: Callable) -> None:
    """Walk tar headers (ustar, GNU long names and sparse files, PAX), skipping file data
    without copying it. on_member(info, data) is called per entry with its Header and its
    MemberData (the content, whole or as a stream); what it leaves unread is skipped."""
    pax: dict[str, str] = {}
    long_names: dict[bytes, str] = {}
    while True:
        block = chunks.read(512)
        if not block or block == ZERO_BLOCK:
            return  # the end-of-archive marker (or a tar that stops at a header boundary)
        info = _header(block)
        if info.type in (tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE):
            pax = _pax_records(_data(chunks, info.size, "PAX header"))
            continue
        if info.type == tarfile.XGLTYPE:
            _data(chunks, info.size, "PAX global header")
            continue
        if info.type in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK):
            raw = _data(chunks, info.size, "GNU long name").split(b"\0", 1)[0]
            long_names[info.type] = raw.decode("utf-8", "surrogateescape")
            continue
        if info.type == tarfile.GNUTYPE_SPARSE:
            _sparse_extensions(chunks, block)
        if pax or long_names:
            _extended(info, pax, long_names)
            pax, long_names = {}, {}
        elif info.size < 0:
            raise LayerError(f"tar entry {info.name[:80]!r} has a negative size")
        _member(chunks, info, on_member)


def _member(chunks: Chunks, info: Header, on_member: Callable) -> None:
    """Hand one entry to on_member, then skip whatever of its data it did not read."""
    has_data = info.isreg() or info.type not in tarfile.SUPPORTED_TYPES
    data = MemberData(chunks, info.size if has_data else 0)
    on_member(info, data)
    remaining = _padded(data.size) - data.taken
    if chunks.skip(remaining) < remaining:
        raise LayerError("truncated tar stream")


class MemberData:
    """One tar entry's content: all() of it at once, or read as a stream through readinto (a
    layer inside a `docker save` archive; another thread may read it, one read at a time).
    `taken`: bytes consumed from the tar stream. A stream that ends early raises StreamCut.
    (Not an io.RawIOBase: one is made per entry, and those cost 7x more to make.)"""

    __slots__ = ("_chunks", "size", "taken", "_head")

    def __init__(self, chunks: Chunks, size: int):
        self._chunks, self.size, self.taken = chunks, size, 0
        self._head = b""  # taken but not yet read

    def head(self, n: int) -> bytes:
        """The first n bytes (fewer if the entry is shorter); they are still there to read.
        Only before the first read."""
        want = min(n, self.size) - self.taken
        if want > 0:
            got = self._chunks.read(want)
            self._head, self.taken = self._head + got, self.taken + len(got)
        return self._head[:n]

    def all(self) -> bytes:
        data = self._head + self._chunks.read(self.size - self.taken)
        self._head, self.taken = b"", self.size
        if len(data) < self.size:
            raise LayerError("truncated tar stream")
        return data

    def read(self, n: int) -> bytes:
        """Up to n bytes from where the reading stands (fewer at the entry's end or a cut)."""
        assert not self._head, "read() after head()"
        got = self._chunks.read(min(n, self.size - self.taken))
        self.taken += len(got)
        return got

    def skip(self, n: int) -> int:
        """Move on by up to n bytes without copying them; how many were skipped."""
        assert not self._head, "skip() after head()"
        skipped = self._chunks.skip(min(n, self.size - self.taken))
        self.taken += skipped
        return skipped

    def readinto(self, buffer) -> int:
        if self._head:
            n = min(len(buffer), len(self._head))
            buffer[:n], self._head = self._head[:n], self._head[n:]
            return n
        left = self.size - self.taken
        if left <= 0:
            return 0
        try:
            n = self._chunks.readinto(memoryview(buffer)[:left])
        except StreamError as error:
            raise StreamCut(str(error)) from None
        if not n:
            raise StreamCut("truncated tar stream")
        self.taken += n
        return n
