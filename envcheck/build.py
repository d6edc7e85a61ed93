"""`envcheck build`: the dev/smoke image (docker/Dockerfile) through the docker SDK, with the
build output streamed to a progress display and failures turned into one clear error."""

from __future__ import annotations

import collections
import dataclasses
import re
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import msgspec

from envcheck.dev_image import CPU_BASE, CUDA_BASE, DEV_IMAGE
from envcheck.docker_client import Unreachable, ping_client
from envcheck.errors import EXIT_USAGE, EnvcheckError

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = "docker/Dockerfile"
EXTRA_CA_NAME = "docker/certs/envcheck-build-extra-ca.crt"
CA_BUNDLE_BYTES_MAX = 16 << 20  # a system bundle is about 200 KiB
STEP_RE = re.compile(r"^Step (\d+/\d+) : (.*)$")
TAIL_LINES = 8


class BuildError(EnvcheckError):
    """A build that cannot start or failed; `message` is one line, `tail` the last output."""

    def __init__(self, message: str, tail: list[str] | None = None):
        super().__init__(message)
        self.tail = tail or []

    def lines(self) -> list[str]:
        return [str(self)] + [f"  | {line}" for line in self.tail]


class BundleError(BuildError):
    """A --ca-bundle that cannot serve pip: bad input, found before the build starts."""

    exit_code = EXIT_USAGE


class NoBase(BuildError):
    """The base image is neither in the engine nor pullable (offline, no registry)."""


class NoSources(BuildError):
    """An installed envcheck (a wheel) has no build context: the image is built from a checkout."""

    exit_code = EXIT_USAGE


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    """How to build the dev image (`envcheck build`'s options), for gpu-smoke --build-missing."""

    base_image: str | None = None  # None: CUDA_BASE on a GPU host, CPU_BASE without one
    jax_extra: str | None = None  # None: cuda12 on a GPU host, cpu without one
    network: str = "default"
    ca_bundle: Path | None = None

    def for_host(self, gpu_host: bool) -> BuildOptions:
        return dataclasses.replace(
            self, base_image=self.base_image or (CUDA_BASE if gpu_host else CPU_BASE),
            jax_extra=self.jax_extra or ("cuda12" if gpu_host else "cpu"))


class BuildReport(msgspec.Struct, kw_only=True):
    """What `envcheck build --json` prints (`envcheck.build/v1`)."""

    schema: Literal["envcheck.build/v1"] = "envcheck.build/v1"
    image_id: str
    tag: str
    size_bytes: int
    base_image: str
    jax_extra: Literal["cuda12", "cpu"]
    seconds: float
    steps: int


def docker_client(timeout_s: float):
    """A docker SDK client, or BuildError saying whether the daemon is down or the socket is
    not ours to use (the same words as gpu-smoke's docker.reachable)."""
    try:
        return ping_client(timeout_s)
    except Unreachable as error:
        raise BuildError(str(error)) from None


def check_base_image(client, base_image: str) -> str:
    """'present' or 'pullable'; BuildError when neither."""
    import docker

    try:
        client.images.get(base_image)
        return "present"
    except docker.errors.ImageNotFound:
        pass
    try:
        client.images.get_registry_data(base_image)
        return "pullable"
    except docker.errors.DockerException as error:
        reason = getattr(error, "explanation", None) or str(error).splitlines()[0]
        raise NoBase(f"base image {base_image} is not present locally and cannot be pulled "
                         f"({str(reason)[:160]}): pull or build it first, or pass --base-image"
                         ) from None


