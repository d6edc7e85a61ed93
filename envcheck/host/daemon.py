"""Link 3: the Docker daemon through the docker SDK — reachable (not running vs socket
permission vs no Docker at all), the `nvidia` runtime (and daemon.json saying so without a
restart), CDI enabled and the devices it discovered, cgroups, rootless, snap and Desktop hints.

The checks read the `GET /info` dict, so recorded `docker info` outputs of GPU hosts drive them.
"""

from __future__ import annotations

import json
import os

import msgspec

from envcheck.docker_client import DEFAULT_SOCKET, Unreachable, ping_client, unreachable_check
from envcheck.host import Probe
from envcheck.report import Check

DAEMON_JSON = "/etc/docker/daemon.json"
CONFIGURE_FIX = ("run `sudo nvidia-ctk runtime configure --runtime=docker` and restart dockerd "
                 "(`sudo systemctl restart docker`)")


def connect(probe: Probe, timeout_s: float):
    """(a pinged docker client, None) or (None, the docker.reachable Check saying why not).
    No DOCKER_HOST and no socket at all means no Docker here: a skip, not a failure."""

    if "DOCKER_HOST" not in os.environ and not probe.path(DEFAULT_SOCKET).exists():
        return None, Check("docker.reachable", "skip",
                           f"no Docker engine here ({DEFAULT_SOCKET} absent, DOCKER_HOST unset)",
                           fix="install Docker Engine (docker-ce) to check the container path")
    try:
        return ping_client(timeout_s), None
    except Unreachable as error:
        return None, error.check


def read_info(client, reach: Check | None) -> tuple[object | None, dict, Check | None]:
    """GET /info, or the daemon counted unreachable when it stops answering after the ping."""
    import docker
    import requests

    if client is None:
        return None, {}, reach
    try:
        return client, client.info(), reach
    except (docker.errors.DockerException, requests.exceptions.RequestException) as error:
        return None, {}, unreachable_check(str(error))


class DockerFacts(msgspec.Struct, kw_only=True):
    """The GET /info fields the checks read (None: the engine left it out)."""

    server_version: str | None
    runtimes: list[str]
    default_runtime: str | None
    cgroup_driver: str | None
    cgroup_version: str | None
    rootless: bool
    cdi_spec_dirs: list[str] | None
    discovered_devices: list[str]
    operating_system: str | None
    docker_root_dir: str | None = None  # added to v1 later: older node reports lack it


def probe_daemon(probe: Probe, info: dict,
                 toolkit_hooks: bool) -> tuple[list[Check], DockerFacts]:
    facts = info_facts(info)
    reachable = Check("docker.reachable", "pass",
                      f"Docker Engine {facts.server_version or '?'} "
                      f"({facts.operating_system or '?'}), cgroup v{facts.cgroup_version or '?'} "
                      f"{facts.cgroup_driver or '?'}" + (", rootless" if facts.rootless else ""))
    return [reachable, runtime_check(probe, facts, toolkit_hooks), cdi_check(facts),
            engine_check(facts)], facts


def info_facts(info: dict) -> DockerFacts:
    """The GET /info fields the checks read. A field of another shape than Docker's (another
    engine answering the Docker API, or another version) reads as absent."""
    devices = info.get("DiscoveredDevices")
    return DockerFacts(
        server_version=_text(info.get("ServerVersion")),
        runtimes=sorted(_strings(info.get("Runtimes"))),
        default_runtime=_text(info.get("DefaultRuntime")),
        cgroup_driver=_text(info.get("CgroupDriver")),
        cgroup_version=_text(info.get("CgroupVersion")),
        rootless=is_rootless(info),
        cdi_spec_dirs=_strings(info.get("CDISpecDirs")) or None,
        discovered_devices=_strings([d.get("ID") for d in devices if isinstance(d, dict)]
                                    if isinstance(devices, list) else []),
        operating_system=_text(info.get("OperatingSystem")),
        docker_root_dir=_text(info.get("DockerRootDir")))


def is_rootless(info: dict) -> bool:
    return any("rootless" in option for option in _strings(info.get("SecurityOptions")))


