"""The model test's report (`envcheck.model-smoke/v2`; v1 had no per-device results or
levels): one typed definition that `python -m model.smoke` writes and `envcheck gpu-smoke` reads
back from the container, so a field is named once. Imports nothing of envcheck (and no JAX):
envcheck reads the definition from here.

Also the two helpers every envcheck report uses to cross a process boundary: `to_json` and
`from_json`, which validates while it decodes and names the bad path
(`checks[1].max_abs_diff: expected a number, got null`).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from msgspec import UNSET, UnsetType

SCHEMA = "envcheck.model-smoke/v2"
Status = Literal["pass", "warn", "fail", "skip"]
Level = Literal["quick", "medium", "long"]
LEVELS = ("quick", "medium", "long")
CHECK_IDS = ("model.load", "model.parity", "model.generate", "model.attention")
# by level, on top of CHECK_IDS (container.nccl only in a container)
LEVEL_CHECK_IDS = {"quick": ("perf.matmul", "interconnect.allreduce"),
                   "medium": ("perf.matmul", "perf.memory", "perf.transfer",
                              "interconnect.allreduce"),
                   "long": ("perf.matmul", "perf.memory", "perf.transfer",
                            "interconnect.allreduce", "perf.burn-in")}
ALL_CHECK_IDS = (*CHECK_IDS, *LEVEL_CHECK_IDS["long"], "container.nccl")
T = TypeVar("T")
_TYPE_WORDS = {"float": "a number", "int": "an integer", "str": "a string", "bool": "a boolean",
               "null": "null", "array": "an array", "object": "an object"}
_TYPES_RE = re.compile(r"`([a-z]+(?: \| [a-z]+)*)`")
_PATH_RE = re.compile(r"^(.*) - at `\$(.*)`$", re.DOTALL)
_MISSING_RE = re.compile(r"^Object missing required field `([^`]+)`$")


class ReportError(ValueError):
    """A report that is not of the shape its definition says; the message names the path."""


def from_json(kind: type[T], data: bytes | str | dict | list) -> T:
    """A `kind` from JSON text or from already-parsed JSON, validated on the way in."""
    try:
        if isinstance(data, bytes | str):
            return msgspec.json.decode(data, type=kind)
        return msgspec.convert(data, kind)
    except msgspec.ValidationError as error:
        if isinstance(data, bytes | str):
            data = msgspec.json.decode(data)
        raise ReportError(_said(str(error), kind, data)) from None
    except msgspec.DecodeError as error:
        raise ReportError(f"not JSON: {error}") from None


def _said(message: str, kind: type, data) -> str:
    """msgspec's 'Expected `float`, got `null` - at `$.checks[1].max_abs_diff`' as
    'checks[1].max_abs_diff: expected a number, got null'; a missing field as
    'device.jax: missing'; a map's value by its key ('timings_s.load: ...')."""
    match = _PATH_RE.match(message)
    what, path = (match.group(1), match.group(2).lstrip(".")) if match else (message, "")
    missing = _MISSING_RE.match(what)
    if missing:
        path, what = ".".join(filter(None, (path, missing.group(1)))), "missing"
    if "[...]" in path:
        path = path.replace("[...]", f".{_bad_key(kind, data, path)}", 1)
    what = _TYPES_RE.sub(lambda m: " or ".join(_TYPE_WORDS.get(t, t) for t in
                                               m.group(1).split(" | ")), what)
    what = what[:1].lower() + what[1:]
    return f"{path}: {what}" if path else what


def _bad_key(kind: type, data, path: str) -> str:
    """The key of the map at the first `[...]` of `path` whose value `kind` refuses (msgspec
    names a map's values by `[...]` only): the map cut to one entry at a time until it fails."""
    steps = [name or int(index) for name, index in
             re.findall(r"(?:^|\.)(\w+)|\[(\d+)\]", path[:path.index("[...]")])]

    def at(document):
        for step in steps:
            document = document[step]
        return document

    try:
        for key, value in at(data).items():
            trial = msgspec.json.decode(msgspec.json.encode(data))
            at(trial).clear()
            at(trial)[key] = value
            try:
                msgspec.convert(trial, kind)
            except msgspec.ValidationError as error:
                if "[...]" in str(error):
                    return key
    except (KeyError, IndexError, TypeError, AttributeError):
        pass
    return "[...]"


def to_json(report: Any) -> dict:
    """The report as plain JSON values (fields left UNSET are left out)."""
    return msgspec.to_builtins(report)


class CheckBase(msgspec.Struct, kw_only=True):
    status: Status
    summary: Annotated[str, msgspec.Meta(min_length=1)]
    fix: str | None = None

    @property
    def id(self) -> str:
        """The check's stable id (the tag that tells the kinds apart in JSON)."""
        return self.__struct_config__.tag


class LoadCheck(CheckBase, kw_only=True, tag_field="id", tag="model.load"):
    """The checkpoint loaded (a failure's summary is the checkpoint's error)."""


class ParityCheck(CheckBase, kw_only=True, tag_field="id", tag="model.parity"):
    max_abs_diff: float | None  # None: not run (the checkpoint did not load)
    tolerance: float


class GenerateCheck(CheckBase, kw_only=True, tag_field="id", tag="model.generate"):
    tokens_per_s: float | None  # None: not run