def ca_bundle_problem(ca_bundle: Path) -> str | None:
    """Why `ca_bundle` cannot serve pip in the build (None: it can): checked before the build,
    which would otherwise fail minutes later on its first TLS connection."""
    try:
        with ca_bundle.open("rb") as bundle:
            head = bundle.read(CA_BUNDLE_BYTES_MAX + 1)
    except OSError as error:
        return f"--ca-bundle {ca_bundle}: {error.strerror or error}"
    if len(head) > CA_BUNDLE_BYTES_MAX:
        return f"--ca-bundle {ca_bundle}: over {CA_BUNDLE_BYTES_MAX >> 20} MiB, not a CA bundle"
    if b"-----BEGIN CERTIFICATE-----" not in head:
        return (f"--ca-bundle {ca_bundle}: no PEM certificate in it (-----BEGIN CERTIFICATE-----);"
                " pass the PEM bundle, e.g. /etc/ssl/certs/ca-certificates.crt")
    return None


def build_context(ca_bundle: Path | None):
    """The build context as a tar (the SDK's own .dockerignore handling), plus the extra CA
    bundle when one is given, so the repository itself is never modified."""
    from docker.utils import build as sdk_build

    ignore = REPO / ".dockerignore"
    exclude = [line.strip() for line in ignore.read_text().splitlines()
               if line.strip() and not line.startswith("#")] if ignore.exists() else []
    context = sdk_build.tar(str(REPO), exclude=exclude, dockerfile=(DOCKERFILE, None),
                            gzip=False)
    if ca_bundle is not None:
        context.seek(0)
        with tarfile.open(fileobj=context, mode="a") as tar:
            tar.add(str(ca_bundle), arcname=EXTRA_CA_NAME)
    context.seek(0)
    return context


def build(*, base_image: str = CUDA_BASE, tag: str = DEV_IMAGE, jax_extra: str = "cuda12",
          ca_bundle: Path | None = None, network: str = "default", timeout_s: float = 3600,
          on_step: Callable[[str], None] | None = None) -> BuildReport:
    if not all((REPO / name).is_file() for name in (DOCKERFILE, "pyproject.toml")):
        raise NoSources(f"envcheck build builds the image from the project's sources ({DOCKERFILE}"
                        f", pyproject.toml, envcheck/, model/), and this envcheck ({REPO}) is "
                        "installed without them: run it from a checkout of the envcheck "
                        "repository (`pip install -e .` there)")
    problem = ca_bundle_problem(ca_bundle) if ca_bundle is not None else None
    if problem:
        raise BundleError(problem)
    client = docker_client(timeout_s)
    check_base_image(client, base_image)
    start_s = time.monotonic()
    stream = client.api.build(
        fileobj=build_context(ca_bundle), custom_context=True, dockerfile=DOCKERFILE, tag=tag,
        buildargs={"BASE_IMAGE": base_image, "JAX_EXTRA": jax_extra}, decode=True, rm=True,
        forcerm=True, pull=False, network_mode=None if network == "default" else network,
        timeout=int(timeout_s))
    image_id, steps = follow(stream, on_step)
    image = client.images.get(image_id)
    return BuildReport(image_id=image.id, tag=tag, size_bytes=image.attrs.get("Size", 0),
                       base_image=base_image, jax_extra=jax_extra,
                       seconds=time.monotonic() - start_s, steps=steps)


def follow(stream, on_step: Callable[[str], None] | None) -> tuple[str, int]:
    """Consume the daemon's build stream: report steps, keep the last lines, return the image
    id; a build error becomes one BuildError naming the failing step."""
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    step, steps, image_id = "before the first step", 0, None
    for event in stream:
        for line in str(event.get("stream", "")).splitlines():
            match = STEP_RE.match(line.strip())
            if match:
                step, steps = f"step {match.group(1)} ({match.group(2)[:80]})", steps + 1
                if on_step:
                    on_step(step)
            elif line.strip():
                tail.append(line.rstrip())
        if "aux" in event and isinstance(event["aux"], dict) and "ID" in event["aux"]:
            image_id = event["aux"]["ID"]
        if "error" in event:
            detail = str(event.get("error", "")).strip().splitlines()[-1][:300]
            raise BuildError(f"build failed at {step}: {detail}", list(tail))
    if image_id is None:
        raise BuildError(f"build ended without an image after {step}", list(tail))
    return image_id, steps
