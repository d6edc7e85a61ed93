"""Image references and transports: registry refs (with or without `docker://`), `docker-daemon:`,
`docker-archive:`, `oci:`. Grammar per the distribution spec and Docker's normalisation:
`nvidia/cuda:12.8.0-…` means Docker Hub (`registry-1.docker.io`, `library/` for one-part names).
"""

from __future__ import annotations

import dataclasses
import re

from envcheck.errors import UnreadableInput

DOCKER_HUB = "registry-1.docker.io"
HUB_ALIASES = ("docker.io", "index.docker.io", "registry-1.docker.io")
TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
DIGEST_RE = re.compile(r"sha256:[a-f0-9]{64}")
COMPONENT_RE = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
# an image ID, whole or its first 12+ hex digits: the daemon resolves it (a name first, as docker)
IMAGE_ID_RE = re.compile(r"(?:sha256:)?[a-f0-9]{12,64}")
# an OCI layout's ref name (the image spec's org.opencontainers.image.ref.name grammar, as
# skopeo checks it): alphanumeric runs joined by - . _ : @ + or --, components by /
_OCI_COMPONENT = r"[A-Za-z0-9]+(?:(?:[-._:@+]|--)[A-Za-z0-9]+)*"
OCI_REF_NAME_RE = re.compile(rf"{_OCI_COMPONENT}(?:/{_OCI_COMPONENT})*")


class RefSyntaxError(UnreadableInput, ValueError):
    """A reference that cannot be parsed; the message says what form is expected."""


@dataclasses.dataclass(frozen=True)
class ImageRef:
    transport: str  # docker | docker-daemon | docker-archive | oci
    registry: str = ""  # docker: host[:port]
    repository: str = ""  # docker / docker-daemon: path within the registry
    tag: str | None = None  # docker-archive: the image chosen in it, NAME[:TAG] or @N
    digest: str | None = None
    path: str = ""  # docker-archive / oci: filesystem path

    def __str__(self) -> str:
        if self.transport in ("docker-archive", "oci"):
            return f"{self.transport}:{self.path}" + (f":{self.tag}" if self.tag else "")
        name = self.repository if self.transport == "docker-daemon" else (
            f"{self.registry}/{self.repository}")
        suffix = (f":{self.tag}" if self.tag else "") + (f"@{self.digest}" if self.digest else "")
        prefix = "docker-daemon:" if self.transport == "docker-daemon" else ""
        return f"{prefix}{name}{suffix}"

    @property
    def reference(self) -> str:
        """What to ask the registry for: the digest when pinned, else the tag."""
        return self.digest or self.tag or "latest"


def parse(text: str) -> ImageRef:
    text = text.strip()
    if not text:
        raise RefSyntaxError("empty image reference")
    if text.startswith("docker-daemon:"):
        rest = text.removeprefix("docker-daemon:")
        if not rest:
            raise RefSyntaxError("docker-daemon: needs an image, e.g. "
                                 "docker-daemon:envcheck-dev:latest or an image ID")
        if IMAGE_ID_RE.fullmatch(rest):  # as `docker images` shows it
            return ImageRef("docker-daemon", repository=rest)
        registry, repository, tag, digest = _split_name(rest)
        name = repository if registry in ("", DOCKER_HUB) else f"{registry}/{repository}"
        name = name.removeprefix("library/")
        return ImageRef("docker-daemon", repository=name, tag=tag or (None if digest else "latest"),
                        digest=digest)
    if text.startswith("docker-archive:"):
        path, chosen = _split_archive(text.removeprefix("docker-archive:"))
        return ImageRef("docker-archive", path=path, tag=chosen)
    if text.startswith("oci:"):
        path, tag = _split_oci(text.removeprefix("oci:"))
        return ImageRef("oci", path=path, tag=tag)
    if ":" in text.split("/")[0] and "://" in text and not text.startswith("docker://"):
        raise RefSyntaxError(
            f"{text!r}: unknown transport; use a registry reference (optionally docker://), "
            "docker-daemon:NAME[:TAG], docker-archive:PATH[:NAME[:TAG]|:@N] or oci:DIR[:TAG]")
    registry, repository, tag, digest = _split_name(text.removeprefix("docker://"))
    return ImageRef("docker", registry=registry or DOCKER_HUB, repository=repository,
                    tag=tag or (None if digest else "latest"), digest=digest)


def _split_oci(rest: str) -> tuple[str, str | None]:
    """'DIR[:REF]' -> (DIR, REF or None), as skopeo's oci: the path ends at the first colon
    (the ref name may hold colons and slashes: `oci:DIR:example.com/app:v1`); an empty REF is
    none."""
    path, _, name = rest.partition(":")
    if not path:
        raise RefSyntaxError("oci: needs a path, e.g. oci:./image or oci:./image:TAG")
    if name and not OCI_REF_NAME_RE.fullmatch(name):
        raise RefSyntaxError(
            f"oci:{rest}: {name!r} is no OCI ref name (letters and digits joined by - . _ : @ + "
            "or --, parts by /); the path ends at the first colon, as in skopeo")
    return path, name or None


def _split_archive(rest: str) -> tuple[str, str | None]:
    """'PATH[:NAME[:TAG]|:@N]' -> (path, the image chosen), as skopeo's docker-archive: the
    path ends at the first colon."""
    path, colon, chosen = rest.partition(":")
    if not path:
        raise RefSyntaxError("docker-archive: needs a path, e.g. docker-archive:./image.tar")
    if colon and not re.fullmatch(r"@[0-9]{1,9}", chosen):
        try:
            _split_name(chosen)  # a NAME[:TAG] to find among the archive's RepoTags
        except RefSyntaxError:
            raise RefSyntaxError(f"docker-archive:{rest}: {chosen!r} names no image in an "
                                 "archive; use NAME[:TAG] (one of its RepoTags) or @N (the "
                                 "Nth, from 0)") from None
    return path, chosen if colon else None


def normalized_name(text: str) -> str:
    """NAME[:TAG] as Docker normalises it (busybox: registry-1.docker.io/library/busybox:latest),
    to compare a name with an archive's RepoTags. Raises RefSyntaxError."""
    registry, repository, tag, digest = _split_name(text)
    return f"{registry or DOCKER_HUB}/{repository}:{tag or 'latest'}" + (
        f"@{digest}" if digest else "")


def _split_name(name: str) -> tuple[str, str, str | None, str | None]:
    """'[host[:port]/]repo/path[:tag][@sha256:…]' -> (registry, repository, tag, digest)."""
    original = name
    digest = None
    if "@" in name:
        name, digest = name.split("@", 1)
        if not DIGEST_RE.fullmatch(digest):
            raise RefSyntaxError(f"{original!r}: digest must be sha256:<64 hex digits>")
    tag = None
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name, tag = name.rsplit(":", 1)
        if not TAG_RE.fullmatch(tag):
            raise RefSyntaxError(f"{original!r}: invalid tag {tag!r}")
    parts = name.split("/")
    registry = ""
    if len(parts) > 1 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost"):
        registry = parts.pop(0)
    if registry in HUB_ALIASES:
        registry = DOCKER_HUB
    if not parts or not all(COMPONENT_RE.fullmatch(p) for p in parts):
        raise RefSyntaxError(
            f"{original!r}: not an image reference; expected [REGISTRY/]NAME[:TAG][@sha256:DIGEST] "
            "with lowercase path components, or docker-daemon:, docker-archive:, oci:")
    if registry in ("", DOCKER_HUB) and len(parts) == 1:
        parts.insert(0, "library")
    return registry, "/".join(parts), tag, digest
