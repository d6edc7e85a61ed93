"""interconnect.allreduce: an all-reduce over every local device (psum under shard_map; NCCL on
GPUs), checked for the exact sum on known values and timed over a size sweep at the medium and
long levels. Bus bandwidth as nccl-tests computes it for all-reduce: busbw = algbw × 2(n−1)/n,
algbw = bytes per device / time. Judged against what the link should give (model/links.py:
NVML's active NVLinks or PCIe generation × width where this process can read NVML, else the
datasheet's NVLink or PCIe x16): busbw ≥ 40% of it. Uncalibrated on hardware so far (see
docs/benchmarks.md); on CPU devices there is no link to judge against.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from model import links
from model.report import AllReduceCheck, DeviceInfo, SweepPoint
from model.specs import spec_for

LINK_FLOOR = 0.40
CHECK_BYTES = 1 << 20  # per device, the exactness check at every level
SWEEP_BYTES = {"gpu": (1 << 20, 1 << 24, 1 << 27, 1 << 29), "cpu": (1 << 16, 1 << 20, 1 << 23)}
REPEATS = 5


def allreduce(devices: list):
    """A compiled all-reduce over `devices`: [n, m] sharded by row in, the sum of rows on every
    device out."""
    mesh = Mesh(np.array(devices), ("d",))
    sharding = NamedSharding(mesh, PartitionSpec("d"))

    @jax.jit
    def reduce(x_NM):
        return jax.shard_map(lambda x: jax.lax.psum(x, "d"), mesh=mesh,
                             in_specs=PartitionSpec("d"), out_specs=PartitionSpec("d"))(x_NM)

    return reduce, sharding


def known_rows(n: int, m: int):
    """Row i holds (i + 1) + (j mod 8): every sum is an integer below 2^24, exact in float32."""
    return (jnp.arange(1, n + 1, dtype=jnp.float32)[:, None]
            + (jnp.arange(m) % 8).astype(jnp.float32)[None, :])


def exact(devices: list) -> bool:
    n, m = len(devices), CHECK_BYTES // 4
    reduce, sharding = allreduce(devices)
    out = reduce(jax.device_put(known_rows(n, m), sharding))
    expected_M = n * (n + 1) / 2 + n * (np.arange(m) % 8)
    return all(np.array_equal(np.asarray(shard.data)[0], expected_M)
               for shard in out.addressable_shards)


def sweep(devices: list, sizes: tuple[int, ...]) -> list[SweepPoint]:
    n = len(devices)
    reduce, sharding = allreduce(devices)
    points = []
    for size in sizes:
        x = jax.device_put(jnp.ones((n, size // 4), jnp.float32), sharding)
        jax.block_until_ready(reduce(x))
        best_s = float("inf")
        for _ in range(REPEATS):
            start_s = time.perf_counter()
            jax.block_until_ready(reduce(x))
            best_s = min(best_s, time.perf_counter() - start_s)
        algbw = size / best_s / 1e9
        points.append(SweepPoint(size_bytes=size, time_s=round(best_s, 6),
                                 algbw_gbps=round(algbw, 3),
                                 busbw_gbps=round(algbw * 2 * (n - 1) / n, 3)))
    return points


def expected_link(infos: list[DeviceInfo]) -> tuple[str | None, float | None]:
    """What the link should give: NVML's active NVLinks or PCIe link (model/links.py), else
    the datasheet's."""
    specs = [spec_for(info.kind)[0] for info in infos]
    facts = [links.nvml_facts(info.pci_bus_id) if info.platform == "gpu" else None
             for info in infos]
    return links.expected(specs, facts)


def allreduce_check(infos: list[DeviceInfo], level: str) -> AllReduceCheck:
    devices = jax.devices()
    if len(devices) < 2:
        return AllReduceCheck(status="skip", summary="one device: nothing to all-reduce",
                              devices=len(devices), exact=None)
    ok = exact(devices)
    if not ok:
        return AllReduceCheck(status="fail", devices=len(devices), exact=False,
                              summary=f"all-reduce over {len(devices)} devices gave a wrong sum",
                              fix="a device or link corrupts data: run the per-device checks "
                                  "and `nvidia-smi topo -m`; with NCCL, NCCL_DEBUG=INFO names "
                                  "the transport")
    if level == "quick":
        return AllReduceCheck(status="pass", devices=len(devices), exact=True,
                              summary=f"all-reduce over {len(devices)} devices: exact")
    points = sweep(devices, SWEEP_BYTES["gpu" if infos[0].platform == "gpu" else "cpu"])
    link, gbps = expected_link(infos)
    top = max(point.busbw_gbps for point in points)
    status = "pass" if gbps is None or top >= LINK_FLOOR * gbps else "warn"
    judged = (f"{top / gbps:.0%} of {link} (floor {LINK_FLOOR:.0%})" if gbps
              else "no link to judge it against (no datasheet entry)")
    return AllReduceCheck(
        status=status, devices=len(devices), exact=True, sweep=points, link=link,
        expected_gbps=gbps,
        summary=f"all-reduce over {len(devices)} devices: exact; bus bandwidth up to "
                f"{top:.3g} GB/s, {judged}",
        fix=None if status == "pass" else "check `nvidia-smi topo -m` (NVLink vs PCIe/SYS "
        "paths), `nvidia-smi nvlink -s`, and NCCL_DEBUG=INFO's transport lines")
