"""The gpu-smoke report (`envcheck.smoke/v1`): one typed definition that the chain writes, the
renderer reads, `--json` prints, and `envcheck fleet` reads back from every node (validated,
naming the bad path: a node may run another envcheck version)."""

from __future__ import annotations

from typing import Literal

import msgspec
from msgspec import UNSET, UnsetType

from envcheck.host.daemon import DockerFacts
from envcheck.host.nvml import GpuFacts
from envcheck.host.toolkit import ToolkitFacts
from envcheck.report import Check
from model.report import DeviceFacts, DeviceRun, ImplResult, Level

SCHEMA = "envcheck.smoke/v1"
Verdict = Literal["gpu", "cpu-fallback", "fail"]
# Where the model test ran: on this host, in the container with or without the GPU, or not at all.
Mode = Literal["host", "container-gpu", "container-cpu", "none"]


class NodeFacts(msgspec.Struct, kw_only=True):
    name: str  # Slurm's node name when run as a Slurm task, else the host name
    cuda_visible_devices: str | None  # the GPUs a scheduler gave this run


class PciGpu(msgspec.Struct, kw_only=True):
    bus_id: str
    device_id: str


class HostFacts(msgspec.Struct, kw_only=True):
    """The driver as the kernel shows it (host/driver.py) and the GPUs as NVML lists them."""

    pci_gpus: list[PciGpu]
    wsl: bool
    module_loaded: bool
    nouveau: bool
    driver: str | None
    kernel_module: str | None  # open | proprietary
    driver_cuda: str | None
    device_nodes: list[str]
    gpus: list[GpuFacts]
    nvml_via: str | None


class ImageFacts(msgspec.Struct, kw_only=True):
    name: str
    id: str | None
    user: str
    env: dict[str, str]  # NVIDIA_*, CUDA_*, NV_CUDNN*, JAX_*, XLA_*; secrets redacted


class PerfFigure(msgspec.Struct, kw_only=True):
    """One measured figure of the model test's perf and interconnect checks (for --metrics)."""

    measure: Literal["matmul_tflops", "memory_gbps", "transfer_gbps", "allreduce_busbw_gbps"]
    value: float
    device: int | None = None  # index in the model report's devices; None: over all of them
    uuid: str | None = None
    kind: str | None = None
    direction: Literal["h2d", "d2h"] | None = None


class ModelFacts(msgspec.Struct, kw_only=True):
    """What gpu-smoke keeps of the model test's report (model/report.py)."""

    impl: str
    impl_used: str
    attention: list[ImplResult]
    max_abs_diff: float | None
    tolerance: float | None
    generate_tokens_per_s: float | None
    timings_s: dict[str, float]
    devices: list[DeviceRun] = []  # the model checks per device
    performance: list[PerfFigure] = []  # the perf.* and all-reduce figures, per device


class FirstFailed(msgspec.Struct, kw_only=True):
    id: str
    summary: str


class Leftover(msgspec.Struct, kw_only=True):
    name: str
    owner_pid: int


class SmokeReport(msgspec.Struct, kw_only=True):
    schema: Literal["envcheck.smoke/v1"] = SCHEMA
    verdict: Verdict
    level: Level = "quick"
    checks: list[Check]
    node: NodeFacts
    mode: Mode
    host: HostFacts
    toolkit: ToolkitFacts
    docker: DockerFacts | UnsetType = UNSET  # when the daemon answered
    leftovers_removed: list[Leftover] | UnsetType = UNSET  # only when there were some
    image: ImageFacts | UnsetType = UNSET  # when the image is in the engine
    container_seconds: float | UnsetType = UNSET  # when the model test ran in a container
    # Why the container path was not tested (--build-missing: no image, and none can be built).
    container_untested: str | UnsetType = UNSET
    device: DeviceFacts | UnsetType = UNSET  # when the model test gave a report
    model: ModelFacts | None
    first_failed: FirstFailed | None
    timings_s: dict[str, float]  # wall time of each stage, and the total

    def to_json(self) -> dict:
        return msgspec.to_builtins(self)
