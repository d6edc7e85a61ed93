"""Stream a layer blob — compressed bytes -> digest check -> gzip/zstd/plain -> diff_id -> tar
headers — without holding more than a few buffers of it, and fold the layers into a merged view
(whiteouts and opaque directories applied).

Only small files the facts need (ld.so.cache, dpkg status, ld.so.conf*) are kept, up to a size
limit; everything else is a header in the file table.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import posixpath
import tarfile
import zlib
from collections.abc import Callable, Iterator
from typing import BinaryIO

CHUNK_BYTES = 1 << 20
GZIP_MAGIC, ZSTD_MAGIC = b"\x1f\x8b", b"\x28\xb5\x2f\xfd"
KEEP_FILES = ("etc/ld.so.cache", "var/lib/dpkg/status", "etc/ld.so.conf")
KEEP_PREFIXES = ("etc/ld.so.conf.d/", "var/lib/dpkg/status.d/")
KEEP_BYTES_MAX = 64 * 1024 * 1024
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


class HashingReader(io.RawIOBase):
    """Reads through `source`, hashing and counting; `finish` checks the digest and size."""

    def __init__(self, source: BinaryIO, limit_bytes: int | None = None,
                 progress: Callable[[int], None] | None = None):
        self._source = source
        self._hash = hashlib.sha256()
        self.count = 0
        self._limit = limit_bytes
        self._progress = progress

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._source.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self._hash.update(data)
        self.count += n
        if self._limit is not None and self.count > self._limit:
            raise LayerError(f"more than {self._limit} bytes: refusing to read further "
                             "(a tar bomb, or the wrong size)")
        if self._progress is not None and n:
            self._progress(n)
        return n

    def drain(self) -> None:
        while self.read(CHUNK_BYTES):
            pass

    @property
    def digest(self) -> str:
        return "sha256:" + self._hash.hexdigest()


class _GzipStream(io.RawIOBase):
    """Streaming gzip (multi-member) decompression: ISA-L when installed, zlib otherwise."""

    def __init__(self, source: BinaryIO):
        self._source = source
        try:
            from isal import isal_zlib as engine
        except ImportError:  # pragma: no cover - depends on the optional wheel
            engine = zlib
        self._engine = engine
        self._inflate = engine.decompressobj(31)
        self._pending = b""
        self._eof = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._pending and not self._eof:
            data = self._inflate.unconsumed_tail or self._source.read(CHUNK_BYTES)
            if not data:
                if not self._inflate.eof:
                    raise LayerError("truncated gzip stream: the compressed layer ends early")
                self._eof = True
                break
            self._pending = self._inflate.decompress(data, CHUNK_BYTES * 4)
            if self._inflate.eof and self._inflate.unused_data:
                rest = self._inflate.unused_data  # another gzip member follows
                self._inflate = self._engine.decompressobj(31)
                self._pending += self._inflate.decompress(rest, CHUNK_BYTES * 4)
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


def decompressed(stream: BinaryIO) -> tuple[BinaryIO, str]:
    """Sniff the magic bytes (never trust names) and wrap `stream` in the right decompressor."""
    reader = io.BufferedReader(stream, CHUNK_BYTES)
    magic = reader.peek(4)[:4]
    if magic.startswith(GZIP_MAGIC):
        return io.BufferedReader(_GzipStream(reader), CHUNK_BYTES), "gzip"
    if magic == ZSTD_MAGIC:
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(reader, read_size=CHUNK_BYTES), "zstd"
    return reader, "none"


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
               progress: Callable[[int], None] | None = None) -> LayerScan:
    """Stream one layer blob; raise LayerError on a digest/size mismatch or a broken stream."""
    compressed = HashingReader(blob, limit_bytes=expected_size, progress=progress)
    plain, compression = decompressed(compressed)
    uncompressed = HashingReader(plain, limit_bytes=UNCOMPRESSED_BYTES_MAX)
    scan = LayerScan(index, compression=compression)
    name = f"layer {index}" + (f" ({expected_digest})" if expected_digest else "")
    try:
        with tarfile.open(fileobj=uncompressed, mode="r|") as tar:
            for member in tar:
                _record(scan, tar, member)
        uncompressed.drain()  # tar padding after the end-of-archive blocks counts in the diff_id
        compressed.drain()
    except LayerError as error:
        raise LayerError(f"{name}: {error}") from None
    except (tarfile.TarError, EOFError, zlib.error, OSError) as error:
        raise LayerError(f"{name}: unreadable {compression} tar stream ({error})") from None
    except Exception as error:
        if type(error).__module__.startswith(("zstandard", "isal")):
            raise LayerError(f"{name}: corrupt {compression} stream ({error})") from None
        raise
    scan.digest, scan.compressed_bytes = compressed.digest, compressed.count
    scan.diff_id, scan.uncompressed_bytes = uncompressed.digest, uncompressed.count
    if expected_size is not None and compressed.count != expected_size:
        raise LayerError(f"{name}: {compressed.count} bytes, the descriptor says {expected_size}")
    if expected_digest is not None and scan.digest != expected_digest:
        raise LayerError(f"{name}: content digest {scan.digest} does not match: corrupted or "
                         "tampered blob")
    return scan


def _record(scan: LayerScan, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
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
        handle = tar.extractfile(member)
        scan.kept[path] = handle.read() if handle else b""


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
