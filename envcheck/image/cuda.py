"""CUDA facts of an image at rest: versions from the dpkg status file and library file names."""

from __future__ import annotations

import re
from collections.abc import Iterable

PACKAGES = {  # fact -> dpkg package name pattern
    "cuda": re.compile(r"^cuda-cudart-(\d+)-(\d+)$"),
    "cudnn": re.compile(r"^libcudnn\d+(-cuda-\d+)?$"),
    "cublas": re.compile(r"^libcublas-\d+-\d+$"),
    "nccl": re.compile(r"^libnccl\d+$"),
    "cuda_compat": re.compile(r"^cuda-compat-\d+-\d+$"),
}
LIBRARY_FILES = {  # fact -> versioned library file name
    "cudart": re.compile(r"(?:^|/)libcudart\.so\.(\d+(?:\.\d+)+)$"),
    "cudnn": re.compile(r"(?:^|/)libcudnn\.so\.(\d+(?:\.\d+)+)$"),
    "cublas": re.compile(r"(?:^|/)libcublas\.so\.(\d+(?:\.\d+)+)$"),
    "nccl": re.compile(r"(?:^|/)libnccl\.so\.(\d+(?:\.\d+)+)$"),
    "compat_libcuda": re.compile(r"(?:^|/)compat/libcuda\.so\.(\d+(?:\.\d+)+)$"),
}


def parse_dpkg_status(text: str) -> dict[str, str]:
    """Installed packages -> version, from /var/lib/dpkg/status."""
    installed = {}
    for paragraph in text.split("\n\n"):
        fields = dict(re.findall(r"^([A-Za-z-]+): ?(.*)$", paragraph, re.MULTILINE))
        if "Package" in fields and fields.get("Status", "").endswith(" installed"):
            installed[fields["Package"]] = fields.get("Version", "")
    return installed


def package_versions(installed: dict[str, str]) -> dict[str, dict[str, str]]:
    """The CUDA-related packages found: fact -> {package, version}."""
    found = {}
    for fact, pattern in PACKAGES.items():
        for name in sorted(installed):
            if pattern.match(name):
                found[fact] = {"package": name, "version": installed[name]}
    return found


def library_versions(paths: Iterable[str]) -> dict[str, str]:
    """Versions read from library file names (e.g. libcudart.so.12.8.57 -> 12.8.57)."""
    found: dict[str, str] = {}
    for path in paths:
        if ".so." not in path:  # what every LIBRARY_FILES name has; most paths are not libraries
            continue
        for fact, pattern in LIBRARY_FILES.items():
            match = pattern.search(path)
            if match and len(match.group(1)) > len(found.get(fact, "")):
                found[fact] = match.group(1)
    return found
