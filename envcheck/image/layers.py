"""Stream a layer blob — compressed bytes -> digest check -> gzip/zstd/plain -> diff_id -> tar
headers — without holding more than a few buffers of it, into the layer's file table
(filetree.py folds the layers into the merged view).

Only small files the facts need (ld.so.cache, dpkg status, ld.so.conf*) are kept, up to a size
limit; everything else is a header in the file table.
"""

from __future__ import annotations

import dataclasses
import posixpath
import tarfile
import threading
import zlib
from collections.abc import Callable, Iterator
from typing import BinaryIO

from envcheck.image.blobstream import GZIP_MAGIC, ZSTD_MAGIC, BlobStream, StreamError
from envcheck.image.filetree import FileInfo, FileTree

ZERO_BLOCK = bytes(512)
PAX_BYTES_MAX = 1024 * 1024  # a PAX or GNU long-name header larger than this is hostile
KEEP_FILES = ("etc/ld.so.cache", "var/lib/dpkg/status", "etc/ld.so.conf")
KEEP_PREFIXES = ("etc/ld.so.conf.d/", "var/lib/dpkg/status.d/")
KEEP_BYTES_MAX = 64 * 1024 * 1024  # one kept file (a real ld.so.cache or dpkg status: 1-10 MB)
KEEP_TOTAL_MAX = 128 * 1024 * 1024  # all of a layer's (status.d holds one file per package)
UNCOMPRESSED_BYTES_MAX = 64 * 1024**3  # a tar bomb stops here, with an error
FILES_MAX = 4_000_000  # file-table nodes of one image (a big ML image has under a million)
WHITEOUT, OPAQUE = ".wh.", ".wh..wh..opq"
_MODES: dict[int, int] = {}  # one int object per distinct mode, not one per file
_MODES_MAX = 0o200000  # modes above this (none in practice) are not shared


class LayerError(ValueError):
    """A layer that cannot be read or does not match its digest; the message names it."""


class StreamCut(Exception):
    """The tar stream a member is read from broke (cut short, or its compression corrupt): a
    fault of the archive around a layer, not of the layer itself."""


class FileBudget:
    """How many file-table nodes the layers of one image may make between them: the table is
    the one part of inspect-image that grows with the image (about 170 bytes a node)."""

    def __init__(self, limit: int | None = None) -> None:
        self.limit = FILES_MAX if limit is None else limit
        self.used = 0
        self._lock = threading.Lock()  # layers are scanned in several threads

    def take(self, nodes: int) -> None:
        with self._lock:
            self.used += nodes
            over = self.used > self.limit
        if over:
            raise LayerError(f"more than {self.limit:,} files and directories in the image: "
                             "envcheck keeps their table in memory and stops here; "
                             "--no-layers reports all but the layer contents")


@dataclasses.dataclass
class LayerScan:
    """What one layer holds: its files, its whiteouts, the small files kept, and its digests."""

    index: int
    digest: str = ""  # compressed (as stored), verified
    diff_id: str = ""  # uncompressed sha256
    compressed_bytes: int = 0
    uncompressed_bytes: int = 0
    compression: str = ""
    files: FileTree = dataclasses.field(default_factory=FileTree)  # moves to the merged view
    file_count: int = 0
    whiteouts: list[str] = dataclasses.field(default_factory=list)
    opaque_dirs: list[str] = dataclasses.field(default_factory=list)
    kept: dict[str, bytes] = dataclasses.field(default_factory=dict)


def clean_path(name: str, layer: int) -> str:
    """A tar member name as a root-relative path; `..` that climbs out of the root is an error
    (nothing is ever written to disk, but such a layer is malformed)."""
    if "\\" not in name and "//" not in name and "/." not in "/" + name:
        return name.strip("/")  # no empty, `.` or `..` parts (most names): nothing to fold
    parts: list[str] = []
    for part in name.replace("\\", "/").split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise LayerError(f"tar entry {name!r} escapes the image root")
            parts.pop()
            continue
        parts.append(part)
    return "/".join(parts)


