"""The one interface every image source has (as go-containerregistry's v1.Image): the top-level
index or manifest, small JSON blobs verified against their digests, and the layers scanned
(layers.scan_layer verifies each while it streams). The pipeline never asks which source it has.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import threading
from collections.abc import Callable
from typing import BinaryIO, Protocol

from envcheck.image.blobstream import Cancelled, Halt
from envcheck.image.errors import SourceError
from envcheck.image.layers import FileBudget, LayerScan, scan_layer

INDEX_TYPES = ("application/vnd.oci.image.index.v1+json",
               "application/vnd.docker.distribution.manifest.list.v2+json")
JSON_BYTES_MAX = 4 * 1024 * 1024
# progress(index or label, size) -> advance(n): a progress bar per layer (None: no display)
Progress = Callable[[int | str, int], Callable[[int], None]] | None


@dataclasses.dataclass(frozen=True)
class TopLevel:
    """The object a reference names: an index or a manifest; digest None where the source has
    none (a docker save archive's manifest.json)."""

    body: dict
    media_type: str
    digest: str | None


class ImageSource(Protocol):
    description: str

    def top(self) -> TopLevel: ...

    def manifest(self, digest: str) -> TopLevel: ...

    def json_blob(self, digest: str) -> dict: ...

    def layer_scans(self, descriptors: list[dict], progress: Progress = None,
                    jobs: int = 1) -> list[LayerScan]:
        """Every layer of `descriptors` (the manifest's, in its order) scanned and verified."""

    def close(self) -> None: ...


def verified_json(data: bytes, digest: str | None, what: str) -> dict:
    """A JSON object whose bytes hash to `digest` (None: a document that has no digest)."""
    if digest is not None and "sha256:" + hashlib.sha256(data).hexdigest() != digest:
        raise SourceError(f"{what}: content does not match digest {digest}")
    try:
        body = json.loads(data)
    except ValueError:
        raise SourceError(f"{what}: not valid JSON") from None
    if not isinstance(body, dict):
        raise SourceError(f"{what}: expected a JSON object")
    return body


class StreamedSource:
    """A source whose layers are blobs it can open one by one (a registry, an OCI layout, a
    docker save archive on disk): `layer_scans` streams them, up to `jobs` at a time."""

    def open_layer(self, descriptor: dict, stop: threading.Event | None = None) -> BinaryIO:
        """A stream of the layer blob; each call its own (layers are read concurrently).
        `stop` set: waits (retry back-off) end with blobstream.Cancelled."""
        raise NotImplementedError

    def layer_scans(self, descriptors: list[dict], progress: Progress = None,
                    jobs: int = 1) -> list[LayerScan]:
        """A failure stops the other layers (at their next chunk, in a retry back-off, or in a
        read from a hung connection); the lowest failing layer is raised."""
        stop, budget = Halt(), FileBudget()

        def scan(index: int, descriptor: dict) -> LayerScan:
            if stop.is_set():
                raise Cancelled()
            report = progress(index, descriptor.get("size") or 0) if progress else None
            with self.open_layer(descriptor, stop) as blob, stop.watch(blob):
                return scan_layer(blob, index, expected_digest=descriptor.get("digest"),
                                  expected_size=descriptor.get("size"), progress=report,
                                  stop=stop, budget=budget)

        workers = min(jobs, len(descriptors))
        if workers <= 1:
            return [scan(index, descriptor) for index, descriptor in enumerate(descriptors)]
        with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="layer") as pool:
            futures = [pool.submit(scan, i, d) for i, d in enumerate(descriptors)]
            try:
                for future in concurrent.futures.as_completed(futures):
                    if future.exception() is not None:
                        stop.set()
            finally:
                stop.set()  # also on Ctrl-C: the running layers stop at their next chunk
        errors = [e for e in (f.exception() for f in futures)
                  if e is not None and not isinstance(e, Cancelled)]
        if errors:
            raise errors[0]
        return [future.result() for future in futures]

    def close(self) -> None:
        pass
