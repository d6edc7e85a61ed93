"""Performance per device, measured and judged: dense matmul TFLOP/s, device memory bandwidth (a
copy kernel), host<->device transfer bandwidth.

Each figure is judged (a) against the device's datasheet peak (model/specs.py) with a floor:
matmul ≥ 60% of the dense peak (one H200 measured 78–81% here, random bf16 8192³; DCGM#122's
A100 at a third of its speed fails), memory ≥ 70% (the H200's copy reached ~90%), transfer ≥ 25%
of the PCIe link per direction (pageable host memory goes through the driver's staging buffers;
a slot at a lower generation or width than the card's falls below it); and (b) at the medium
and long levels against its siblings (the other devices of its kind on the host): more than
15% below their median is a warn (a fail at `long`), naming the device. Devices are timed in
turns, each keeping its best run, so a machine that drifts moves all of them alike.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from model import faults
from model.devices import label
from model.report import DeviceInfo, MatmulCheck, MemoryCheck, PerfEntry, TransferCheck
from model.specs import PCIE_GBPS, Spec, spec_for

MATMUL_FLOOR, MEMORY_FLOOR, TRANSFER_FLOOR = 0.60, 0.70, 0.25
SIBLING_FLOOR = 0.85  # of the same-kind median
# Sizes per platform: a GPU at its plateau, a CPU in about a second per device and measure.
SIZES = {"gpu": {"matmul": 8192, "chain": 10, "memory": 1 << 30, "transfer": 1 << 28},
         "cpu": {"matmul": 1024, "chain": 1, "memory": 1 << 26, "transfer": 1 << 26}}
ROUNDS = {"quick": 3, "medium": 5, "long": 5}


@dataclasses.dataclass
class Measure:
    """One measure over all devices: the figures and how to judge them."""

    name: str  # matmul | memory | transfer
    values: list[float]  # per entry
    devices: list[int]  # entries' device index
    floor_share: float
    peak: Callable[[Spec], float | None]


def best_time(run: Callable[[], object], repeat: int) -> float:
    """The fastest of `repeat` timed calls of `run` (each waits for the device)."""
    best = float("inf")
    for _ in range(repeat):
        start_s = time.perf_counter()
        jax.block_until_ready(run())
        best = min(best, time.perf_counter() - start_s)
    return best


def in_turns(runs: list[Callable[[], object]], rounds: int) -> list[float]:
    """Each run's best time, the runs taking turns for `rounds` rounds."""
    best = [float("inf")] * len(runs)
    for _ in range(rounds):
        for i, run in enumerate(runs):
            best[i] = min(best[i], best_time(run, 1))
    return best


def matmul_runs(devices: list, dtype, n: int, chain: int, fault) -> list[Callable[[], object]]:
    """Per device: `chain` dependent N×N×N products in one compiled call, random data (zeros
    run faster than real data on GPUs), at the default precision whatever the model test set
    for its float32 parity (bf16 and fp16 products are tensor-core work either way)."""
    scale = 1.0 / np.sqrt(n)

    @jax.jit
    def chained(a_NN, b_NN):
        def step(_, c_NN):
            c_NN = jnp.dot(a_NN, c_NN, precision=jax.lax.Precision.DEFAULT,
                           preferred_element_type=jnp.float32)
            return (c_NN * scale).astype(dtype)
        return jax.lax.fori_loop(0, chain, step, b_NN)

    runs = []
    for index, device in enumerate(devices):
        a_NN, b_NN = (jax.device_put(jax.random.normal(jax.random.key(i), (n, n), dtype), device)
                      for i in (1, 2))
        times = faults.slowdown(fault, index)
        runs.append(lambda a=a_NN, b=b_NN, k=times: [chained(a, b) for _ in range(k)][-1])
    return runs


