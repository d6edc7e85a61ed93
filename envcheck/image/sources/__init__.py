"""Image sources behind one interface (base.ImageSource), one module per source as in
go-containerregistry: a registry (registry.py), an OCI layout (oci_layout.py), a `docker save`
archive read in place (docker_archive.py) or as a stream when compressed (saved_stream.py), and
the Docker daemon, whose own `docker save` stream is read the same way (daemon.py)."""

from __future__ import annotations

from envcheck.image.reference import ImageRef
from envcheck.image.sources.base import INDEX_TYPES, ImageSource, Progress, TopLevel
from envcheck.image.sources.daemon import daemon_source
from envcheck.image.sources.oci_layout import REF_NAME, OciLayoutSource, ref_name
from envcheck.image.sources.registry import RegistrySource
from envcheck.image.sources.saved_stream import archive_source

__all__ = ["INDEX_TYPES", "REF_NAME", "ImageSource", "TopLevel", "open_source", "ref_name"]


def open_source(ref: ImageRef, timeout_s: float = 30.0, progress: Progress = None,
                scan_layers: bool = True) -> ImageSource:
    if ref.transport == "docker":
        return RegistrySource(ref, timeout_s)
    if ref.transport == "oci":
        return OciLayoutSource(ref)
    if ref.transport == "docker-archive":
        return archive_source(ref, progress, scan_layers)
    if ref.transport == "docker-daemon":
        return daemon_source(ref, timeout_s, progress, scan_layers)
    raise AssertionError(ref.transport)
