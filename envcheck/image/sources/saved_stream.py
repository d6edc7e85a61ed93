"""A `docker save` archive read once, front to back, from a stream: a compressed archive on disk
(`docker save IMAGE | gzip`, or zstd) or the daemon's own `docker save` (docker-daemon:)."""

from __future__ import annotations

import collections
import dataclasses
import posixpath
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import msgspec

from envcheck.image.blobstream import (
    CHUNK_BYTES,
    GZIP_MAGIC,
    ZSTD_MAGIC,
    StreamError,
    decompress,
    on_a_thread,
)
from envcheck.image.errors import LayerError, SourceError, UnreadableImage
from envcheck.image.layers import FileBudget, LayerScan, scan_layer
from envcheck.image.reference import ImageRef
from envcheck.image.sources.base import JSON_BYTES_MAX, Progress
from envcheck.image.sources.docker_archive import DockerArchiveSource
from envcheck.image.tar import Header, MemberData, StreamCut, starts_a_layer, walk_chunks

KEPT_BYTES_MAX = 64 * 1024 * 1024  # small non-layer members of a saved stream, kept in memory


class SavedStreamSource(DockerArchiveSource):
    """A `docker save` archive read once, front to back, from a stream: a compressed archive
    (`docker save IMAGE | gzip`, or zstd) or the daemon's `docker save`. Layers stream past
    before manifest.json (which comes last) tells which they are and in what order, so every
    member that is a tar (or a compressed one) is scanned as it passes and kept by name, the
    small ones kept as bytes; nothing is written to disk. `scans()` then hands them out in the
    manifest's order."""

    def __init__(self, description: str, pieces: Iterator[bytes], *, scan_layers: bool,
                 shown: str, hint: str, chosen: str | None = None):
        self.description, self.entry, self.chosen = description, {}, chosen
        self.members: dict[str, Header] = {}
        self._kept: dict[str, bytes] = {}
        self._kept_bytes = 0
        self._scans: dict[str, LayerScan] = {}
        self._budget, self._scan_layers, self._shown = FileBudget(), scan_layers, shown
        try:
            _, plain = decompress(pieces)
            with on_a_thread(plain) as chunks:
                walk_chunks(chunks, self._take)
                collections.deque(chunks, maxlen=0)  # the padding after the end: to its CRC
        except (StreamError, StreamCut) as error:
            raise UnreadableImage(f"{shown}: {error}; {hint}") from None
        except _LayerFailed as failed:
            raise LayerError(f"{description}: {failed.error}") from None
        except LayerError as error:  # the archive's own tar headers
            raise UnreadableImage(f"{shown}: not a docker save archive ({error})") from None
        self._read_entry()

    def _take(self, info: Header, data: MemberData) -> None:
        key = posixpath.normpath(info.name)
        self.members[key] = info
        if not info.isreg() or info.real_size >= 0:  # docker save writes no sparse files
            return
        if starts_a_layer(data.head(512)):
            if self._scan_layers:
                self._scans[key] = self._scan(key, data)
        elif info.size <= JSON_BYTES_MAX:
            self._kept_bytes += info.size
            if self._kept_bytes > KEPT_BYTES_MAX:
                raise UnreadableImage(f"{self._shown}: over {KEPT_BYTES_MAX} bytes of small "
                                      "files that are no layers: not a docker save archive")
            self._kept[key] = data.all()

    def _scan(self, key: str, data: MemberData) -> LayerScan:
        """Scan one member as a layer; its digest is checked where its name promises one."""
        try:
            return scan_layer(data, -1, expected_digest=self._digest_of(key),
                              expected_size=data.size, budget=self._budget, name=key)
        except LayerError as error:
            raise _LayerFailed(error) from None

    def _member_bytes(self, name: str) -> bytes:
        member = self._member(name)
        if member is None or not member.isfile():
            raise SourceError(f"{self.description}: {name} is missing from the archive")
        kept = self._kept.get(posixpath.normpath(member.name))
        if kept is None:
            raise SourceError(f"{self.description}: {name} is not a small JSON file")
        return kept

    def open_layer(self, descriptor: dict, stop: threading.Event | None = None) -> BinaryIO:
        raise SourceError(f"{self.description}: a docker save stream was read once; its "
                          "layers were scanned as they passed")

    def layer_scans(self, descriptors: list[dict], progress: Progress = None,
                    jobs: int = 1) -> list[LayerScan]:
        """The layers of the manifest in its order, each labelled with its place in it (its one
        pass has scanned them already)."""
        keys = [posixpath.normpath(self._member(d["member"]).name) for d in descriptors]
        uses = collections.Counter(keys)
        placed = []
        for index, (key, descriptor) in enumerate(zip(keys, descriptors, strict=True)):
            scan = self._scans.get(key)
            if scan is None:
                raise LayerError(f"layer {index} ({descriptor['member']}): not a tar archive")
            uses[key] -= 1
            if not uses[key]:
                del self._scans[key]  # the copy below replaces it: one file table at a time
            placed.append(dataclasses.replace(
                scan, index=index, files=scan.files.relabeled(index),
                whiteouts=list(scan.whiteouts), opaque_dirs=list(scan.opaque_dirs),
                kept=dict(scan.kept),
                elf={path: msgspec.structs.replace(facts, layer=index)
                     for path, facts in scan.elf.items()}))
        return placed

    def close(self) -> None:
        self._scans.clear()


