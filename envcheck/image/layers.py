"""Stream a layer blob — compressed bytes -> digest check -> gzip/zstd/plain -> diff_id -> tar
headers — without holding more than a few buffers of it, and fold the layers into a merged view
(whiteouts and opaque directories applied).

Only small files the facts need (ld.so.cache, dpkg status, ld.so.conf*) are kept, up to a size
limit; everything else is a header in the file table.
"""

from __future__ import annotations

import dataclasses
import posixpath
import tarfile
import threading
from collections.abc import Callable, Iterator
from typing import BinaryIO

from envcheck.image.blobstream import BlobStream, StreamError

ZERO_BLOCK = bytes(512)
PAX_BYTES_MAX = 1024 * 1024  # a PAX or GNU long-name header larger than this is hostile
KEEP_FILES = ("etc/ld.so.cache", "var/lib/dpkg/status", "etc/ld.so.conf")
KEEP_PREFIXES = ("etc/ld.so.conf.d/", "var/lib/dpkg/status.d/")
KEEP_BYTES_MAX = 64 * 1024 * 1024  # one kept file (a real ld.so.cache or dpkg status: 1-10 MB)
KEEP_TOTAL_MAX = 128 * 1024 * 1024  # all of a layer's (status.d holds one file per package)
UNCOMPRESSED_BYTES_MAX = 64 * 1024**3  # a tar bomb stops here, with an error
WHITEOUT, OPAQUE = ".wh.", ".wh..wh..opq"


class LayerError(ValueError):
    """A layer that cannot be read or does not match its digest; the message names it."""


@dataclasses.dataclass(frozen=True)
class FileInfo:
    size: int
    mode: int
    kind: str  # file | dir | symlink | hardlink | other
    link: str | None
    layer: int


@dataclasses.dataclass
class LayerScan:
    """What one layer holds: its files, its whiteouts, the small files kept, and its digests."""

    index: int
    digest: str = ""  # compressed (as stored), verified
    diff_id: str = ""  # uncompressed sha256
    compressed_bytes: int = 0
    uncompressed_bytes: int = 0
    compression: str = ""
    files: dict[str, FileInfo] = dataclasses.field(default_factory=dict)
    whiteouts: list[str] = dataclasses.field(default_factory=list)
    opaque_dirs: list[str] = dataclasses.field(default_factory=list)
    kept: dict[str, bytes] = dataclasses.field(default_factory=dict)

    @property
    def file_count(self) -> int:
        return len(self.files)


def clean_path(name: str, layer: int) -> str:
    """A tar member name as a root-relative path; `..` that climbs out of the root is an error
    (nothing is ever written to disk, but such a layer is malformed)."""
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


def _kind(member: tarfile.TarInfo) -> str:
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
               stop: threading.Event | None = None) -> LayerScan:
    """Stream one layer blob; raise LayerError on a digest/size mismatch or a broken stream
    (blobstream.Cancelled when `stop` is set meanwhile)."""
    stream = BlobStream(blob, limit_bytes=expected_size, uncompressed_max=UNCOMPRESSED_BYTES_MAX,
                        progress=progress, stop=stop)
    scan = LayerScan(index)
    name = f"layer {index}" + (f" ({expected_digest})" if expected_digest else "")
    try:
        chunks = iter(stream)
        walk_tar(_Chunks(chunks), lambda info, read: _record(scan, info, read))
        stream.drain(chunks)  # padding after the end-of-archive blocks counts in the diff_id
    except (LayerError, StreamError) as error:
        raise LayerError(f"{name}: {error}") from None
    scan.compression = stream.compression
    scan.digest, scan.compressed_bytes = stream.digest, stream.compressed_bytes
    scan.diff_id, scan.uncompressed_bytes = stream.diff_id, stream.uncompressed_bytes
    if expected_size is not None and stream.compressed_bytes != expected_size:
        raise LayerError(f"{name}: {stream.compressed_bytes} bytes, the descriptor says "
                         f"{expected_size}")
    if expected_digest is not None and scan.digest != expected_digest:
        raise LayerError(f"{name}: content digest {scan.digest} does not match: corrupted or "
                         "tampered blob")
    return scan


def _record(scan: LayerScan, member: tarfile.TarInfo, read: Callable[[], bytes]) -> None:
    path = clean_path(member.name, scan.index)
    if not path:
        return
    directory, base = posixpath.split(path)
    if base == OPAQUE:
        scan.opaque_dirs.append(directory)
        return
    if base.startswith(WHITEOUT):
        scan.whiteouts.append(posixpath.join(directory, base[len(WHITEOUT):]))
        return
    link = member.linkname if (member.issym() or member.islnk()) else None
    scan.files[path] = FileInfo(member.size, member.mode, _kind(member), link, scan.index)
    wanted = path in KEEP_FILES or path.startswith(KEEP_PREFIXES)
    if wanted and member.isreg() and member.size <= KEEP_BYTES_MAX:
        if sum(map(len, scan.kept.values())) + member.size > KEEP_TOTAL_MAX:
            raise LayerError(f"{path}: the layer's ld.so.cache, ld.so.conf and dpkg status files "
                             f"come to over {KEEP_TOTAL_MAX} bytes, the most held in memory")
        scan.kept[path] = read()


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