def memory_runs(devices: list, size_bytes: int, fault) -> list[Callable[[], object]]:
    copy = jax.jit(lambda x: x + 1.0)
    runs = []
    for index, device in enumerate(devices):
        x = jax.device_put(jnp.zeros(size_bytes // 4, jnp.float32), device)
        times = faults.slowdown(fault, index)
        runs.append(lambda x=x, k=times: [copy(x) for _ in range(k)][-1])
    return runs


def transfer_runs(devices: list, size_bytes: int, fault) -> list[Callable[[], object]]:
    """Per device, host->device then device->host: `device_put` of a host array, and
    `device_get` of a fresh device array (a fetched array caches its host copy)."""
    host = np.ones(size_bytes // 4, np.float32)
    runs = []
    for index, device in enumerate(devices):
        times = faults.slowdown(fault, index)
        resident = jax.device_put(host, device)
        fresh = jax.jit(lambda x: x * 1.0)
        runs.append(lambda d=device, k=times: [jax.device_put(host, d) for _ in range(k)][-1])
        runs.append(_fetch(fresh, resident, times))
    return runs


def _fetch(fresh, resident, times: int) -> Callable[[], object]:
    """A d2h run that times only its copies. A CPU device's array is host memory already and
    `device_get` hands out a view of it: there the bytes are copied into a buffer of their own,
    or the figure would time nothing."""
    copy = resident.devices().pop().platform == "cpu"

    def run():
        arrays = [jax.block_until_ready(fresh(resident)) for _ in range(times)]
        start_s = time.perf_counter()
        for array in arrays:
            host = jax.device_get(array)
            if copy:
                np.array(host, copy=True)
        return time.perf_counter() - start_s
    return run


def measure(infos: list[DeviceInfo], level: str, fault) -> list[Measure]:
    """The measures of `level` on every device (quick: matmul only)."""
    devices, platform = jax.devices(), infos[0].platform
    sizes = SIZES["gpu" if platform == "gpu" else "cpu"]
    rounds = ROUNDS[level]
    dtype = matmul_dtype(infos)
    n, chain = sizes["matmul"], sizes["chain"]
    flop = 2.0 * n**3 * chain
    matmul_s = in_turns(matmul_runs(devices, dtype, n, chain, fault), rounds)
    measures = [Measure("matmul", [flop / t / 1e12 for t in matmul_s], list(range(len(devices))),
                        MATMUL_FLOOR, lambda s: s.matmul_tflops)]
    if level == "quick":
        return measures
    memory_s = in_turns(memory_runs(devices, sizes["memory"], fault), rounds)
    measures.append(Measure("memory", [2 * sizes["memory"] / t / 1e9 for t in memory_s],
                            list(range(len(devices))), MEMORY_FLOOR, lambda s: s.memory_gbps))
    transfer_s = transfer_times(transfer_runs(devices, sizes["transfer"], fault), rounds)
    measures.append(Measure("transfer", [sizes["transfer"] / t / 1e9 for t in transfer_s],
                            [i for i in range(len(devices)) for _ in (0, 1)], TRANSFER_FLOOR,
                            lambda s: PCIE_GBPS[s.pcie_gen]))
    return measures


def transfer_times(runs: list[Callable[[], object]], rounds: int) -> list[float]:
    """h2d runs are timed whole; d2h runs time their own copy (their compute is excluded)."""
    best = [float("inf")] * len(runs)
    for _ in range(rounds):
        for i, run in enumerate(runs):
            if i % 2:
                best[i] = min(best[i], run())
            else:
                best[i] = min(best[i], best_time(run, 1))
    return best


def matmul_dtype(infos: list[DeviceInfo]):
    """bf16, or fp16 where the (first known) GPU kind has no bf16 tensor cores."""
    for info in infos:
        spec, _ = spec_for(info.kind)
        if spec is not None:
            return jnp.dtype(spec.matmul_dtype)
    return jnp.dtype(jnp.bfloat16)


UNITS = {"matmul": "TFLOP/s", "memory": "GB/s", "transfer": "GB/s"}
WHAT = {"matmul": "dense matmul", "memory": "memory bandwidth (copy)",
        "transfer": "host<->device transfer"}
FIXES = {"matmul": "a device below its datasheet or its siblings: check clocks and throttling "
                   "(`nvidia-smi -q -d PERFORMANCE,CLOCK`), power limits and cooling, then "
                   "rerun at --level long",
         "memory": "check ECC/remapped rows (`nvidia-smi -q -d ECC,ROW_REMAPPER`) and memory "
                   "clocks; a device far below its siblings is a candidate for RMA",
         "transfer": "check the PCIe link (`nvidia-smi -q -d PCI`: current generation and width "
                     "against max), the slot and riser, and the NUMA placement of the process"}


def judge(measure: Measure, infos: list[DeviceInfo], level: str,
          directions: list[str] | None = None) -> list[PerfEntry]:
    """Each entry against its datasheet floor and (medium, long) its same-kind siblings."""
    groups: dict[tuple, list[float]] = {}
    for i, device in enumerate(measure.devices):
        key = (infos[device].kind, directions[i] if directions else None)
        groups.setdefault(key, []).append(measure.values[i])
    entries = []
    for i, device in enumerate(measure.devices):
        kind = infos[device].kind
        siblings = list(groups[(kind, directions[i] if directions else None)])
        siblings.remove(measure.values[i])  # the others of its kind, not itself
        median = statistics.median(siblings) if level != "quick" and siblings else None
        entries.append(judge_entry(measure, i, spec_for(kind), median, level, bool(siblings)))
    return entries


def judge_entry(measure: Measure, i: int, known: tuple[Spec | None, str | None],
                median: float | None, level: str, siblings: bool = True) -> PerfEntry:
    spec, why = known
    value = measure.values[i]
    peak = measure.peak(spec) if spec else None
    if spec and peak is None:
        why = f"no datasheet {measure.name} figure for the {spec.name}: siblings only"
    floor = peak * measure.floor_share if peak else None
    status, said = "pass", why
    if floor is not None and value < floor:
        status, said = "fail", (f"{value / peak:.0%} of the {spec.name}'s datasheet "
                                f"{peak:g} {UNITS[measure.name]} (floor "
                                f"{measure.floor_share:.0%})")
    elif median is not None and value < SIBLING_FLOOR * median:
        status = "fail" if level == "long" else "warn"
        said = (f"{value / median:.0%} of its siblings' median {median:.3g} "
                f"{UNITS[measure.name]} (floor {SIBLING_FLOOR:.0%})")
    elif floor is None and median is None:
        status = "skip"
        said = (why or "") + ("; siblings are compared at --level medium" if siblings else
                              ", and it has none: a figure, not judged")
    return PerfEntry(device=measure.devices[i], value=round(value, 4), status=status,
                     peak=peak, floor=round(floor, 4) if floor else None,
                     median=round(median, 4) if median else None, said=said)


def perf_check(measure: Measure, infos: list[DeviceInfo], level: str, *, dtype: str = "",
               size: int = 0):
    """perf.matmul / perf.memory / perf.transfer over every device."""
    directions = ["h2d", "d2h"] * len(infos) if measure.name == "transfer" else None
    entries = judge(measure, infos, level, directions)
    order = {"skip": 0, "pass": 1, "warn": 2, "fail": 3}
    status = max((e.status for e in entries), key=order.__getitem__)
    unit = UNITS[measure.name]
    bad = [e for e in entries if e.status in ("warn", "fail")]
    if bad:
        summary = "; ".join(f"{label(infos[e.device])}"
                            f"{' ' + directions[entries.index(e)] if directions else ''}: "
                            f"{e.value:.3g} {unit}, {e.said}" for e in bad)
    else:
        low, high = min(measure.values), max(measure.values)
        judged = {"pass": "within the floors", "skip": entries[0].said}[status]
        spread = f"{low:.3g}" if f"{low:.3g}" == f"{high:.3g}" else f"{low:.3g}–{high:.3g}"
        where = "1 device" if len(infos) == 1 else f"{len(infos)} devices"
        summary = f"{WHAT[measure.name]} on {where}: {spread} {unit} ({judged})"
    common = {"status": status, "summary": summary, "unit": unit, "entries": entries,
              "fix": FIXES[measure.name] if bad else None}
    if measure.name == "matmul":
        return MatmulCheck(**common, dtype=dtype, size=size)
    if measure.name == "memory":
        return MemoryCheck(**common, size_bytes=size)
    return TransferCheck(**common, size_bytes=size, directions=directions)


def perf_checks(infos: list[DeviceInfo], level: str, fault) -> list:
    """The level's perf.* checks, measured on every device and judged."""
    sizes = SIZES["gpu" if infos[0].platform == "gpu" else "cpu"]
    dtype = matmul_dtype(infos).name
    checks = []
    for m in measure(infos, level, fault):
        size = {"matmul": sizes["matmul"], "memory": sizes["memory"],
                "transfer": sizes["transfer"]}[m.name]
        checks.append(perf_check(m, infos, level, dtype=dtype, size=size))
    return checks