class _LayerFailed(Exception):
    """A layer of a saved stream failed its scan (carried past the archive's own errors)."""

    def __init__(self, error: LayerError):
        super().__init__(str(error))
        self.error = error


def archive_source(ref: ImageRef, progress: Progress = None,
                   scan_layers: bool = True) -> DockerArchiveSource:
    """A `docker save` archive: read in place, or, compressed whole (`docker save IMAGE | gzip`,
    or zstd), in one pass as it decompresses. `progress(label, size)` -> advance(n) shows
    that pass over the compressed bytes."""
    path = Path(ref.path)
    if not _compression_of(path):
        return DockerArchiveSource(ref)
    try:
        with path.open("rb") as packed:
            advance = progress(f"reading {path.name}", path.stat().st_size) if (
                progress) else None
            return SavedStreamSource(str(ref), _pieces(packed, advance),
                                     scan_layers=scan_layers, shown=ref.path,
                                     hint="save it again", chosen=ref.tag)
    except OSError as error:
        raise UnreadableImage(f"{ref.path}: cannot read it ({error.strerror or error})") from None


def _pieces(handle: BinaryIO, advance=None) -> Iterator[bytes]:
    yield from counted(iter(lambda: handle.read(CHUNK_BYTES), b""), advance)


def counted(pieces: Iterator[bytes], advance=None) -> Iterator[bytes]:
    for piece in pieces:
        if advance is not None:
            advance(len(piece))
        yield piece


def coalesced(pieces: Iterator[bytes], size: int = CHUNK_BYTES) -> Iterator[bytes]:
    """The pieces joined into chunks of at least `size` bytes (the last may be shorter). The
    daemon's save stream comes in 32 KiB HTTP chunks, and each piece costs the one-pass reader
    two hand-offs between threads: joined, a 1.8 GB image read 10.3 s instead of 13.0 (its
    `docker save` alone 8.7-9.3 s), the reader's own CPU 2.4 s instead of 4.7."""
    parts: list[bytes] = []
    held = 0
    for piece in pieces:
        parts.append(piece)
        held += len(piece)
        if held >= size:
            yield b"".join(parts)
            parts, held = [], 0
    if parts:
        yield b"".join(parts)


def _compression_of(path: Path) -> str:
    """"gzip" or "zstd" when the file starts with that magic number, else ""."""
    try:
        with path.open("rb") as handle:
            head = handle.read(4)
    except OSError:
        return ""
    return ("gzip" if head.startswith(GZIP_MAGIC) else "zstd" if head.startswith(ZSTD_MAGIC)
            else "")
