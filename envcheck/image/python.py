"""The Python packages of an image at rest: every `*.dist-info/METADATA` and `*.egg-info` (a
PKG-INFO file, or the single-file form) under any `site-packages` or `dist-packages` of the merged
filesystem — venvs included, whiteouts applied — with name, version and location, and for the
JAX family their `Requires-Dist`. The layer scan keeps only each METADATA's headers (the part
before the first blank line; the long description after it is never held).
"""

from __future__ import annotations

import email.parser
import posixpath
import re

import msgspec

from envcheck.report import Check

METADATA_ENDINGS = ("/METADATA", "/PKG-INFO", ".egg-info")  # a cheap test before the regex
METADATA_RE = re.compile(r"(?:^|/)(?:site|dist)-packages/"
                         r"[^/]+(?:\.dist-info/METADATA|\.egg-info/PKG-INFO|\.egg-info)$")
METADATA_HEAD_BYTES = 64 * 1024  # headers of a real METADATA: 0.5-3 KB
NAME_RE = re.compile(r"[-_.]+")
JAX_FAMILY_RE = re.compile(r"^(jax|jaxlib|jax-(cuda|rocm)\d+-(plugin|pjrt))$")
NVIDIA_WHEEL_RE = re.compile(r"^nvidia-.+")
# Other packages that bring CUDA libraries of their own into the same process or image.
CUDA_USERS_RE = re.compile(r"^(torch|tensorflow(-gpu)?|cupy-cuda\w+|paddlepaddle-gpu|"
                           r"tensorrt(-cu\d+)?|triton|onnxruntime-gpu)$")


class PythonPackage(msgspec.Struct, kw_only=True):
    name: str  # normalized (PEP 503): jax-cuda12-plugin
    version: str
    location: str  # the site-packages directory
    metadata: str  # the file it was read from
    requires: list[str] = []  # Requires-Dist, for the JAX family


class PythonFacts(msgspec.Struct, kw_only=True):
    packages: list[PythonPackage]
    unreadable: list[str] = []  # METADATA files that could not be read, each with why


def is_metadata(path: str) -> bool:
    return METADATA_RE.search(path) is not None


def headers_only(data: bytes) -> bytes:
    """A METADATA file's headers: up to its first blank line (the description follows it)."""
    end = data.find(b"\n\n")
    return data if end < 0 else data[:end + 1]


def normalized(name: str) -> str:
    return NAME_RE.sub("-", name).lower()


def family(name: str) -> str | None:
    """"jax", "nvidia" or "cuda" for the packages the report lists by name, else None."""
    if JAX_FAMILY_RE.match(name):
        return "jax"
    if NVIDIA_WHEEL_RE.match(name):
        return "nvidia"
    return "cuda" if CUDA_USERS_RE.match(name) else None


def read_package(path: str, data: bytes) -> PythonPackage | str:
    """One package from its METADATA headers, or why they cannot be read."""
    shown = "/" + path
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return f"{shown}: not UTF-8"
    headers = email.parser.HeaderParser().parsestr(text)
    name, version = headers.get("Name"), headers.get("Version")
    if not name or not version:
        return f"{shown}: no {'Name' if not name else 'Version'} header"
    name = normalized(name.strip())
    location = posixpath.dirname(posixpath.dirname(shown) if shown.endswith(
        ("/METADATA", "/PKG-INFO")) else shown)
    requires = (headers.get_all("Requires-Dist") or []) if family(name) == "jax" else []
    return PythonPackage(name=name, version=version.strip(), location=location, metadata=shown,
                         requires=[r.strip() for r in requires])


def python_facts(kept: dict[str, bytes]) -> tuple[PythonFacts, Check]:
    """Every package whose METADATA the merged view kept; the image.python check."""
    packages, unreadable = [], []
    for path in sorted(p for p in kept if is_metadata(p)):
        found = read_package(path, kept[path])
        (packages if isinstance(found, PythonPackage) else unreadable).append(found)
    facts = PythonFacts(packages=sorted(packages, key=lambda p: (p.name, p.location)),
                        unreadable=unreadable)
    return facts, python_check(facts)


def python_check(facts: PythonFacts) -> Check:
    if not facts.packages and not facts.unreadable:
        return Check("image.python", "skip", "no Python packages in the image (no dist-info or "
                                             "egg-info under a site-packages or dist-packages)")
    locations = sorted({p.location for p in facts.packages})
    jax = ", ".join(f"{p.name} {p.version}" for p in facts.packages if family(p.name) == "jax")
    summary = (f"{len(facts.packages)} Python package(s) in {len(locations)} location(s)"
               + (f"; {jax}" if jax else "; no JAX"))
    if facts.unreadable:
        return Check("image.python", "warn", f"{summary}; {len(facts.unreadable)} unreadable: "
                                             f"{facts.unreadable[0]}",
                     detail="; ".join(facts.unreadable[:20]),
                     fix="reinstall the package(s) named (`pip install --force-reinstall`): "
                         "their metadata is damaged")
    return Check("image.python", "pass", summary)
