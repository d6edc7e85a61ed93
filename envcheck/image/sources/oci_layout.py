"""An OCI image layout (`skopeo copy … oci:DIR:TAG`): index.json, then blobs by digest, every
JSON blob verified, layers read from their files."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import BinaryIO

from envcheck.image.errors import SourceError, UnreadableImage
from envcheck.image.reference import ImageRef
from envcheck.image.sources.base import (
    INDEX_TYPES,
    JSON_BYTES_MAX,
    StreamedSource,
    TopLevel,
    verified_json,
)

REF_NAME = "org.opencontainers.image.ref.name"


def ref_name(entry: dict) -> str | None:
    """The tag an OCI index entry carries (its ref.name annotation), or None."""
    annotations = entry.get("annotations")
    name = annotations.get(REF_NAME) if isinstance(annotations, dict) else None
    return name if isinstance(name, str) else None


def _layout_past_the_colon(ref: ImageRef) -> str | None:
    """The OCI layout `oci:PATH` names when PATH holds a colon (cut at the first one, so the
    rest was read as the tag), for the error to point at."""
    if not ref.tag:
        return None
    whole = f"{ref.path}:{ref.tag}"
    cuts = [at for at, char in enumerate(whole) if char == ":"][1:] + [len(whole)]
    return next((whole[:at] for at in cuts if (Path(whole[:at]) / "index.json").is_file()), None)


class OciLayoutSource(StreamedSource):
    def __init__(self, ref: ImageRef):
        self.root = Path(ref.path)
        self.tag = ref.tag
        self.description = str(ref)
        if not (self.root / "index.json").is_file():
            meant = _layout_past_the_colon(ref)
            if meant:
                raise UnreadableImage(f"{meant}: the path of an oci: reference ends at its first "
                                      "colon (as in skopeo); name the layout by a path without "
                                      "one (a symlink, or a relative path)")
            raise UnreadableImage(f"{ref.path}: not an OCI image layout (no index.json); "
                                  "make one with `skopeo copy … oci:DIR:TAG`")

    def _blob_path(self, digest: str) -> Path:
        algorithm, _, encoded = digest.partition(":")
        path = self.root / "blobs" / algorithm / encoded
        if not path.is_file():
            raise SourceError(f"{self.description}: blob {digest} is missing from the layout")
        return path

    def _read(self, digest: str) -> bytes:
        path = self._blob_path(digest)
        if path.stat().st_size > JSON_BYTES_MAX:
            raise SourceError(f"{self.description}: JSON blob {digest} is over the size limit")
        return path.read_bytes()

    def top(self) -> TopLevel:
        """The manifest (or index) tagged `tag`, or, without a tag, index.json's only one. Where
        several entries are left, one image per platform (untagged, or under one tag), they are
        the index to choose the platform from; several tagged images need a tag, and an
        untagged one is named by none (as in skopeo)."""
        index = verified_json((self.root / "index.json").read_bytes(), None,
                               f"{self.root}/index.json")
        listed = index.get("manifests")
        entries = [m for m in (listed if isinstance(listed, list) else [])
                   if isinstance(m, dict) and isinstance(m.get("digest"), str)]
        chosen = [m for m in entries if ref_name(m) == self.tag] if self.tag else entries
        if self.tag and not chosen:
            tags = sorted({ref_name(m) for m in entries} - {None})
            bare = sum(ref_name(m) is None for m in entries)
            untagged = f"; {bare} untagged, named by no tag: oci:{self.root}" if bare else ""
            raise SourceError(f"{self.description}: no manifest tagged {self.tag!r} "
                              f"(tags: {', '.join(tags) or 'none'}{untagged})")
        if not chosen:
            raise SourceError(f"{self.description}: index.json lists no manifests")
        if len(chosen) == 1:
            return self.manifest(chosen[0]["digest"])
        tags = sorted({ref_name(m) for m in chosen} - {None})
        if len(tags) > 1:
            raise SourceError(f"{self.description}: the layout holds {len(tags)} images (tags: "
                              f"{', '.join(tags)}): name one, as oci:{self.root}:{tags[0]}")
        return TopLevel({"manifests": chosen}, INDEX_TYPES[0], None)

    def manifest(self, digest: str) -> TopLevel:
        body = verified_json(self._read(digest), digest, f"{self.description}@{digest}")
        return TopLevel(body, body.get("mediaType", ""), digest)

    def json_blob(self, digest: str) -> dict:
        return verified_json(self._read(digest), digest, f"{self.description}@{digest}")

    def open_layer(self, descriptor: dict, stop: threading.Event | None = None) -> BinaryIO:
        return self._blob_path(descriptor["digest"]).open("rb")
