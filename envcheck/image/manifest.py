"""From the reference's top-level object to one image: the platform's manifest chosen from an
index (attestations skipped), the manifest and the config checked for the fields the pipeline
reads, and the config's platform held against what was asked for."""

from __future__ import annotations

import dataclasses
import platform as host_platform

from envcheck.image.errors import SourceError
from envcheck.image.sources import INDEX_TYPES, ImageSource

ATTESTATION = "attestation-manifest"


@dataclasses.dataclass
class Resolved:
    index_digest: str | None
    manifest_digest: str | None
    manifest_media_type: str
    manifest: dict
    config_digest: str | None
    config: dict
    platform: str


def host_arch() -> str:
    machine = host_platform.machine().lower()
    return {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(machine, machine)


def choose_platform(index: dict, wanted: str, description: str) -> dict:
    """The index entry for `wanted` (os/arch[/variant]), skipping attestation manifests."""
    candidates = []
    entries = index.get("manifests")
    if not isinstance(entries, list):
        raise SourceError(f"{description}: malformed index (no manifests list)")
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        plat = entry.get("platform") if isinstance(entry.get("platform"), dict) else {}
        annotations = entry.get("annotations")
        kind = annotations.get("vnd.docker.reference.type") if isinstance(annotations,
                                                                           dict) else None
        if kind == ATTESTATION or plat.get("os") == "unknown":
            continue
        name = "/".join(str(p) for p in (plat.get("os"), plat.get("architecture"),
                                         plat.get("variant")) if p)
        if isinstance(entry.get("digest"), str):
            candidates.append((name, entry))
    for name, entry in candidates:
        if platform_matches(name, wanted):
            return entry
    available = ", ".join(name for name, _ in candidates) or "none"
    raise SourceError(f"{description}: no manifest for platform {wanted} (available: "
                      f"{available}); choose one with --platform")


def platform_matches(name: str, wanted: str) -> bool:
    """`name` (os/arch[/variant]) is `wanted`; an os/arch `wanted` takes any variant."""
    return name == wanted or wanted.count("/") == 1 and name.rsplit("/", 1)[0] == wanted


def check_manifest(body: dict, description: str) -> None:
    """The fields this pipeline reads, with the right types; a malformed manifest is one error."""
    config = body.get("config")
    layers = body.get("layers")
    problems = []
    if not isinstance(config, dict) or not isinstance(config.get("digest"), (str, type(None))):
        problems.append("no config descriptor")
    if not isinstance(layers, list):
        problems.append("no layers list")
    else:
        for index, layer in enumerate(layers):
            valid = isinstance(layer, dict) and isinstance(layer.get("digest"), (str, type(None)))
            if not valid or not isinstance(layer.get("size", 0), int):
                problems.append(f"layer {index} is not a descriptor with digest and size")
    if problems:
        raise SourceError(f"{description}: malformed manifest ({'; '.join(problems)})")


def check_config(config: dict, description: str) -> None:
    """The config fields this pipeline reads, with the right types (one error otherwise)."""
    inner = config.get("config") or {}
    rootfs = config.get("rootfs") or {}
    history = config.get("history") or []
    strings = (str, type(None))
    problems = [name for name, ok in (
        ("config", isinstance(inner, dict)), ("rootfs", isinstance(rootfs, dict)),
        ("history", isinstance(history, list) and all(isinstance(h, dict) for h in history)),
        *((key, isinstance(config.get(key), strings)) for key in
          ("os", "architecture", "variant", "created")),
    ) if not ok]
    if not problems:
        problems += [f"config.{key}" for key, ok in (
            ("Env", _str_list(inner.get("Env"))),
            ("Entrypoint", _str_list(inner.get("Entrypoint"))),
            ("Cmd", _str_list(inner.get("Cmd"))), ("User", isinstance(inner.get("User"), strings)),
            ("Labels", isinstance(inner.get("Labels") or {}, dict)),
        ) if not ok]
        problems += [] if _str_list(rootfs.get("diff_ids")) else ["rootfs.diff_ids"]
    if problems:
        raise SourceError(f"{description}: the image config is malformed "
                          f"({', '.join(problems)} of the wrong type)")


def _str_list(value) -> bool:
    return value is None or isinstance(value, list) and all(isinstance(v, str) for v in value)


def resolve(source: ImageSource, wanted_platform: str | None) -> Resolved:
    top = source.top()
    index_digest = None
    wanted = wanted_platform or f"linux/{host_arch()}"
    from_index = top.media_type in INDEX_TYPES or "manifests" in top.body
    if from_index:
        index_digest = top.digest
        entry = choose_platform(top.body, wanted, source.description)
        top = source.manifest(entry["digest"])
    check_manifest(top.body, source.description)
    config_descriptor = top.body["config"]
    config = source.json_blob(config_descriptor.get("digest"))
    check_config(config, source.description)
    plat = "/".join(p for p in (config.get("os"), config.get("architecture"),
                                config.get("variant")) if p)
    if wanted_platform and not from_index and plat.split("/")[:2] != wanted.split("/")[:2]:
        raise SourceError(f"{source.description}: the image is {plat or 'of no platform'} "
                          f"only (one manifest, no index), not {wanted}: drop --platform or "
                          "choose an image built for it")
    return Resolved(index_digest, top.digest, top.media_type, top.body,
                    config_descriptor.get("digest"), config, plat)
