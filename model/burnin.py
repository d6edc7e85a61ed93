"""perf.burn-in (--level long): a sustained matmul on every device for `duration_s`, each result
checked against a golden checksum every iteration. The golden is the device's first result, and
devices of the same kind must agree with each other too: the same compiled product on the same
inputs gives the same bits on a healthy device, so any difference is a device computing wrong
under load (heat, clocks, marginal memory) — the failure a plain speed test never sees.
"""

from __future__ import annotations

import hashlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from model import faults
from model.devices import label
from model.perf import SIZES
from model.report import BurnInCheck, DeviceInfo


def checksum(array) -> str:
    return hashlib.sha256(np.asarray(array).tobytes()).hexdigest()[:16]


def burn_in(infos: list[DeviceInfo], duration_s: float, fault) -> BurnInCheck:
    devices = jax.devices()
    n = SIZES["gpu" if infos[0].platform == "gpu" else "cpu"]["matmul"]
    product = jax.jit(lambda a, b: jnp.dot(a, b, precision=jax.lax.Precision.DEFAULT,
                                           preferred_element_type=jnp.float32))
    a, b = (jax.random.normal(jax.random.key(i), (n, n), jnp.bfloat16) for i in (3, 4))
    placed = [(jax.device_put(a, d), jax.device_put(b, d)) for d in devices]
    golden: dict[str, str] = {}  # kind -> first result's checksum
    iterations = {str(i): 0 for i in range(len(devices))}
    mismatches: list[str] = []
    deadline = time.monotonic() + duration_s
    while time.monotonic() < deadline or not all(iterations.values()):
        for index, (a_NN, b_NN) in enumerate(placed):
            out = product(a_NN, b_NN)
            if faults.perturbs(fault, index) and iterations[str(index)] == 1:
                out = out + 1e-3  # the seam: this device goes wrong on its second iteration
            got = checksum(out)
            want = golden.setdefault(infos[index].kind, got)
            if got != want and len(mismatches) < 20:
                mismatches.append(f"{label(infos[index])}, iteration {iterations[str(index)]}: "
                                  f"checksum {got} ≠ golden {want}")
            iterations[str(index)] += 1
    total = sum(iterations.values())
    if mismatches:
        return BurnInCheck(status="fail", summary=f"{len(mismatches)} wrong result(s) under "
                                                  f"load: {mismatches[0]}",
                           duration_s=duration_s, iterations=iterations, mismatches=mismatches,
                           fix="the named device computes wrong under sustained load: check "
                               "`nvidia-smi -q -d ECC,TEMPERATURE,PERFORMANCE` and the kernel "
                               "log for XIDs; drain it")
    return BurnInCheck(status="pass", duration_s=duration_s, iterations=iterations,
                       summary=f"{total} matmuls ({n}³ bf16) on {len(devices)} device(s) over "
                               f"{duration_s:g} s: every result equals its golden checksum")
