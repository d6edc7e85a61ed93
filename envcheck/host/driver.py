"""Link 1a of the chain: an NVIDIA GPU on the PCI bus, its kernel module, the driver version in
/proc/driver/nvidia/version, and the device nodes (/dev/nvidiactl, /dev/nvidia-uvm, /dev/nvidiaN).
Plain file reads under the probe root; WSL2 (/dev/dxg, driver in Windows) is told apart.
"""

from __future__ import annotations

import dataclasses
import re

from envcheck.host import Probe
from envcheck.nvidia.catalog import CATALOG_BY_ID
from envcheck.nvidia.cuda import cuda_for_driver, version_text, version_tuple
from envcheck.nvidia.driver import VERSION_FILE, parse_driver_version
from envcheck.report import Check

NVIDIA_VENDOR = "0x10de"
GPU_CLASSES = ("0x0300", "0x0302")  # VGA controller, 3D controller
GPU_NODE_RE = re.compile(r"^nvidia\d+$")


@dataclasses.dataclass
class DriverFacts:
    pci_gpus: list[dict] = dataclasses.field(default_factory=list)
    wsl: bool = False
    module_loaded: bool = False
    nouveau: bool = False
    driver: str | None = None
    kernel_module: str | None = None  # "open" or "proprietary"
    driver_cuda: str | None = None
    device_nodes: list[str] = dataclasses.field(default_factory=list)


def pci_gpus(probe: Probe) -> list[dict]:
    devices = probe.path("/sys/bus/pci/devices")
    found = []
    for device in sorted(devices.iterdir()) if devices.is_dir() else []:
        vendor, klass = _first_line(device / "vendor"), _first_line(device / "class")
        if vendor == NVIDIA_VENDOR and klass[:6] in GPU_CLASSES:
            found.append({"bus_id": device.name, "device_id": _first_line(device / "device")})
    return found


def _first_line(path) -> str:
    try:
        return path.read_text().strip().lower()
    except OSError:
        return ""


def loaded_modules(probe: Probe) -> set[str]:
    text = probe.read("/proc/modules") or ""
    return {line.split()[0] for line in text.splitlines() if line.strip()}


def probe_driver(probe: Probe) -> tuple[list[Check], DriverFacts]:
    facts = DriverFacts(pci_gpus=pci_gpus(probe), wsl=probe.path("/dev/dxg").exists())
    modules = loaded_modules(probe)
    facts.nouveau = "nouveau" in modules
    version_file = probe.read(VERSION_FILE)
    facts.module_loaded = "nvidia" in modules or version_file is not None
    if version_file:
        facts.driver, facts.kernel_module = parse_driver_version(version_file)
        cuda = cuda_for_driver(version_tuple(facts.driver)) if facts.driver else None
        facts.driver_cuda = version_text(cuda) if cuda else None
    dev = probe.path("/dev")
    facts.device_nodes = sorted(p.name for p in dev.iterdir()
                                if p.name.startswith("nvidia")) if dev.is_dir() else []
    checks = [gpu_check(facts), module_check(facts), driver_check(facts, version_file)]
    checks += device_checks(facts)
    return checks, facts


def gpu_check(facts: DriverFacts) -> Check:
    if facts.pci_gpus:
        ids = ", ".join(f"{g['bus_id']} ({g['device_id']})" for g in facts.pci_gpus)
        return Check("host.gpu", "pass", f"{len(facts.pci_gpus)} NVIDIA GPU(s) on the PCI bus: "
                                         f"{ids}")
    if facts.wsl:
        return Check("host.gpu", "pass", "WSL2: the GPU is reached through /dev/dxg (the "
                                         "driver lives in Windows)")
    return Check("host.gpu", "fail", "no NVIDIA GPU on the PCI bus (/sys/bus/pci/devices)",
                 fix="run on a machine with an NVIDIA GPU (a GPU instance type in the cloud; "
                     "in a VM, pass the GPU through with vfio)")


def module_check(facts: DriverFacts) -> Check:
    if facts.wsl and not facts.pci_gpus:
        return Check("host.kernel-module", "skip", "WSL2: no Linux kernel module (the driver "
                                                   "lives in Windows)")
    if not facts.pci_gpus:
        return Check("host.kernel-module", "skip", "no NVIDIA GPU (host.gpu)")
    if facts.module_loaded:
        return Check("host.kernel-module", "pass", "the nvidia kernel module is loaded")
    entry = CATALOG_BY_ID["host.kernel-module"]
    why = "nouveau is bound to the GPU" if facts.nouveau else entry.cause
    return Check("host.kernel-module", "fail", f"the nvidia kernel module is not loaded: {why}",
                 fix=("blacklist nouveau (/etc/modprobe.d/blacklist-nouveau.conf), update the "
                      "initramfs and reboot; " if facts.nouveau else "") + entry.fix)


def driver_check(facts: DriverFacts, version_file: str | None) -> Check:
    if facts.wsl and not facts.pci_gpus:
        return Check("host.driver", "skip", "WSL2: no /proc/driver/nvidia (nvidia-smi reports "
                                            "the Windows driver)")
    if not facts.module_loaded:
        return Check("host.driver", "skip", "the nvidia kernel module is not loaded "
                                            "(host.kernel-module)")
    if facts.driver is None:
        return Check("host.driver", "fail", "/proc/driver/nvidia/version is missing or "
                                            "unreadable", detail=(version_file or "")[:200],
                     fix="reload the driver (`modprobe nvidia`) or reinstall it")
    cuda = f"supports CUDA ≤ {facts.driver_cuda}" if facts.driver_cuda else (
        "older than every CUDA 11+ toolkit")
    return Check("host.driver", "pass",
                 f"driver {facts.driver} ({facts.kernel_module} kernel module), {cuda}")


def device_checks(facts: DriverFacts) -> list[Check]:
    if facts.wsl and not facts.pci_gpus:
        return [Check("host.devices", "pass", "WSL2: /dev/dxg present"),
                Check("host.uvm", "skip", "WSL2: no /dev/nvidia-uvm (CUDA goes through /dev/dxg)")]
    if not facts.module_loaded:
        reason = "no NVIDIA GPU (host.gpu)" if not facts.pci_gpus else (
            "the nvidia kernel module is not loaded (host.kernel-module)")
        return [Check("host.devices", "skip", reason), Check("host.uvm", "skip", reason)]
    gpu_nodes = [n for n in facts.device_nodes if GPU_NODE_RE.match(n)]
    missing = [n for n in ("nvidiactl",) if n not in facts.device_nodes]
    missing += [] if gpu_nodes else ["nvidia0"]
    if missing:
        devices = Check("host.devices", "fail", f"missing device nodes: "
                                                f"{', '.join('/dev/' + n for n in missing)}",
                        fix="run `nvidia-modprobe -c=0` (or `nvidia-smi` once as root, or "
                            "`nvidia-ctk system create-device-nodes --control-devices`)")
    else:
        short = len(gpu_nodes) < len(facts.pci_gpus)
        devices = Check("host.devices", "warn" if short else "pass",
                        f"/dev/nvidiactl and {len(gpu_nodes)} GPU node(s) for "
                        f"{len(facts.pci_gpus)} GPU(s)",
                        fix="run `nvidia-modprobe -c=N` for each GPU index" if short else None)
    if "nvidia-uvm" in facts.device_nodes:
        return [devices, Check("host.uvm", "pass", "/dev/nvidia-uvm present")]
    entry = CATALOG_BY_ID["host.uvm"]
    return [devices, Check("host.uvm", "fail", f"/dev/nvidia-uvm is missing: {entry.cause}",
                           fix=entry.fix)]