def _text(value) -> str | None:
    """A string field (a number, as some engines give versions, in its text form)."""
    ok = isinstance(value, str | int | float) and not isinstance(value, bool)
    return str(value) if ok else None


def _strings(value) -> list[str]:
    """The strings of a list, or the keys of a map (Runtimes is one)."""
    items = value if isinstance(value, list | dict) else []
    return [item for item in items if isinstance(item, str)]


def configured_runtimes(probe: Probe) -> set[str]:
    try:
        runtimes = json.loads(probe.read(DAEMON_JSON) or "{}").get("runtimes")
    except (json.JSONDecodeError, AttributeError):
        return set()
    return set(runtimes) if isinstance(runtimes, dict) else set()  # dockerd refuses other shapes


def runtime_check(probe: Probe, facts: DockerFacts, toolkit_hooks: bool) -> Check:
    default = facts.default_runtime
    if "nvidia" in facts.runtimes:
        return Check("docker.runtime", "pass", f"runtime nvidia registered (default: {default})")
    if "nvidia" in configured_runtimes(probe):
        return Check("docker.runtime", "fail", f"{DAEMON_JSON} registers the nvidia runtime but "
                                               "the running daemon does not have it",
                     fix="restart dockerd (`sudo systemctl restart docker`)")
    if toolkit_hooks:
        return Check("docker.runtime", "warn", "runtime nvidia not registered: `--gpus` works "
                                               "through the hook, `runtime: nvidia` does not",
                     fix=CONFIGURE_FIX)
    return Check("docker.runtime", "fail",
                 f"runtime nvidia not registered (runtimes: {', '.join(facts.runtimes)}) and "
                 "no toolkit hook: dockerd has no NVIDIA device driver for `--gpus`",
                 fix="install nvidia-container-toolkit, then " + CONFIGURE_FIX)


def cdi_check(facts: DockerFacts) -> Check:
    if not facts.cdi_spec_dirs:
        return Check("docker.cdi", "skip", "CDI not enabled in this daemon (Docker < 28.2 needs "
                                           "\"features\": {\"cdi\": true}); --gpus uses the hook")
    nvidia = [d for d in facts.discovered_devices if d and d.startswith("nvidia.com/")]
    if nvidia:
        return Check("docker.cdi", "pass", f"CDI devices: {', '.join(nvidia)}")
    if facts.discovered_devices or _at_least(facts.server_version, (28, 2)):
        others = ", ".join(facts.discovered_devices) or "none"
        return Check("docker.cdi", "warn", f"CDI enabled but no nvidia.com/gpu device "
                                           f"discovered (devices: {others})",
                     fix="generate a spec: `sudo nvidia-ctk cdi generate "
                         "--output=/etc/cdi/nvidia.yaml`")
    dirs = ", ".join(facts.cdi_spec_dirs)
    return Check("docker.cdi", "pass", f"CDI enabled (spec dirs {dirs}); this engine does not "
                                       "list discovered devices")


def engine_check(facts: DockerFacts) -> Check:
    if (facts.docker_root_dir or "").startswith("/var/snap/docker"):
        return Check("docker.engine", "warn", "Docker from the snap: it cannot see the host's "
                                              "NVIDIA libraries or hooks",
                     fix="remove the snap (`sudo snap remove docker`) and install docker-ce from "
                         "Docker's apt repository")
    if "Docker Desktop" in str(facts.operating_system):
        return Check("docker.engine", "warn", "Docker Desktop: GPUs only through the WSL2 "
                                              "backend on Windows (not on Linux or macOS)",
                     fix="on Linux use Docker Engine (docker-ce); on Windows update the NVIDIA "
                         "driver and WSL (`wsl --update`)")
    return Check("docker.engine", "pass", f"{facts.operating_system or '?'}, "
                                          f"cgroup driver {facts.cgroup_driver or '?'}")


def _at_least(version: str | None, minimum: tuple[int, int]) -> bool:
    try:
        return tuple(int(p) for p in (version or "").split(".")[:2]) >= minimum
    except ValueError:
        return False
