"""The NVML path (nvidia-ml-py) at its module seam: the same rows and checks as the recorded
nvidia-smi CSV of the same GPU, and an NVML init failure classified like nvidia-smi's."""

from __future__ import annotations

import sys
import types
from pathlib import Path

from envcheck.host import Probe
from envcheck.host.driver import DriverFacts
from envcheck.host.nvml import FIELDS, parse_query_csv, probe_nvml
from tests.gpu_host import real


class NVMLError(Exception):
    pass


def fake_pynvml(init_error: str | None = None, mig: int = 0):
    """pynvml answering like the H100 of the recorded 590.48.01 capture."""
    module = types.ModuleType("pynvml")
    module.NVMLError = NVMLError
    module.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, module.NVML_VOLATILE_ECC = 1, 0

    def init():
        if init_error:
            raise NVMLError(init_error)

    def unsupported(handle):
        raise NVMLError("Not Supported")

    answers = {
        "nvmlInit": init, "nvmlShutdown": lambda: None, "nvmlDeviceGetCount": lambda: 1,
        "nvmlDeviceGetHandleByIndex": lambda i: i,
        "nvmlDeviceGetCudaComputeCapability": lambda h: (9, 0),
        "nvmlDeviceGetName": lambda h: "NVIDIA H100 80GB HBM3",
        "nvmlDeviceGetUUID": lambda h: "GPU-00000000-0000-0000-0000-000000000000",
        "nvmlDeviceGetPciInfo": lambda h: types.SimpleNamespace(busId="00000000:00:09.0"),
        "nvmlSystemGetDriverVersion": lambda: "590.48.01",
        "nvmlDeviceGetMemoryInfo": lambda h: types.SimpleNamespace(total=81559 * 2**20),
        "nvmlDeviceGetPersistenceMode": lambda h: 1,
        "nvmlDeviceGetMigMode": lambda h: (mig, mig),
        "nvmlDeviceGetTotalEccErrors": lambda h, kind, counter: 0,
        "nvmlDeviceGetRemappedRows": lambda h: (0, 0, False, False),
        "nvmlDeviceGetCurrentClocksEventReasons": lambda h: 1,
        "nvmlDeviceGetCurrPcieLinkGeneration": lambda h: 5,
        "nvmlDeviceGetMaxPcieLinkGeneration": lambda h: 5,
        "nvmlDeviceGetCurrPcieLinkWidth": unsupported,  # [N/A], not a failure
        "nvmlDeviceGetMaxPcieLinkWidth": lambda h: 16,
    }
    for name, answer in answers.items():
        setattr(module, name, answer)
    return module


def loaded(driver: str = "590.48.01") -> DriverFacts:
    return DriverFacts(pci_gpus=[{"bus_id": "0000:00:09.0", "device_id": "0x2330"}],
                       module_loaded=True, driver=driver, driver_cuda="13.1")


def no_smi(argv, timeout_s, env=None, input_text=None):
    from envcheck.runner import RunResult
    return RunResult(127, "", "nvidia-smi: command not found")


def test_nvml_rows_match_the_recorded_csv_of_the_same_gpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml())
    checks, facts = probe_nvml(Probe(Path("/"), no_smi), loaded())
    assert facts.nvml_via == "nvidia-ml-py"
    csv_row = parse_query_csv(real("nvidia-smi-query-gpu-allfields_h100_590.csv.txt"))[0]
    expected = {k: csv_row[k] for k in ("index", "name", "uuid", "pci.bus_id", "compute_cap",
                                        "memory.total", "persistence_mode", "mig.mode.current")}
    gpu = facts.gpus[0]
    assert (gpu.index, gpu.name, gpu.uuid, gpu.bus_id, gpu.compute_cap,
            gpu.memory, gpu.persistence_mode, gpu.mig_mode) == tuple(expected.values())
    assert [c.status for c in checks] == ["pass", "pass", "pass"]
    assert facts.driver_cuda == "13.1"  # no nvidia-smi: from the driver branch table


def test_nvml_mig_mode_warns(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(mig=1))
    checks, _ = probe_nvml(Probe(Path("/"), no_smi), loaded())
    assert checks[2].id == "host.health" and checks[2].status == "warn"


def test_nvml_init_failure_is_classified(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml("Driver/library version mismatch"))
    checks, _ = probe_nvml(Probe(Path("/"), no_smi), loaded())
    assert checks[0].id == "host.driver-mismatch" and checks[0].status == "fail"
    assert "reboot" in checks[0].fix


def test_query_fields_are_real_nvidia_smi_fields():
    header = parse_query_csv(real("nvidia-smi-query-gpu-allfields_h100_590.csv.txt"))[0]
    assert set(FIELDS) <= set(header)