def _kind(member: Header) -> str:
    if member.isreg():
        return "file"
    if member.isdir():
        return "dir"
    if member.issym():
        return "symlink"
    if member.islnk():
        return "hardlink"
    return "other"


def scan_layer(blob: BinaryIO, index: int, *, expected_digest: str | None = None,
               expected_size: int | None = None,
               progress: Callable[[int], None] | None = None,
               stop: threading.Event | None = None,
               budget: FileBudget | None = None, name: str | None = None) -> LayerScan:
    """Stream one layer blob; raise LayerError on a digest/size mismatch or a broken stream
    (blobstream.Cancelled when `stop` is set meanwhile). `name`: the layer's in messages."""
    stream = BlobStream(blob, limit_bytes=expected_size, uncompressed_max=UNCOMPRESSED_BYTES_MAX,
                        progress=progress, stop=stop)
    scan = LayerScan(index)
    name = (name or f"layer {index}") + (f" ({expected_digest})" if expected_digest else "")
    budget = budget or FileBudget()
    try:
        chunks = iter(stream)
        walk_tar(_Chunks(chunks), lambda info, data: _record(scan, info, data, budget))
        stream.drain(chunks)  # padding after the end-of-archive blocks counts in the diff_id
    except (LayerError, StreamError) as error:
        raise LayerError(f"{name}: {error}") from None
    scan.compression, scan.file_count = stream.compression, len(scan.files)
    scan.digest, scan.compressed_bytes = stream.digest, stream.compressed_bytes
    scan.diff_id, scan.uncompressed_bytes = stream.diff_id, stream.uncompressed_bytes
    if expected_size is not None and stream.compressed_bytes != expected_size:
        raise LayerError(f"{name}: {stream.compressed_bytes} bytes, the descriptor says "
                         f"{expected_size}")
    if expected_digest is not None and scan.digest != expected_digest:
        raise LayerError(f"{name}: content digest {scan.digest} does not match: corrupted or "
                         "tampered blob")
    return scan


def _record(scan: LayerScan, member: Header, data: MemberData, budget: FileBudget) -> None:
    path = clean_path(member.name, scan.index)
    if not path:
        return
    directory, _, base = path.rpartition("/")
    if base == OPAQUE:
        budget.take(1)
        scan.opaque_dirs.append(directory)
        return
    if base.startswith(WHITEOUT):
        budget.take(1)
        scan.whiteouts.append(posixpath.join(directory, base[len(WHITEOUT):]))
        return
    link = member.linkname if (member.issym() or member.islnk()) else None
    mode = _MODES.setdefault(member.mode, member.mode) if member.mode < _MODES_MAX else member.mode
    info = FileInfo(member.file_size(), mode, _kind(member), link, scan.index)
    budget.take(scan.files.add(path, info))
    wanted = path in KEEP_FILES or path.startswith(KEEP_PREFIXES)
    if wanted and member.isreg() and member.real_size < 0 and member.size <= KEEP_BYTES_MAX:
        if sum(map(len, scan.kept.values())) + member.size > KEEP_TOTAL_MAX:
            raise LayerError(f"{path}: the layer's ld.so.cache, ld.so.conf and dpkg status files "
                             f"come to over {KEEP_TOTAL_MAX} bytes, the most held in memory")
        scan.kept[path] = data.all()


class _Chunks:
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


def _data(chunks: _Chunks, size: int, what: str) -> bytes:
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


def _sparse_extensions(chunks: _Chunks, block: bytes) -> None:
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
    walk_tar(_Chunks(chunks), on_member)


def walk_tar(chunks: _Chunks, on_member: Callable) -> None:
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


def _member(chunks: _Chunks, info: Header, on_member: Callable) -> None:
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

    def __init__(self, chunks: _Chunks, size: int):
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
