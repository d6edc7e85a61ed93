"""The test-only fault seam: one chosen device computes wrong logits or runs slower, so the tests
can show that a bad device fails the run and is named (no GPU here to break for real).

    ENVCHECK_TEST_FAULT=<kind>:<device index>:<token>
    kind: logits  the device's copy of the weights is perturbed (×(1 + 1e-3)): its logits leave
                  the HF golden by far more than the tolerance
          slow    every timed kernel on the device does its work twice

The token is `token(kind, index)` (the first 16 hex digits of a SHA-256 of the two): a value that
does not carry it is refused with exit 2, so neither a stray variable nor a typo can make a
device look broken, and the seam never acts silently. Documented in docs/model.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

VARIABLE = "ENVCHECK_TEST_FAULT"
KINDS = ("logits", "slow")


@dataclasses.dataclass(frozen=True)
class Fault:
    kind: str
    device: int


def token(kind: str, device: int) -> str:
    return hashlib.sha256(f"envcheck test fault {kind}:{device}".encode()).hexdigest()[:16]


def configured(environ=os.environ) -> Fault | None:
    """The fault the environment asks for; ValueError (exit 2) for a malformed or unsigned
    value."""
    value = environ.get(VARIABLE)
    if not value:
        return None
    kind, _, rest = value.partition(":")
    device, _, given = rest.partition(":")
    if kind not in KINDS or not device.isdigit() or given != token(kind, int(device)):
        raise ValueError(f"{VARIABLE}={value!r} is a test-only seam and this value is not one "
                         "of its signed values (docs/model.md): unset it")
    return Fault(kind, int(device))


def slowdown(fault: Fault | None, device: int) -> int:
    """How many times a timed kernel on `device` does its work."""
    return 2 if fault and fault.kind == "slow" and fault.device == device else 1


def perturbs(fault: Fault | None, device: int) -> bool:
    return bool(fault and fault.kind == "logits" and fault.device == device)
