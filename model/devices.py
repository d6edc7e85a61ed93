"""The devices the model test judges: every device JAX sees, named as JAX names it and, on an
NVIDIA GPU, with the UUID and PCI bus id the CUDA driver gives for the same ordinal (JAX's
`local_hardware_id` is the CUDA ordinal after CUDA_VISIBLE_DEVICES), so a failing device can be
found on the host (`nvidia-smi -L`, `nvidia-smi --id=<bus id>`)."""

from __future__ import annotations

import ctypes
import functools

import jax

from model.report import DeviceInfo

CUDA_SUCCESS = 0


def visible() -> list[DeviceInfo]:
    """Every device of this process's default backend, in jax.devices() order."""
    return [describe(index, device) for index, device in enumerate(jax.devices())]


def describe(index: int, device) -> DeviceInfo:
    uuid = bus_id = None
    ordinal = getattr(device, "local_hardware_id", None)
    if device.platform == "gpu" and ordinal is not None:
        uuid, bus_id = cuda_identity(ordinal)
    return DeviceInfo(index=index, id=device.id, platform=device.platform,
                      kind=device.device_kind, uuid=uuid, pci_bus_id=bus_id)


def label(info: DeviceInfo) -> str:
    """How a check names a device: `device 2 (NVIDIA H100 80GB HBM3, 00000000:3A:00.0)`."""
    where = info.pci_bus_id or f"{info.platform}:{info.id}"
    return f"device {info.index} ({info.kind}, {where})"


@functools.cache
def _libcuda():
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    return lib if lib.cuInit(0) == CUDA_SUCCESS else None


def cuda_identity(ordinal: int) -> tuple[str | None, str | None]:
    """(GPU-UUID, PCI bus id) of CUDA device `ordinal` through the driver API; (None, None)
    where the driver cannot say (no libcuda in this process, an old driver)."""
    lib = _libcuda()
    handle = ctypes.c_int()
    if lib is None or lib.cuDeviceGet(ctypes.byref(handle), ordinal) != CUDA_SUCCESS:
        return None, None
    bus = ctypes.create_string_buffer(32)
    bus_id = (bus.value.decode() if lib.cuDeviceGetPCIBusId(bus, 32, handle) == CUDA_SUCCESS
              else None)
    raw = ctypes.create_string_buffer(16)
    get_uuid = getattr(lib, "cuDeviceGetUuid_v2", None) or getattr(lib, "cuDeviceGetUuid", None)
    uuid = None
    if get_uuid is not None and get_uuid(raw, handle) == CUDA_SUCCESS:
        h = raw.raw.hex()
        uuid = f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
    return uuid, bus_id
