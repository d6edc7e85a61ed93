"""Link 1b: NVML reachable (nvidia-ml-py when installed, else `nvidia-smi --query-gpu` with a
timeout), driver/library consistency, and health facts per GPU (ECC, retired pages / remapped
rows, throttle reasons, persistence and MIG mode, PCIe link).

Rows are dicts keyed by nvidia-smi's query field names, whichever way they were read, so the
recorded `nvidia-smi --query-gpu=... --format=csv` outputs of real GPUs drive the same code.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import msgspec

from envcheck.host import Probe
from envcheck.host.driver import DriverFacts
from envcheck.nvidia.catalog import CATALOG_BY_ID, classify
from envcheck.report import Check

FIELDS = ("index", "name", "uuid", "pci.bus_id", "driver_version", "compute_cap",
          "memory.total", "persistence_mode", "mig.mode.current", "ecc.mode.current",
          "ecc.errors.uncorrected.volatile.total", "retired_pages.pending",
          "remapped_rows.pending", "remapped_rows.failure", "clocks_event_reasons.active",
          "pcie.link.gen.current", "pcie.link.gen.max", "pcie.link.width.current",
          "pcie.link.width.max")
BASIC_FIELDS = FIELDS[:7]  # every driver since R450 knows these
# nvmlClocksEventReasons bits that mean the GPU is slowed against its will.
SLOWDOWN_BITS = {0x8: "HW slowdown", 0x20: "SW thermal slowdown", 0x40: "HW thermal slowdown",
                 0x80: "HW power brake"}
MISMATCH_RE = re.compile(r"NVML library version:\s*(\d+\.\d+(?:\.\d+)?)")
CUDA_VERSION_RE = re.compile(r"CUDA Version\s*:\s*(\d+\.\d+)")


class GpuFacts(msgspec.Struct, kw_only=True):
    """One GPU as NVML (or nvidia-smi) lists it."""

    index: str | None
    name: str | None
    uuid: str | None
    bus_id: str | None
    compute_cap: str | None
    memory: str | None
    persistence_mode: str | None
    mig_mode: str | None


class NvmlFacts(msgspec.Struct, kw_only=True):
    gpus: list[GpuFacts] = []
    nvml_via: str | None = None  # nvidia-ml-py or nvidia-smi
    driver_cuda: str | None = None  # the CUDA version nvidia-smi states for the driver


def parse_query_csv(text: str) -> list[dict[str, str]]:
    """`--format=csv` output -> one dict per GPU; units dropped from header names."""
    try:
        rows = list(csv.reader(text.strip().splitlines(), skipinitialspace=True))
    except csv.Error:  # a NUL byte or a broken quote: not nvidia-smi's CSV
        return []
    if len(rows) < 2:
        return []
    header = [re.sub(r"\s*\[.*\]$", "", name.strip()) for name in rows[0]]
    return [dict(zip(header, (v.strip() for v in row), strict=False)) for row in rows[1:] if row]


def query_nvidia_smi(probe: Probe) -> tuple[list[dict[str, str]] | None, str]:
    """(rows, "") or (None, the error text). Retries with the basic fields on drivers that
    reject newer field names."""
    text = ""
    for fields in (FIELDS, BASIC_FIELDS):
        result = probe.command(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv"])
        text = (result.out + "\n" + result.err).strip()
        if result.rc == 0:
            return parse_query_csv(result.out), ""
        if "is not a valid field" not in text:
            break
    return None, text or f"nvidia-smi exited with {result.rc}"


def query_nvml(probe: Probe) -> tuple[list[dict[str, str]] | None, str] | None:
    """Rows through nvidia-ml-py on the real host; None when the module is not installed (or
    the probe looks at a fixture root), so the caller falls back to nvidia-smi."""
    if probe.root != Path("/"):
        return None
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as error:
        return None, f"Failed to initialize NVML: {error}"
    try:
        return [_nvml_row(pynvml, i) for i in range(pynvml.nvmlDeviceGetCount())], ""
    except pynvml.NVMLError as error:
        return None, f"NVML: {error}"
    finally:
        pynvml.nvmlShutdown()


def _nvml_row(nvml, index: int) -> dict[str, str]:
    """One GPU as nvidia-smi query fields; fields this GPU or binding lacks read [N/A]."""
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
    row = {"index": str(index), "name": nvml.nvmlDeviceGetName(handle),
           "uuid": nvml.nvmlDeviceGetUUID(handle),
           "pci.bus_id": nvml.nvmlDeviceGetPciInfo(handle).busId,
           "driver_version": nvml.nvmlSystemGetDriverVersion(), "compute_cap": f"{major}.{minor}",
           "memory.total": f"{nvml.nvmlDeviceGetMemoryInfo(handle).total // 2**20} MiB"}
    enabled = ("Disabled", "Enabled")
    optional = {
        "persistence_mode": lambda: enabled[int(nvml.nvmlDeviceGetPersistenceMode(handle))],
        "mig.mode.current": lambda: enabled[int(nvml.nvmlDeviceGetMigMode(handle)[0])],
        "ecc.errors.uncorrected.volatile.total": lambda: str(nvml.nvmlDeviceGetTotalEccErrors(
            handle, nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nvml.NVML_VOLATILE_ECC)),
        "remapped_rows.pending": lambda: "Yes" if nvml.nvmlDeviceGetRemappedRows(handle)[2]
        else "No",
        "remapped_rows.failure": lambda: "Yes" if nvml.nvmlDeviceGetRemappedRows(handle)[3]
        else "No",
        "clocks_event_reasons.active": lambda: hex(getattr(
            nvml, "nvmlDeviceGetCurrentClocksEventReasons",
            getattr(nvml, "nvmlDeviceGetCurrentClocksThrottleReasons", None))(handle)),
        "pcie.link.gen.current": lambda: str(nvml.nvmlDeviceGetCurrPcieLinkGeneration(handle)),
        "pcie.link.gen.max": lambda: str(nvml.nvmlDeviceGetMaxPcieLinkGeneration(handle)),
        "pcie.link.width.current": lambda: str(nvml.nvmlDeviceGetCurrPcieLinkWidth(handle)),
        "pcie.link.width.max": lambda: str(nvml.nvmlDeviceGetMaxPcieLinkWidth(handle)),
    }
    for key, read in optional.items():
        try:
            row[key] = read()
        except (nvml.NVMLError, AttributeError, TypeError, IndexError):
            row[key] = "[N/A]"  # not supported on this GPU (consumer boards, no MIG, old binding)
    return row


def probe_nvml(probe: Probe, driver: DriverFacts) -> tuple[list[Check], NvmlFacts]:
    facts = NvmlFacts()
    if not driver.module_loaded and not driver.wsl:
        reason = "no NVIDIA GPU (host.gpu)" if not driver.pci_gpus else (
            "the nvidia kernel module is not loaded (host.kernel-module)")
        return [Check(i, "skip", reason) for i in ("host.driver-mismatch", "host.nvml",
                                                   "host.health")], facts
    via_nvml = query_nvml(probe)
    rows, error = via_nvml if via_nvml is not None else query_nvidia_smi(probe)
    facts.nvml_via = "nvidia-ml-py" if via_nvml is not None else "nvidia-smi"
    if not rows:  # None: an error; []: an answer that lists no GPU
        return failed_nvml_checks(error or "NVML listed no GPU", driver), facts
    facts.gpus = [gpu_facts(row) for row in rows]
    version = probe.command(["nvidia-smi", "--version"])
    cuda = CUDA_VERSION_RE.search(version.out) if version.rc == 0 else None
    facts.driver_cuda = cuda.group(1) if cuda else driver.driver_cuda
    library = rows[0].get("driver_version") if rows else None
    return [mismatch_check(driver.driver, library),
            Check("host.nvml", "pass",
                  f"NVML ({facts.nvml_via}): {len(rows)} GPU(s): "
                  + "; ".join(f"{g.name} ({g.memory}, sm {g.compute_cap})" for g in facts.gpus)),
            health_check(rows)], facts


def failed_nvml_checks(error: str, driver: DriverFacts) -> list[Check]:
    entry, matched = classify(error)
    mismatch = MISMATCH_RE.search(error)
    if entry.check_id == "host.driver-mismatch":
        library = mismatch.group(1) if mismatch else "unknown"
        return [Check("host.driver-mismatch", "fail",
                      f"NVML library {library} does not match the loaded kernel module "
                      f"{driver.driver or 'unknown'}", detail=matched, fix=entry.fix),
                Check("host.nvml", "skip", "driver/library version mismatch "
                                           "(host.driver-mismatch)"),
                Check("host.health", "skip", "NVML unreachable (host.nvml)")]
    fix = entry.fix if entry.check_id.startswith("host.") else (
        "install the driver's utilities (nvidia-utils / nvidia-smi) and check `nvidia-smi`")
    return [Check("host.driver-mismatch", "skip", "NVML unreachable (host.nvml)"),
            Check("host.nvml", "fail", f"NVML unreachable: {matched}",
                  detail=entry.cause if entry.check_id.startswith("host.") else error[:300],
                  fix=fix),
            Check("host.health", "skip", "NVML unreachable (host.nvml)")]


def mismatch_check(kernel: str | None, library: str | None) -> Check:
    if not kernel or not library:
        return Check("host.driver-mismatch", "skip",
                     "no kernel module version to compare (WSL2 or no /proc/driver/nvidia)")
    if kernel != library:
        return Check("host.driver-mismatch", "fail",
                     f"NVML reports driver {library} but the loaded kernel module is {kernel}",
                     fix=CATALOG_BY_ID["host.driver-mismatch"].fix)
    return Check("host.driver-mismatch", "pass", f"kernel module and NVML agree on {kernel}")


def gpu_facts(row: dict[str, str]) -> GpuFacts:
    return GpuFacts(index=row.get("index"), name=row.get("name"), uuid=row.get("uuid"),
                    bus_id=row.get("pci.bus_id"), compute_cap=row.get("compute_cap"),
                    memory=row.get("memory.total"), persistence_mode=row.get("persistence_mode"),
                    mig_mode=row.get("mig.mode.current"))


def gpu_problems(row: dict[str, str]) -> tuple[list[str], list[str], list[str]]:
    """(failures, warnings, notes) for one GPU."""
    failures, warnings, notes = [], [], []
    ecc = row.get("ecc.errors.uncorrected.volatile.total", "")
    if ecc.isdigit() and int(ecc) > 0:
        failures.append(f"{ecc} volatile uncorrected ECC errors")
    if row.get("retired_pages.pending") == "Yes" or row.get("remapped_rows.pending") == "Yes":
        failures.append("a page retirement / row remap is pending (reset the GPU)")
    if row.get("remapped_rows.failure") == "Yes":
        failures.append("row remapping failed (the GPU needs service)")
    reasons = _hex(row.get("clocks_event_reasons.active", ""))
    warnings += [name for bit, name in SLOWDOWN_BITS.items() if reasons & bit]
    if row.get("mig.mode.current") == "Enabled":
        warnings.append("MIG mode is on: a container needs MIG devices (MIG UUIDs or "
                        "nvidia.com/gpu=N:M), and JAX uses one MIG instance per process")
    if row.get("persistence_mode") == "Disabled":
        notes.append("persistence mode off")
    gen, gen_max = row.get("pcie.link.gen.current", ""), row.get("pcie.link.gen.max", "")
    if gen.isdigit() and gen_max.isdigit() and int(gen) < int(gen_max):
        notes.append(f"PCIe gen {gen} of {gen_max} (idle GPUs train down)")
    return failures, warnings, notes


def _hex(text: str) -> int:
    try:
        return int(text, 16)
    except ValueError:
        return 0


def health_check(rows: list[dict[str, str]]) -> Check:
    failures, warnings, notes = [], [], []
    for row in rows:
        f, w, n = gpu_problems(row)
        tag = f"GPU {row.get('index', '?')}: "
        failures += [tag + x for x in f]
        warnings += [tag + x for x in w]
        notes += [tag + x for x in n]
    if failures:
        return Check("host.health", "fail", "; ".join(failures), detail="; ".join(warnings + notes),
                     fix="drain the node and reset the GPU (`nvidia-smi -r`) or reboot; check "
                         "`dmesg` for Xid errors; run `dcgmi diag -r 2`")
    if warnings:
        return Check("host.health", "warn", "; ".join(warnings), detail="; ".join(notes),
                     fix="check cooling and power (`nvidia-smi -q -d PERFORMANCE`); for MIG, "
                         "request MIG devices or disable MIG (`nvidia-smi -mig 0`)")
    return Check("host.health", "pass", "no ECC errors, no pending retirement, no slowdown"
                 + (f" ({'; '.join(notes)})" if notes else ""))
