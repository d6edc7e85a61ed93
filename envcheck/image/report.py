"""The inspect-image report (`envcheck.image/v1`): one typed definition that inspect.py and
libraries.py write, render.py reads and `--json` prints."""

from __future__ import annotations

from typing import Literal

import msgspec
from msgspec import UNSET, UnsetType

from envcheck.image.elf import ElfFacts
from envcheck.image.linker import Load
from envcheck.image.python import PythonFacts
from envcheck.nvidia.cuda import RequirementVerdict
from envcheck.report import Check

SCHEMA = "envcheck.image/v1"


class ManifestFacts(msgspec.Struct, kw_only=True):
    digest: str | None  # None: a docker save archive, which has no manifest blob
    media_type: str


class ConfigFacts(msgspec.Struct, kw_only=True):
    digest: str | None
    created: str | None
    platform: str


class LayerRow(msgspec.Struct, kw_only=True):
    """One layer: its descriptor, and what streaming it showed (None with --no-layers)."""

    digest: str | None
    size: int | None
    media_type: str | None
    compression: str | None
    diff_id: str | None
    files: int | None
    uncompressed_size: int | None
    created_by: str | None  # its history line, secrets redacted


class LibraryResolution(msgspec.Struct, kw_only=True):
    """Where ld.so would find one library in the image, step by step."""

    soname: str
    resolves_to: str | None
    via: str | None  # LD_LIBRARY_PATH | ld.so.cache | default directory
    steps: list[str]
    at_run_time: str | None  # for the driver's own libraries: what the toolkit mounts


class CudaFiles(msgspec.Struct, kw_only=True):
    """The CUDA files that change what loads: link-time stubs, the forward-compat libcuda."""

    stubs: list[str]
    compat: list[str]
    stubs_on_ld_library_path: list[str]
    usr_local_cuda: bool
    compat_dir: bool


class PackageVersion(msgspec.Struct, kw_only=True):
    package: str
    version: str


class CudaFacts(msgspec.Struct, kw_only=True):
    """CUDA versions from the ENV, the dpkg status and library file names (the ENV only, with
    --no-layers)."""

    cuda_version: str | None
    cudnn_version: str | None | UnsetType = UNSET
    packages: dict[str, PackageVersion] | UnsetType = UNSET
    libraries: dict[str, str] | UnsetType = UNSET
    stubs: list[str] | UnsetType = UNSET
    compat: list[str] | UnsetType = UNSET
    stubs_on_ld_library_path: list[str] | UnsetType = UNSET
    usr_local_cuda: bool | UnsetType = UNSET
    compat_dir: bool | UnsetType = UNSET


class FileRow(msgspec.Struct, kw_only=True):
    path: str
    size: int
    mode: str  # octal
    kind: str  # file | dir | symlink | hardlink | other
    link: str | None
    layer: int  # the layer that last wrote it


class JaxLibraries(msgspec.Struct, kw_only=True):
    """What the JAX CUDA plugin would load, in order, each as glibc's loader resolves it."""

    plugin: str
    loads: list[Load]


class ImageReport(msgspec.Struct, kw_only=True):
    schema: Literal["envcheck.image/v1"] = SCHEMA
    verdict: Literal["ok", "fail"]
    checks: list[Check]
    reference: str
    source: str  # docker | docker-daemon | docker-archive | oci
    index_digest: str | None
    manifest: ManifestFacts
    config: ConfigFacts
    layers: list[LayerRow]
    env: dict[str, str]  # GPU-relevant variables first; secret-looking values redacted
    labels: dict[str, str]
    entrypoint: list[str] | None
    cmd: list[str] | None
    user: str
    libraries: list[LibraryResolution] | UnsetType = UNSET  # not with --no-layers
    cuda: CudaFacts
    files: list[FileRow] | UnsetType = UNSET
    files_unmatched: list[str] | UnsetType = UNSET
    python: PythonFacts | UnsetType = UNSET  # not with --no-layers
    # SONAME, NEEDED, RPATH, RUNPATH of the JAX plugin's objects, the nvidia-* wheels' libraries
    # and the system's CUDA libraries (not with --no-layers)
    shared_objects: list[ElfFacts] | UnsetType = UNSET
    jax_libraries: JaxLibraries | UnsetType = UNSET  # with layers, when there is a JAX plugin
    requirement: RequirementVerdict

    def to_json(self) -> dict:
        return msgspec.to_builtins(self)

