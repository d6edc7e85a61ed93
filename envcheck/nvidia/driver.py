"""The NVIDIA driver's version as the kernel module states it in /proc/driver/nvidia/version
(the host's, or the copy a GPU container sees)."""

from __future__ import annotations

import re
from pathlib import Path

VERSION_FILE = "/proc/driver/nvidia/version"
NVRM_VERSION_RE = re.compile(r"NVRM version:.*?Kernel Module(?: for \S+)?\s+(\d+\.\d+(?:\.\d+)?)")


def parse_driver_version(text: str) -> tuple[str | None, str | None]:
    """(version, "open" | "proprietary") from /proc/driver/nvidia/version."""
    match = NVRM_VERSION_RE.search(text)
    if not match:
        return None, None
    return match.group(1), "open" if "Open Kernel Module" in text else "proprietary"


def host_driver_version(root: Path = Path("/")) -> str | None:
    """The driver version of the machine under `root` (None without a loaded driver)."""
    try:
        text = (root / VERSION_FILE.lstrip("/")).read_text(errors="replace")
    except OSError:
        return None
    return parse_driver_version(text)[0]