def _header(block: bytes) -> tarfile.TarInfo:
    if len(block) < 512:
        raise LayerError("truncated tar stream")
    try:
        return tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    except tarfile.HeaderError as error:
        raise LayerError(f"bad tar header ({error})") from None


def walk_tar(chunks: _Chunks, on_member: Callable) -> None:
    """Walk tar headers (ustar, GNU long names, PAX), skipping file data without copying it.
    on_member(info, read) is called per entry; `read()` returns that entry's content."""
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
        info.name = pax.get("path") or long_names.get(tarfile.GNUTYPE_LONGNAME) or info.name
        info.linkname = (pax.get("linkpath") or long_names.get(tarfile.GNUTYPE_LONGLINK)
                         or info.linkname)
        if "size" in pax:
            try:
                info.size = int(pax["size"])
            except ValueError:
                raise LayerError(f"PAX size {pax['size'][:40]!r} is not a number") from None
        if info.size < 0:
            raise LayerError(f"tar entry {info.name[:80]!r} has a negative size")
        pax, long_names = {}, {}
        _member(chunks, info, on_member)


def _member(chunks: _Chunks, info: tarfile.TarInfo, on_member: Callable) -> None:
    """Hand one entry to on_member, then skip whatever of its data it did not read."""
    has_data = info.isreg() or info.type not in tarfile.SUPPORTED_TYPES
    size = info.size if has_data else 0
    taken = [0]

    def read() -> bytes:
        taken[0] = size
        data = chunks.read(size)
        if len(data) < size:
            raise LayerError("truncated tar stream")
        return data

    on_member(info, read)
    remaining = _padded(size) - taken[0]
    if chunks.skip(remaining) < remaining:
        raise LayerError("truncated tar stream")


class MergedView:
    """The image's filesystem as a container sees it: each layer over the ones below."""

    def __init__(self) -> None:
        self.files: dict[str, FileInfo] = {}
        self.kept: dict[str, bytes] = {}
        self._implicit_dirs: set[str] | None = None

    def _is_dir(self, path: str) -> bool:
        """A directory that only exists as the parent of entries (tars may omit dir entries)."""
        if self._implicit_dirs is None:
            self._implicit_dirs = {parent for p in self.files
                                   for parent in _parents(p)}
        return path in self._implicit_dirs

    def apply(self, scan: LayerScan) -> None:
        # Whiteouts hide only what lower layers wrote, so apply them before this layer's files.
        doomed = [*scan.whiteouts, *scan.opaque_dirs]
        if doomed:
            for table in (self.files, self.kept):
                for path in [p for p in table if _hidden(p, scan)]:
                    del table[path]
        self.files.update(scan.files)
        self.kept.update(scan.kept)
        self._implicit_dirs = None

    def resolve(self, path: str, hops_max: int = 40) -> str | None:
        """Follow symlinks (inside the image) to a path that exists, or None."""
        parts = [p for p in path.strip("/").split("/") if p]
        current = ""
        hops = 0
        while parts:
            part = parts.pop(0)
            candidate = posixpath.join(current, part) if current else part
            info = self.files.get(candidate)
            if info is None:
                if parts and self._is_dir(candidate):
                    current = candidate
                    continue
                return None
            if info.kind == "symlink" and info.link is not None:
                hops += 1
                if hops > hops_max:
                    return None
                base = "" if info.link.startswith("/") else current
                target = posixpath.normpath(posixpath.join("/" + base, info.link)).strip("/")
                parts = [p for p in target.split("/") if p] + parts
                current = ""
                continue
            current = candidate
        return current

    def glob(self, pattern: str) -> Iterator[tuple[str, FileInfo]]:
        import fnmatch

        pattern = pattern.lstrip("/")
        for path in sorted(self.files):
            if fnmatch.fnmatchcase(path, pattern):
                yield path, self.files[path]


def _parents(path: str) -> list[str]:
    parts = path.split("/")[:-1]
    return ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _hidden(path: str, scan: LayerScan) -> bool:
    for gone in scan.whiteouts:
        if path == gone or path.startswith(gone + "/"):
            return True
    return any(path.startswith(directory + "/") if directory else True
               for directory in scan.opaque_dirs)
