"""Link 2: the NVIDIA Container Toolkit — binaries and matching versions, config.toml (mode,
no-cgroups), CDI specs in /etc/cdi and /var/run/cdi (present, fresh for this driver), and
`nvidia-container-cli info` when it runs. Facts: ../shared/reference/passthrough.md §1.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

from envcheck.catalog import CATALOG_BY_ID, classify
from envcheck.host import Probe
from envcheck.report import Check

BINARIES = ("nvidia-ctk", "nvidia-container-cli", "nvidia-container-runtime",
            "nvidia-container-runtime-hook", "nvidia-cdi-hook")
HOOKS = ("nvidia-container-runtime-hook", "nvidia-cdi-hook")  # what dockerd looks for (--gpus)
CONFIG = "/etc/nvidia-container-runtime/config.toml"
UNMARSHAL = "'failed to unmarshal config'"  # what the toolkit says (internal/config/toml.go)
CDI_DIRS = ("/etc/cdi", "/var/run/cdi")
VERSION_RE = re.compile(r"(?:CLI version|cli-version:)\s*(\d+\.\d+\.\d+)")
SPEC_DRIVER_RE = re.compile(r"--host-driver-version=(\d+\.\d+(?:\.\d+)?)|"
                            r"libcuda\.so\.(\d+\.\d+(?:\.\d+)?)")
INSTALL_FIX = ("install nvidia-container-toolkit (NVIDIA's apt/dnf repository), run `sudo "
               "nvidia-ctk runtime configure --runtime=docker` and restart dockerd")


def probe_toolkit(probe: Probe, driver: str | None, rootless: bool = False
                  ) -> tuple[list[Check], dict]:
    found = {name: probe.which(name) for name in BINARIES}
    facts: dict = {"binaries": {k: v for k, v in found.items() if v}}
    if not any(found[h] for h in HOOKS):
        reason = "the NVIDIA Container Toolkit is not installed (toolkit.installed)"
        return [Check("toolkit.installed", "fail",
                      "NVIDIA Container Toolkit not installed (no nvidia-container-runtime-hook "
                      "or nvidia-cdi-hook): `docker run --gpus` cannot reach the GPU",
                      fix=INSTALL_FIX)] + [
            Check(i, "skip", reason) for i in ("toolkit.versions", "toolkit.config",
                                               "toolkit.cdi", "toolkit.cli-info")], facts
    present = ", ".join(facts["binaries"])
    checks = [Check("toolkit.installed", "pass", f"found {present}")]
    version_check, facts["versions"] = versions_check(probe, found)
    config_check, facts["config"] = read_config(probe, rootless)
    cdi_check, facts["cdi"] = cdi_specs(probe, driver)
    info_check, facts["cli_info"] = cli_info(probe, found["nvidia-container-cli"])
    return checks + [version_check, config_check, cdi_check, info_check], facts


def versions_check(probe: Probe, found: dict) -> tuple[Check, dict]:
    versions = {}
    for name in ("nvidia-ctk", "nvidia-container-cli"):
        if found[name]:
            result = probe.command([found[name], "--version"])
            match = VERSION_RE.search(result.out)
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


def read_config(probe: Probe, rootless: bool) -> tuple[Check, dict]:
    text = probe.read(CONFIG)
    if text is None:
        return Check("toolkit.config", "pass", f"no {CONFIG}: defaults (mode auto, cgroups "
                                               "managed)"), {}
    try:
        mode, no_cgroups = _config_settings(tomllib.loads(text))
    except ValueError as error:  # a TOMLDecodeError too
        problem = ("is not valid TOML: " if isinstance(error, tomllib.TOMLDecodeError) else "")
        return Check("toolkit.config", "fail", f"{CONFIG}: {problem}{error}",
                     fix="regenerate it with `nvidia-ctk config default --output " + CONFIG
                         + "`"), {}
    facts = {"mode": mode, "no_cgroups": no_cgroups}
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


def cdi_specs(probe: Probe, driver: str | None) -> tuple[Check, dict]:
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
    return cdi_check(specs, broken, driver), {"specs": specs, "broken": broken}


def _read_cdi_spec(path: Path, shown: str) -> dict | None:
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
    return {"path": shown, "kind": spec["kind"], "devices": [d["name"] for d in devices],
            "driver_versions": sorted(versions)}


def cdi_check(specs: list[dict], broken: list[str], driver: str | None) -> Check:
    fix = ("`sudo nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml` (toolkit ≥ 1.18: "
           "`sudo systemctl restart nvidia-cdi-refresh.service`)")
    if broken:
        return Check("toolkit.cdi", "fail", f"unreadable CDI spec(s): {', '.join(broken)}",
                     fix=f"delete them and regenerate: {fix}")
    nvidia = [s for s in specs if s["kind"] == "nvidia.com/gpu"]
    if not nvidia:
        return Check("toolkit.cdi", "warn", "no nvidia.com/gpu CDI spec in /etc/cdi or "
                                            "/var/run/cdi: CDI injection is unavailable",
                     fix=fix)
    stale = [s for s in nvidia if driver and s["driver_versions"]
             and driver not in s["driver_versions"]]
    if stale:
        return Check("toolkit.cdi", "warn",
                     f"{stale[0]['path']} was generated for driver "
                     f"{', '.join(stale[0]['driver_versions'])}, the host runs {driver}",
                     fix=f"regenerate it: {fix}")
    names = sorted({n for s in nvidia for n in s["devices"]})
    return Check("toolkit.cdi", "pass", f"{len(nvidia)} spec(s), devices "
                                       f"{', '.join('nvidia.com/gpu=' + n for n in names)}")


def cli_info(probe: Probe, cli: str | None) -> tuple[Check, dict]:
    if not cli:
        return Check("toolkit.cli-info", "skip", "nvidia-container-cli is not installed "
                                                 "(CDI-only toolkit)"), {}
    result = probe.command([cli, "info"])
    if result.rc != 0:
        entry, matched = classify(result.err + "\n" + result.out)
        return Check("toolkit.cli-info", "fail", f"nvidia-container-cli info failed: {matched}",
                     detail=entry.cause, fix=entry.fix), {}
    nvrm = re.search(r"NVRM version:\s*(\S+)", result.out)
    cuda = re.search(r"CUDA version:\s*(\S+)", result.out)
    models = re.findall(r"^Model:\s*(.+)$", result.out, re.MULTILINE)
    brands = re.findall(r"^Brand:\s*(.+)$", result.out, re.MULTILINE)
    facts = {"nvrm": nvrm and nvrm.group(1), "cuda": cuda and cuda.group(1), "models": models,
             "brands": brands}
    return Check("toolkit.cli-info", "pass",
                 f"the toolkit sees driver {facts['nvrm']} (CUDA {facts['cuda']}) and "
                 f"{len(models)} GPU(s)"), facts
