"""A `docker save` archive on disk (legacy and OCI-style), read in place through the tar index:
manifest.json names the config and the layers; nothing is extracted."""

from __future__ import annotations

import io
import json
import posixpath
import tarfile
import threading
from pathlib import Path
from typing import BinaryIO

from envcheck.image.errors import SourceError, UnreadableImage
from envcheck.image.reference import ImageRef, RefSyntaxError, normalized_name
from envcheck.image.sources.base import JSON_BYTES_MAX, StreamedSource, TopLevel, verified_json

LEGACY_LAYER_TYPE = "application/vnd.docker.image.rootfs.diff.tar"
LINK_HOPS_MAX = 8  # links followed inside a docker save archive before giving up


class DockerArchiveSource(StreamedSource):
    """A `docker save` tar: manifest.json names the config and layers, as `<id>/layer.tar` +
    `<hex>.json` (legacy) or `blobs/sha256/<hex>` (Docker ≥ 25, OCI-style). Members are read in
    place through the tar index; nothing is extracted. Each layer gets its own file handle on
    the archive, so layers can be read concurrently."""

    def __init__(self, ref: ImageRef):
        self.path = Path(ref.path)
        self.description, self.chosen = str(ref), ref.tag
        self.tar = None
        try:
            self._open(ref.path)
        except BaseException:
            self.close()
            raise

    def _open(self, shown: str) -> None:
        try:
            self.tar = tarfile.open(self.path, "r:")
            self.members = {posixpath.normpath(m.name): m for m in self.tar.getmembers()}
        except FileNotFoundError:
            whole = f"{shown}:{self.chosen}"
            fix = (f"the path ends at its first colon, as in skopeo: link {whole} to a name "
                   "without one" if self.chosen and Path(whole).exists() else
                   "make one with `docker save IMAGE -o FILE`")
            raise UnreadableImage(f"{shown}: no such file; {fix}") from None
        except (tarfile.TarError, OSError) as error:
            cut = " (cut short? save it again)" if "end of data" in str(error) else ""
            raise UnreadableImage(f"{shown}: not a docker save archive ({error}){cut}") from None
        self._read_entry()

    def _read_entry(self) -> None:
        entries = self._json("manifest.json")
        if not isinstance(entries, list) or not entries or not all(
                isinstance(entry, dict) for entry in entries):
            raise SourceError(f"{self.description}: manifest.json lists no images")
        self.entry = _chosen_entry(entries, self.chosen, self.description)

    def _member(self, name: str) -> tarfile.TarInfo | None:
        """The member `name`, through links inside the archive: docker < 25 saves a layer it
        has already written as a symlink to that first copy, and skopeo's `<id>/layer.tar`
        are symlinks to `<digest>.tar`. None where it or a link's target is missing."""
        key = posixpath.normpath(name)
        for _ in range(LINK_HOPS_MAX):
            member = self.members.get(key)
            if member is None or not (member.issym() or member.islnk()):
                return member
            base = posixpath.dirname(key) if member.issym() else ""  # hardlinks: from the root
            key = posixpath.normpath(posixpath.join(base, member.linkname))
        return None

    def _member_bytes(self, name: str) -> bytes:
        member = self._member(name)
        if member is None or not member.isfile():
            raise SourceError(f"{self.description}: {name} is missing from the archive")
        if member.size > JSON_BYTES_MAX:
            raise SourceError(f"{self.description}: {name} is over the size limit")
        return self.tar.extractfile(member).read()

    def _json(self, name: str):
        try:
            return json.loads(self._member_bytes(name))
        except ValueError:
            raise SourceError(f"{self.description}: {name} is not valid JSON") from None

    @staticmethod
    def _digest_of(name: str) -> str | None:
        """The digest a member's name promises: blobs/sha256/<hex> or legacy <hex>.json."""
        parts = name.split("/")
        if len(parts) == 3 and parts[0] == "blobs":
            return f"{parts[1]}:{parts[2]}"
        stem = name.removesuffix(".json")
        return f"sha256:{stem}" if name.endswith(".json") and len(stem) == 64 else None

    def top(self) -> TopLevel:
        config_name = self.entry.get("Config", "")
        layers = []
        for name in self.entry.get("Layers", []):
            if not self._has(name):
                raise SourceError(f"{self.description}: layer {name} named in manifest.json "
                                  "is missing from the archive")
            layers.append({"mediaType": LEGACY_LAYER_TYPE, "digest": self._digest_of(name),
                           "size": self._member(name).size, "member": name})
        body = {"schemaVersion": 2, "mediaType": "(docker save manifest.json)",
                "config": {"digest": self._digest_of(config_name), "member": config_name},
                "layers": layers, "repoTags": self.entry.get("RepoTags") or []}
        return TopLevel(body, "docker-archive", None)

    def _has(self, name: str) -> bool:
        member = self._member(name)
        return member is not None and member.isfile()

    def manifest(self, digest: str) -> TopLevel:
        raise SourceError(f"{self.description}: docker save archives hold no manifest {digest}")

    def json_blob(self, digest: str) -> dict:
        name = self.entry.get("Config", "")
        return verified_json(self._member_bytes(name), digest, f"{self.description} config")

    def open_layer(self, descriptor: dict, stop: threading.Event | None = None) -> BinaryIO:
        member = self._member(descriptor["member"])
        if member.issparse():  # never in a docker save; tarfile maps the holes
            return self.tar.extractfile(member)
        return MemberReader(self.path, member.offset_data, member.size)

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()


def _chosen_entry(entries: list[dict], chosen: str | None, description: str) -> dict:
    """The manifest.json entry `chosen` names (NAME[:TAG], one of its RepoTags as Docker
    normalises them, or @N), else the only one: an archive of several images (`docker save A
    B`) needs the choice, as skopeo's docker-archive does."""
    tags = [_repo_tags(entry) for entry in entries]
    names = "; ".join(", ".join(these) or f"@{index} (untagged)"
                      for index, these in enumerate(tags))
    if chosen is None:
        if len(entries) == 1:
            return entries[0]
        raise SourceError(f"{description}: the archive holds {len(entries)} images ({names}): "
                          "name one, adding :NAME[:TAG] or :@N")
    if chosen.startswith("@"):
        index = int(chosen[1:])
        if index < len(entries):
            return entries[index]
        raise SourceError(f"{description}: no image {chosen}: the archive holds "
                          f"{len(entries)} ({names}), @0 to @{len(entries) - 1}")
    wanted = normalized_name(chosen)
    for entry, these in zip(entries, tags, strict=True):
        if wanted in map(_normalized_or_none, these):
            return entry
    raise SourceError(f"{description}: no image tagged {chosen} in the archive ({names})")


def _repo_tags(entry: dict) -> list[str]:
    tags = entry.get("RepoTags")
    return [tag for tag in tags if isinstance(tag, str)] if isinstance(tags, list) else []


def _normalized_or_none(tag: str) -> str | None:
    try:
        return normalized_name(tag)
    except RefSyntaxError:
        return None


class MemberReader(io.RawIOBase):
    """`size` bytes at `offset` of a file, through a handle of its own."""

    def __init__(self, path: Path, offset: int, size: int):
        self._file = path.open("rb", buffering=0)
        self._file.seek(offset)
        self._left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self._left <= 0:
            return 0
        n = self._file.readinto(memoryview(buffer)[: min(len(buffer), self._left)])
        self._left -= n  # a file cut short ends early: scan_layer's size check says so
        return n

    def close(self) -> None:
        self._file.close()
        super().close()
