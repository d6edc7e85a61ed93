"""The Docker daemon's image (docker-daemon:NAME[:TAG] or an image ID), read in one pass from
its `docker save` stream through the SDK: nothing goes to disk, whatever the image's size."""

from __future__ import annotations

from envcheck.docker_client import Unreachable, ping_client
from envcheck.image.errors import SourceError
from envcheck.image.reference import ImageRef
from envcheck.image.sources.base import Progress
from envcheck.image.sources.saved_stream import SavedStreamSource, coalesced, counted


def daemon_source(ref: ImageRef, timeout_s: float = 60.0, progress: Progress = None,
                  scan_layers: bool = True) -> SavedStreamSource:
    """The daemon's image, read in one pass from its `docker save` stream (SDK): nothing goes
    to disk, whatever the image's size."""
    import docker
    import requests

    name = ref.repository + (f":{ref.tag}" if ref.tag else "") + (
        f"@{ref.digest}" if ref.digest else "")
    try:
        image = ping_client(timeout_s).images.get(name)
    except Unreachable as error:
        raise SourceError(f"docker-daemon:{name}: {error}") from None
    except docker.errors.ImageNotFound:
        raise SourceError(f"docker-daemon:{name}: no such image in the daemon; "
                          "pull or build it first") from None
    except docker.errors.DockerException as error:
        raise SourceError(f"docker-daemon:{name}: the daemon refused the image "
                          f"({str(error).splitlines()[0][:160]})") from None
    advance = progress(f"docker save {name}", image.attrs.get("Size") or 0) if (
        progress) else None
    try:
        return SavedStreamSource(f"docker-daemon:{name}", counted(coalesced(
            image.save(chunk_size=1 << 20, named=False)), advance), scan_layers=scan_layers,
            shown=f"docker-daemon:{name}", hint="docker save broke off; try again")
    except (docker.errors.DockerException, requests.RequestException) as error:
        why = (str(error).splitlines() or [type(error).__name__])[0][:160]
        raise SourceError(f"docker-daemon:{name}: docker save failed ({why})") from None
