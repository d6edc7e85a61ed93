"""Stream a layer blob — compressed bytes -> digest check -> gzip/zstd/plain -> diff_id -> tar
headers (tar.py) — without holding more than a few buffers of it, into the layer's file table
(filetree.py folds the layers into the merged view).

Only small files the facts need (ld.so.cache, dpkg status, ld.so.conf*, and the headers of
Python packages' METADATA) are kept, up to a size limit; everything else is a header in the
file table.
"""

from __future__ import annotations

import dataclasses
import posixpath
import threading
from collections.abc import Callable
from typing import BinaryIO

from envcheck.image import elf, python
from envcheck.image.blobstream import BlobStream, StreamError
from envcheck.image.errors import LayerError
from envcheck.image.filetree import FileInfo, FileTree
from envcheck.image.tar import Chunks, Header, MemberData, walk_tar

KEEP_FILES = ("etc/ld.so.cache", "var/lib/dpkg/status", "etc/ld.so.conf")
KEEP_PREFIXES = ("etc/ld.so.conf.d/", "var/lib/dpkg/status.d/")
KEEP_BYTES_MAX = 64 * 1024 * 1024  # one kept file (a real ld.so.cache or dpkg status: 1-10 MB)
KEEP_TOTAL_MAX = 128 * 1024 * 1024  # all of a layer's (status.d holds one file per package)
UNCOMPRESSED_BYTES_MAX = 64 * 1024**3  # a tar bomb stops here, with an error
FILES_MAX = 4_000_000  # file-table nodes of one image (a big ML image has under a million)
WHITEOUT, OPAQUE = ".wh.", ".wh..wh..opq"
_MODES: dict[int, int] = {}  # one int object per distinct mode, not one per file
_MODES_MAX = 0o200000  # modes above this (none in practice) are not shared


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
    kept_bytes: int = 0
    elf: dict[str, elf.ElfFacts] = dataclasses.field(default_factory=dict)  # CUDA/JAX libraries


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
        walk_tar(Chunks(chunks), lambda info, data: _record(scan, info, data, budget))
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
    if not member.isreg() or member.real_size >= 0:
        return
    if path in KEEP_FILES or path.startswith(KEEP_PREFIXES):
        if member.size <= KEEP_BYTES_MAX:
            _keep(scan, path, member.size, data.all)
    elif path.endswith(python.METADATA_ENDINGS) and python.is_metadata(path):
        head = data.head(python.METADATA_HEAD_BYTES)
        _keep(scan, path, len(head), lambda: python.headers_only(head))
    elif elf.is_candidate(path):
        scan.elf[path] = elf.read_elf(data, member.size, path, scan.index)


def _keep(scan: LayerScan, path: str, size: int, read: Callable[[], bytes]) -> None:
    """Hold a small file the facts need, within the layer's budget for them."""
    if scan.kept_bytes + size > KEEP_TOTAL_MAX:
        raise LayerError(f"{path}: the layer's ld.so.cache, ld.so.conf, dpkg status and Python "
                         f"package metadata files come to over {KEEP_TOTAL_MAX} bytes, the most "
                         "held in memory")
    scan.kept[path] = read()
    scan.kept_bytes += len(scan.kept[path])


