"""Link 2: the NVIDIA Container Toolkit — binaries and matching versions, config.toml (mode,
no-cgroups), CDI specs in /etc/cdi and /var/run/cdi (present, fresh for this driver), and
`nvidia-container-cli info` when it runs. Facts: ../shared/reference/passthrough.md §1.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import msgspec
import yaml
from msgspec import UNSET, UnsetType

from envcheck.host import Probe
from envcheck.host.nvml import GpuFacts
from envcheck.nvidia.catalog import CATALOG_BY_ID, classify
from envcheck.report import Check

BINARIES = ("nvidia-ctk", "nvidia-container-cli", "nvidia-container-runtime",
            "nvidia-container-runtime-hook", "nvidia-cdi-hook")
HOOKS = ("nvidia-container-runtime-hook", "nvidia-cdi-hook")  # what dockerd looks for (--gpus)
CONFIG = "/etc/nvidia-container-runtime/config.toml"
UNMARSHAL = "'failed to unmarshal config'"  # what the toolkit says (internal/config/toml.go)
CDI_DIRS = ("/etc/cdi", "/var/run/cdi")
TOOLKIT_VERSION_RE = re.compile(r"(?:CLI version|cli-version:)\s*(\d+\.\d+\.\d+)")
SPEC_DRIVER_RE = re.compile(r"--host-driver-version=(\d+\.\d+(?:\.\d+)?)|"
                            r"libcuda\.so\.(\d+\.\d+(?:\.\d+)?)")
TOOLKIT_INSTALL_FIX = ("install nvidia-container-toolkit (NVIDIA's apt/dnf repository), run `sudo "
               "nvidia-ctk runtime configure --runtime=docker` and restart dockerd")


class ToolkitConfig(msgspec.Struct, kw_only=True):
    """config.toml's settings the checks read (empty: no file, or one the toolkit refuses)."""

    mode: str | UnsetType = UNSET
    no_cgroups: bool | UnsetType = UNSET


class CdiSpec(msgspec.Struct, kw_only=True):
    path: str
    kind: str
    devices: list[str]
    driver_versions: list[str]  # the driver versions its paths name


class CdiFacts(msgspec.Struct, kw_only=True):
    specs: list[CdiSpec]
    broken: list[str]  # specs that cannot be read


class CliInfo(msgspec.Struct, kw_only=True):
    """What `nvidia-container-cli info` says the toolkit sees (empty: it did not answer)."""

    nvrm: str | None | UnsetType = UNSET
    cuda: str | None | UnsetType = UNSET
    models: list[str] | UnsetType = UNSET
    brands: list[str] | UnsetType = UNSET


class ToolkitFacts(msgspec.Struct, kw_only=True):
    binaries: dict[str, str]
    versions: dict[str, str | None] | UnsetType = UNSET
    config: ToolkitConfig | UnsetType = UNSET
    cdi: CdiFacts | UnsetType = UNSET
    cli_info: CliInfo | UnsetType = UNSET


def probe_toolkit(probe: Probe, driver: str | None, gpus: list[GpuFacts],
                  rootless: bool = False) -> tuple[list[Check], ToolkitFacts]:
    """`driver` (the kernel module's version) and `gpus` (NVML's) are what the toolkit's own
    view of the host must agree with."""
    found = {name: probe.which(name) for name in BINARIES}
    facts = ToolkitFacts(binaries={k: v for k, v in found.items() if v})
    if not any(found[h] for h in HOOKS):
        reason = "the NVIDIA Container Toolkit is not installed (toolkit.installed)"
        return [Check("toolkit.installed", "fail",
                      "NVIDIA Container Toolkit not installed (no nvidia-container-runtime-hook "
                      "or nvidia-cdi-hook): `docker run --gpus` cannot reach the GPU",
                      fix=TOOLKIT_INSTALL_FIX)] + [
            Check(i, "skip", reason) for i in ("toolkit.versions", "toolkit.config",
                                               "toolkit.cdi", "toolkit.cli-info")], facts
    present = ", ".join(facts.binaries)
    checks = [Check("toolkit.installed", "pass", f"found {present}")]
    version_check, facts.versions = versions_check(probe, found)
    config_check, facts.config = read_config(probe, rootless)
    cdi_check, facts.cdi = cdi_specs(probe, driver)
    info_check, facts.cli_info = cli_info(probe, found["nvidia-container-cli"], driver, gpus)
    return checks + [version_check, config_check, cdi_check, info_check], facts


