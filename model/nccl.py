"""container.nccl: what NCCL needs from the container it runs in, read from inside it.
- /dev/shm: NCCL's intra-node transport puts its buffers there; Docker's default is 64 MB and
  NCCL dies with `Error while creating shared memory segment /dev/shm/nccl-… No space left on
  device` (nccl#342). NVIDIA's containers are run with `--shm-size=1g`: below 1 GiB is a warn.
- RLIMIT_MEMLOCK: NCCL over InfiniBand / GPUDirect RDMA registers (pins) its buffers; with an
  RDMA device visible and a limited memlock, that is a warn (`--ulimit memlock=-1`). Without
  one, the limit is reported only.
- the IPC namespace, reported: processes in different containers share NCCL's /dev/shm
  segments only with `--ipc=host` (or a shared one).
"""

from __future__ import annotations

import os
import resource
from pathlib import Path

from model.report import NcclCheck

SHM_FLOOR_BYTES = 1 << 30


def shm_bytes(path: str = "/dev/shm") -> int | None:
    try:
        stat = os.statvfs(path)
    except OSError:
        return None
    return stat.f_blocks * stat.f_frsize


def memlock_bytes() -> int | None:
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return None if soft == resource.RLIM_INFINITY else soft


def ipc_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/ipc")
    except OSError:
        return None


def rdma_devices(root: Path = Path("/sys/class/infiniband")) -> list[str]:
    try:
        return sorted(p.name for p in root.iterdir())
    except OSError:
        return []


def nccl_check(shm: int | None, memlock: int | None, ipc: str | None,
               rdma: list[str]) -> NcclCheck:
    problems, fixes = [], []
    if shm is None or shm < SHM_FLOOR_BYTES:
        size = "no /dev/shm" if shm is None else f"/dev/shm is {shm / 2**20:.0f} MiB"
        problems.append(f"{size} (NCCL needs ≥ 1 GiB, or fails with `No space left on device` "
                        "on /dev/shm/nccl-…)")
        fixes.append("`docker run --shm-size=1g` (compose: `shm_size: 1gb`; Kubernetes: an "
                     "emptyDir with medium: Memory mounted at /dev/shm)")
    limit = "unlimited" if memlock is None else f"{memlock / 2**20:g} MiB"
    if memlock is not None and rdma:
        problems.append(f"memlock is {limit} with RDMA devices {', '.join(rdma)} visible "
                        "(NCCL pins its buffers for InfiniBand/GPUDirect RDMA)")
        fixes.append("`docker run --ulimit memlock=-1` (compose: `ulimits: {memlock: -1}`)")
    facts = f"/dev/shm {'-' if shm is None else f'{shm / 2**30:.2g} GiB'}, memlock {limit}, " \
            f"IPC namespace {ipc or 'unknown'}"
    return NcclCheck(status="warn" if problems else "pass",
                     summary="; ".join(problems) if problems else f"NCCL's prerequisites: {facts}",
                     fix="; ".join(fixes) or None, shm_bytes=shm, memlock_bytes=memlock,
                     ipc_namespace=ipc, infiniband=rdma)


def container_check() -> NcclCheck:
    return nccl_check(shm_bytes(), memlock_bytes(), ipc_namespace(), rdma_devices())
