"""Probes of this machine: GPU and driver, NVML health, the NVIDIA Container Toolkit and the
Docker daemon. Each probe reads files under a `root` (`/` on a real host, a fixture root in tests)
and runs commands only through the runner seam, so GPU-host behaviour is tested on recorded outputs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from envcheck import runner as runner_module
from envcheck.runner import Runner

COMMAND_TIMEOUT_S = 20.0


@dataclasses.dataclass(frozen=True)
class Probe:
    """Where a probe looks: the filesystem root and the subprocess seam."""

    root: Path = Path("/")
    run: Runner | None = None

    def command(self, argv: list[str], timeout_s: float = COMMAND_TIMEOUT_S):
        run = self.run or runner_module.run  # looked up per call, so tests can replace the seam
        return run(argv, timeout_s)

    def path(self, absolute: str) -> Path:
        assert absolute.startswith("/"), absolute
        return self.root / absolute.lstrip("/")

    def read(self, absolute: str) -> str | None:
        try:
            return self.path(absolute).read_text(errors="replace")
        except OSError:
            return None

    def which(self, name: str) -> str | None:
        """The first executable `name` in the usual system directories under root."""
        for directory in ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin",
                          "/bin"):
            candidate = self.path(f"{directory}/{name}")
            if candidate.is_file():
                return f"{directory}/{name}"
        return None