def versions_check(probe: Probe, found: dict) -> tuple[Check, dict]:
    versions = {}
    for name in ("nvidia-ctk", "nvidia-container-cli"):
        if found[name]:
            result = probe.command([found[name], "--version"])
            match = TOOLKIT_VERSION_RE.search(result.out)
            versions[name] = match.group(1) if match else None
    known = {v for v in versions.values() if v}
    text = ", ".join(f"{k} {v or '?'}" for k, v in versions.items()) or "no versioned tools"
    if len(known) > 1:
        return Check("toolkit.versions", "warn", f"toolkit parts disagree: {text}",
                     fix="upgrade all toolkit packages together (nvidia-container-toolkit, "
                         "nvidia-container-toolkit-base, libnvidia-container-tools, "
                         "libnvidia-container1) to one version"), versions
    if not known:
        return Check("toolkit.versions", "warn", f"no toolkit version readable ({text})",
                     fix="reinstall nvidia-container-toolkit"), versions
    return Check("toolkit.versions", "pass", text), versions


def read_config(probe: Probe, rootless: bool) -> tuple[Check, ToolkitConfig]:
    text = probe.read(CONFIG)
    if text is None:
        return Check("toolkit.config", "pass", f"no {CONFIG}: defaults (mode auto, cgroups "
                                               "managed)"), ToolkitConfig()
    try:
        mode, no_cgroups = _config_settings(tomllib.loads(text))
    except ValueError as error:  # a TOMLDecodeError too
        problem = ("is not valid TOML: " if isinstance(error, tomllib.TOMLDecodeError) else "")
        return Check("toolkit.config", "fail", f"{CONFIG}: {problem}{error}",
                     fix="regenerate it with `nvidia-ctk config default --output " + CONFIG
                         + "`"), ToolkitConfig()
    facts = ToolkitConfig(mode=mode, no_cgroups=no_cgroups)
    if mode in ("cdi", "csv"):
        return Check("toolkit.config", "fail", f"mode = \"{mode}\": the --gpus hook refuses to "
                                               "run (it needs legacy or auto)",
                     fix=CATALOG_BY_ID["toolkit.mode"].fix), facts
    if rootless and not no_cgroups:
        return Check("toolkit.config", "fail", "rootless Docker with no-cgroups = false: the "
                                               "hook cannot edit device cgroups",
                     fix=CATALOG_BY_ID["toolkit.cgroups"].fix), facts
    if no_cgroups and not rootless:
        return Check("toolkit.config", "warn", "no-cgroups = true on a rootful daemon: device "
                                               "nodes must be passed explicitly",
                     fix="set `no-cgroups = false` with `sudo nvidia-ctk config --in-place --set "
                         "nvidia-container-cli.no-cgroups=false`"), facts
    return Check("toolkit.config", "pass", f"mode {mode}, no-cgroups {str(no_cgroups).lower()}"
                 ), facts


def _config_settings(config: dict) -> tuple[str, bool]:
    """(mode, no-cgroups) of a parsed config.toml; ValueError where a value has a type the
    toolkit refuses to load (it then starts no container: `no-cgroups = "false"` is a string)."""
    tables = {name: config.get(name, {})
              for name in ("nvidia-container-runtime", "nvidia-container-cli")}
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise ValueError(f"{name} is {type(table).__name__}, not a table ([{name}]): the "
                             f"toolkit cannot load it ({UNMARSHAL})")
    mode = tables["nvidia-container-runtime"].get("mode", "auto")
    no_cgroups = tables["nvidia-container-cli"].get("no-cgroups", False)
    if not isinstance(mode, str):
        raise ValueError(f"nvidia-container-runtime.mode = {mode!r} is not a string: the "
                         f"toolkit cannot load it ({UNMARSHAL})")
    if not isinstance(no_cgroups, bool):
        raise ValueError(f"nvidia-container-cli.no-cgroups = {no_cgroups!r} is not true or "
                         f"false (unquoted): the toolkit cannot load it ({UNMARSHAL})")
    return mode, no_cgroups


def cdi_specs(probe: Probe, driver: str | None) -> tuple[Check, CdiFacts]:
    specs, broken = [], []
    for directory in CDI_DIRS:
        folder = probe.path(directory)
        for path in sorted(folder.glob("*")) if folder.is_dir() else []:
            if path.suffix not in (".yaml", ".yml", ".json"):
                continue
            shown = f"{directory}/{path.name}"
            spec = _read_cdi_spec(path, shown)
            if spec is None:
                broken.append(shown)
            else:
                specs.append(spec)
    return cdi_check(specs, broken, driver), CdiFacts(specs=specs, broken=broken)