class ImplResult(msgspec.Struct, kw_only=True):
    """One attention implementation in one dtype: its logits against the reference's."""

    impl: str
    dtype: str
    status: Literal["pass", "fail", "unavailable"]
    max_abs_diff: float | UnsetType = UNSET
    tolerance: float | UnsetType = UNSET
    reason: str | UnsetType = UNSET  # why it is unavailable here


class AttentionCheck(CheckBase, kw_only=True, tag_field="id", tag="model.attention"):
    implementations: list[ImplResult]


class PerfEntry(msgspec.Struct, kw_only=True):
    """One device's figure for one measure, and how it was judged."""

    device: int  # index in the report's devices
    value: float  # in the check's unit
    status: Status
    peak: float | None = None  # the datasheet's, in the same unit
    floor: float | None = None  # the least that passes (a share of peak, or of the median)
    median: float | None = None  # of the same-kind siblings (medium and long levels)
    said: str | None = None  # why it is judged as it is (a device's problem, or no datasheet)


class PerfBase(CheckBase, kw_only=True):
    unit: str
    entries: list[PerfEntry]


class MatmulCheck(PerfBase, kw_only=True, tag_field="id", tag="perf.matmul"):
    """Dense matmul rate per device (bf16; fp16 where the GPU has no bf16 tensor cores)."""

    dtype: str
    size: int  # N of the N×N×N product


class MemoryCheck(PerfBase, kw_only=True, tag_field="id", tag="perf.memory"):
    """Device memory bandwidth per device: a copy kernel, bytes read + written."""

    size_bytes: int


class TransferCheck(PerfBase, kw_only=True, tag_field="id", tag="perf.transfer"):
    """Host->device and device->host bandwidth per device (entries: h2d then d2h per device)."""

    size_bytes: int
    directions: list[Literal["h2d", "d2h"]]  # entries[i]'s direction


class SweepPoint(msgspec.Struct, kw_only=True):
    size_bytes: int  # per device
    time_s: float
    algbw_gbps: float
    busbw_gbps: float  # algbw × 2(n−1)/n, as nccl-tests computes it


class AllReduceCheck(CheckBase, kw_only=True, tag_field="id", tag="interconnect.allreduce"):
    devices: int
    exact: bool | None  # every device holds the exact sum (None: not run)
    sweep: list[SweepPoint] = []
    link: str | None = None  # what the busbw is judged against
    expected_gbps: float | None = None


class BurnInCheck(CheckBase, kw_only=True, tag_field="id", tag="perf.burn-in"):
    duration_s: float
    iterations: dict[str, int]  # device index -> matmuls checked
    mismatches: list[str] = []  # "device 2, iteration 17: checksum … ≠ golden …"


class NcclCheck(CheckBase, kw_only=True, tag_field="id", tag="container.nccl"):
    shm_bytes: int | None  # /dev/shm's size (None: no /dev/shm)
    memlock_bytes: int | None  # RLIMIT_MEMLOCK (None: unlimited)
    ipc_namespace: str | None
    infiniband: list[str] = []  # RDMA devices visible (/sys/class/infiniband)


ModelCheck = (LoadCheck | ParityCheck | GenerateCheck | AttentionCheck | MatmulCheck
              | MemoryCheck | TransferCheck | AllReduceCheck | BurnInCheck | NcclCheck)
DeviceCheck = ParityCheck | GenerateCheck | AttentionCheck


class DeviceInfo(msgspec.Struct, kw_only=True):
    """One device as JAX (and, on an NVIDIA GPU, the CUDA driver) names it."""

    index: int  # position in jax.devices()
    id: int  # JAX's device id
    platform: str
    kind: str
    uuid: str | None = None
    pci_bus_id: str | None = None


class DeviceRun(msgspec.Struct, kw_only=True):
    """The model checks placed on one device."""

    device: DeviceInfo
    ok: bool
    checks: list[DeviceCheck]
    timings_s: dict[str, float]


class DeviceFacts(msgspec.Struct, kw_only=True):
    backend: str
    device_kind: str
    device_count: int
    jax: str
    python: str | UnsetType = UNSET
    machine: str | UnsetType = UNSET
    packages: dict[str, str] = {}  # jaxlib, the CUDA plugin and the NVIDIA wheels installed
    cuda_libraries: dict[str, int] = {}  # versions the loaded CUDA plugin reports
    mapped_libraries: list[str] = []  # CUDA library files the process mapped (on a GPU)


class ModelReport(msgspec.Struct, kw_only=True):
    schema: Literal["envcheck.model-smoke/v2"] = SCHEMA
    ok: bool
    level: Level = "quick"
    impl: str
    impl_used: str
    checkpoint: str
    device: DeviceFacts
    devices: list[DeviceRun] = []  # per device (empty when the checkpoint did not load)
    checks: list[ModelCheck]  # over all devices: each names the devices that failed it
    timings_s: dict[str, float]

    def __post_init__(self) -> None:
        ids = [check.id for check in self.checks]
        if not set(CHECK_IDS) <= set(ids) or len(set(ids)) != len(ids):
            raise ValueError(f"checks are {', '.join(ids) or 'none'}, not "
                             f"{', '.join(CHECK_IDS)} and each once")

    def check(self, kind: type[T]) -> T:
        """The one check of this type."""
        return next(check for check in self.checks if isinstance(check, kind))

