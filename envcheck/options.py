"""The option validators of the envcheck commands, each a click callback: a bad value is one
usage error line (exit 2) naming the option and the form it takes, before anything runs."""

from __future__ import annotations

import re
from pathlib import Path

import click

from envcheck.image import reference

K8S_LABEL_RE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")  # RFC 1123, as Kubernetes
DRIVER_VERSION_RE = re.compile(r"\d+(\.\d+){1,2}")
PLATFORM_RE = re.compile(r"[a-z0-9_.-]+/[a-z0-9_.-]+(/[a-z0-9_.-]+)?")


def image(ctx, param, value: str | None) -> str | None:
    """An image as docker run takes it: a reference, or an image ID the engine has."""
    return _checked_image(value, pulled=False)


def pulled_image(ctx, param, value: str) -> str:
    """An image for a Kubernetes manifest: a reference a kubelet can pull (no ID)."""
    return _checked_image(value, pulled=True)


def _checked_image(value: str | None, pulled: bool) -> str | None:
    if value is None:
        return None
    try:
        ref = reference.parse(value) if value == value.strip() else None
    except reference.RefSyntaxError:
        ref = None
    by_id = not pulled and reference.IMAGE_ID_RE.fullmatch(value) is not None
    if not by_id and (ref is None or ref.transport != "docker"):
        raise click.BadParameter(
            f"{value!r} is not an image reference{' a kubelet can pull' if pulled else ''} (e.g. "
            f"{'registry.example/envcheck:1' if pulled else 'envcheck-dev:latest or an image ID'})")
    return value


def k8s_label(ctx, param, value: str) -> str:
    """A namespace: a DNS label, as the API server checks it (refused before anything is
    applied)."""
    return _checked_k8s_name(value, dotted=False)


def k8s_subdomain(ctx, param, value: str | None) -> str | None:
    """A runtime class name: a DNS subdomain (labels joined by dots)."""
    return None if value is None else _checked_k8s_name(value, dotted=True)


def _checked_k8s_name(value: str, dotted: bool) -> str:
    parts = value.split(".") if dotted else [value]
    if len(value) > (253 if dotted else 63) or not all(map(K8S_LABEL_RE.fullmatch, parts)):
        raise click.BadParameter(
            f"{value!r} is not a Kubernetes name: lower-case letters, digits and '-', starting "
            f"and ending with a letter or digit{', in dot-separated parts' if dotted else ''}, "
            f"at most {253 if dotted else 63} characters")
    return value


def driver_version(ctx, param, value: str | None) -> str | None:
    """X.Y or X.Y.Z, as /proc/driver/nvidia/version states it."""
    if value is not None and not DRIVER_VERSION_RE.fullmatch(value):
        raise click.BadParameter(f"{value!r} is not X.Y or X.Y.Z")
    return value


def platform(ctx, param, value: str | None) -> str | None:
    """OS/ARCH[/VARIANT], lower-cased as Docker does (linux/amd64, linux/arm64/v8)."""
    if value is None:
        return None
    if not PLATFORM_RE.fullmatch(value.lower()):
        raise click.BadParameter(f"{value!r} is not OS/ARCH or OS/ARCH/VARIANT (e.g. "
                                 "linux/amd64, linux/arm64/v8)")
    return value.lower()


def metrics_file(ctx, param, value: Path | None) -> Path | None:
    """A metrics file whose directory exists and is writable (checked before the run)."""
    from envcheck.errors import UnreadableInput
    from envcheck.metrics import check_target

    if value is None:
        return None
    try:
        check_target(value)
    except UnreadableInput as problem:
        raise click.BadParameter(str(problem).removeprefix(f"--metrics {value}: ")) from None
    return value