def _read_cdi_spec(path: Path, shown: str) -> CdiSpec | None:
    """A CDI spec's kind, device names and the driver versions its paths name; None where it
    cannot be read, or is not shaped as the CDI library requires (a kind, devices that are maps
    with a name), which refuses such a spec too."""
    try:
        text = path.read_text()
        spec = yaml.safe_load(text)
    except (OSError, yaml.YAMLError):
        return None
    devices = spec.get("devices") if isinstance(spec, dict) else None
    if not (isinstance(devices, list) and isinstance(spec.get("kind"), str) and all(
            isinstance(d, dict) and isinstance(d.get("name"), str) and d["name"]
            for d in devices)):
        return None
    versions = {a or b for a, b in SPEC_DRIVER_RE.findall(text)}
    return CdiSpec(path=shown, kind=spec["kind"], devices=[d["name"] for d in devices],
                   driver_versions=sorted(versions))


def cdi_check(specs: list[CdiSpec], broken: list[str], driver: str | None) -> Check:
    fix = ("`sudo nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml` (toolkit ≥ 1.18: "
           "`sudo systemctl restart nvidia-cdi-refresh.service`)")
    if broken:
        return Check("toolkit.cdi", "fail", f"unreadable CDI spec(s): {', '.join(broken)}",
                     fix=f"delete them and regenerate: {fix}")
    nvidia = [s for s in specs if s.kind == "nvidia.com/gpu"]
    if not nvidia:
        return Check("toolkit.cdi", "warn", "no nvidia.com/gpu CDI spec in /etc/cdi or "
                                            "/var/run/cdi: CDI injection is unavailable",
                     fix=fix)
    stale = [s for s in nvidia if driver and s.driver_versions
             and driver not in s.driver_versions]
    if stale:
        return Check("toolkit.cdi", "warn",
                     f"{stale[0].path} was generated for driver "
                     f"{', '.join(stale[0].driver_versions)}, the host runs {driver}",
                     fix=f"regenerate it: {fix}")
    names = sorted({n for s in nvidia for n in s.devices})
    return Check("toolkit.cdi", "pass", f"{len(nvidia)} spec(s), devices "
                                       f"{', '.join('nvidia.com/gpu=' + n for n in names)}")


def cli_info(probe: Probe, cli: str | None, driver: str | None,
             gpus: list[GpuFacts]) -> tuple[Check, CliInfo]:
    if not cli:
        return Check("toolkit.cli-info", "skip", "nvidia-container-cli is not installed "
                                                 "(CDI-only toolkit)"), CliInfo()
    result = probe.command([cli, "info"])
    if result.rc != 0:
        entry, matched = classify(result.err + "\n" + result.out)
        return Check("toolkit.cli-info", "fail", f"nvidia-container-cli info failed: {matched}",
                     detail=entry.cause, fix=entry.fix), CliInfo()
    nvrm = re.search(r"NVRM version:\s*(\S+)", result.out)
    cuda = re.search(r"CUDA version:\s*(\S+)", result.out)
    facts = CliInfo(nvrm=nvrm and nvrm.group(1), cuda=cuda and cuda.group(1),
                    models=[m.strip() for m in re.findall(r"^Model:\s*(.+)$", result.out,
                                                          re.MULTILINE)],
                    brands=[b.strip() for b in re.findall(r"^Brand:\s*(.+)$", result.out,
                                                          re.MULTILINE)])
    return cli_info_check(facts, driver, gpus), facts


def cli_info_check(info: CliInfo, driver: str | None, gpus: list[GpuFacts]) -> Check:
    """The toolkit's view of the host against the host's own: the kernel module's driver
    version and NVML's GPUs. A toolkit that sees another driver, or other GPUs, is working from
    a stale state (libnvidia-container or its ld cache left behind by a driver upgrade, a
    GPU added or removed since) and injects the wrong libraries or devices."""
    seen = (f"the toolkit sees driver {info.nvrm} (CUDA {info.cuda}) and {len(info.models)} "
            f"GPU(s)" + (f": {', '.join(sorted(set(info.models)))}" if info.models else ""))
    problems = []
    if driver and info.nvrm and info.nvrm != driver:
        problems.append(f"the kernel module is {driver}")
    names = sorted(g.name for g in gpus if g.name)
    if gpus and len(info.models) != len(gpus):
        problems.append(f"NVML lists {len(gpus)} GPU(s)")
    elif len(names) == len(info.models) and names != sorted(info.models):
        problems.append(f"NVML lists {', '.join(sorted(set(names)))}")
    if problems:
        return Check("toolkit.cli-info", "fail", f"{seen}, but {' and '.join(problems)}",
                     detail="nvidia-container-cli reads the driver through libnvidia-container "
                            "and the host's ld cache: a view that disagrees with the host is "
                            "stale, and containers get the wrong driver libraries or devices",
                     fix="upgrade the toolkit with the driver (nvidia-container-toolkit, "
                         "libnvidia-container1, libnvidia-container-tools), run `sudo "
                         "ldconfig`, restart dockerd; reboot if the driver was upgraded "
                         "without one")
    return Check("toolkit.cli-info", "pass", seen)
