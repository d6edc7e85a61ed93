"""What the all-reduce's link should give, from NVML in this process when it can say, else the
datasheet: each GPU's active NVLinks (nvmlDeviceGetNvLinkState over its links) or its PCIe link as
the slot and the card together allow (nvmlDeviceGetMaxPcieLinkGeneration / Width, the figures
`nvidia-smi -q` prints as "PCIe Generation Max" and "Link Width Max"). A GPU with fewer NVLinks
up than its datasheet names, or a x8 slot, lowers the expectation and is said in the summary.

NVLink 2.0, 3.0 and 4.0 carry 25 GB/s per link per direction, 5.0 (Blackwell) 50 GB/s.
NVML is read through ctypes (libnvidia-ml.so.1, which the NVIDIA Container Toolkit mounts with
the `utility` capability); any failure means "no NVML facts", never an error.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools

from model.specs import PCIE_GBPS, Spec

NVLINK_MAX_LINKS = 18  # NVML_NVLINK_MAX_LINKS
NVLINK_LINK_GBPS = 25.0  # per link, per direction: NVLink 2.0 to 4.0
NVLINK5_LINK_GBPS = 50.0
DATASHEET_LINKS = {"H100 SXM": 18, "H200 SXM": 18, "A100 SXM4 80 GB": 12,
                   "A100 SXM4 40 GB": 12, "V100 SXM2": 6, "B200": 18}


@dataclasses.dataclass(frozen=True)
class LinkFacts:
    """One GPU's links as NVML gives them (None: not known)."""

    pcie_gen: int | None = None
    pcie_width: int | None = None
    nvlinks_active: int | None = None


def expected(specs: list[Spec | None], facts: list[LinkFacts | None]
             ) -> tuple[str | None, float | None]:
    """(what the busbw is judged against, its GB/s per direction) for GPUs with `specs` and NVML
    `facts` (None where unknown), or (None, None) when nothing says."""
    known = [f for f in facts if f is not None]
    if known and len(known) == len(facts):
        if all(f.nvlinks_active for f in known):
            links = min(f.nvlinks_active for f in known)
            per_link = NVLINK5_LINK_GBPS if any(s and s.name == "B200" for s in specs) else (
                NVLINK_LINK_GBPS)
            full = [DATASHEET_LINKS.get(s.name) for s in specs if s]
            short = (f" (the datasheet's {max(full)})" if full and None not in full
                     and links < max(full) else "")
            return (f"NVLink, {links} active links{short} (NVML), {links * per_link:g} GB/s per "
                    "direction", links * per_link)
        if all(f.pcie_gen in PCIE_GBPS and f.pcie_width for f in known):
            gen = min(f.pcie_gen for f in known)
            width = min(f.pcie_width for f in known)
            gbps = PCIE_GBPS[gen] * width / 16
            return f"PCIe {gen}.0 x{width} (NVML), {gbps:g} GB/s per direction", gbps
    return from_datasheet(specs)


def from_datasheet(specs: list[Spec | None]) -> tuple[str | None, float | None]:
    if not specs or any(spec is None for spec in specs):
        return None, None
    if all(spec.nvlink_gbps for spec in specs):
        gbps = min(spec.nvlink_gbps for spec in specs)
        return f"NVLink, {gbps:g} GB/s per direction ({specs[0].name} datasheet)", gbps
    gen = min(spec.pcie_gen for spec in specs)
    return f"PCIe {gen}.0 x16, {PCIE_GBPS[gen]:g} GB/s per direction (datasheet)", PCIE_GBPS[gen]


@functools.cache
def _nvml():
    try:
        lib = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return None
    return lib if lib.nvmlInit_v2() == 0 else None


def nvml_facts(bus_id: str | None) -> LinkFacts | None:
    """The GPU at PCI `bus_id`'s links through NVML; None where NVML cannot say."""
    lib = _nvml()
    device = ctypes.c_void_p()
    if lib is None or not bus_id or lib.nvmlDeviceGetHandleByPciBusId_v2(
            bus_id.encode(), ctypes.byref(device)) != 0:
        return None
    gen, width, state = ctypes.c_uint(), ctypes.c_uint(), ctypes.c_int()
    has_gen = lib.nvmlDeviceGetMaxPcieLinkGeneration(device, ctypes.byref(gen)) == 0
    has_width = lib.nvmlDeviceGetMaxPcieLinkWidth(device, ctypes.byref(width)) == 0
    active = 0
    for link in range(NVLINK_MAX_LINKS):
        if lib.nvmlDeviceGetNvLinkState(device, link, ctypes.byref(state)) == 0 and state.value:
            active += 1
    return LinkFacts(pcie_gen=gen.value if has_gen else None,
                     pcie_width=width.value if has_width else None, nvlinks_active=active)
