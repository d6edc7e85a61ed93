"""A registry (the OCI distribution API, through registry.RegistryClient): manifests checked
against the digest they were asked by or the registry gave, layers streamed with resumes."""

from __future__ import annotations

import threading
from typing import BinaryIO

from envcheck.image.credentials import docker_credentials
from envcheck.image.reference import ImageRef
from envcheck.image.registry import RegistryClient
from envcheck.image.sources.base import StreamedSource, TopLevel, verified_json


class RegistrySource(StreamedSource):
    def __init__(self, ref: ImageRef, timeout_s: float = 30.0):
        self.ref = ref
        self.description = str(ref)
        self.client = RegistryClient(ref.registry, ref.repository, timeout_s=timeout_s,
                                     credentials=docker_credentials(ref.registry))

    def top(self) -> TopLevel:
        return self.manifest(self.ref.reference)

    def manifest(self, digest: str) -> TopLevel:
        body, media_type, verified = self.client.manifest(digest)
        parsed = verified_json(body, verified, f"{self.description} manifest")
        return TopLevel(parsed, media_type or parsed.get("mediaType", ""), verified)

    def json_blob(self, digest: str) -> dict:
        data = self.client.blob_bytes(digest)
        return verified_json(data, digest, f"{self.ref.registry}/{self.ref.repository}@{digest}")

    def open_layer(self, descriptor: dict, stop: threading.Event | None = None) -> BinaryIO:
        return self.client.open_blob(descriptor["digest"], stop)
