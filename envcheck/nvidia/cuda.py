"""What a driver can run: the CUDA toolkit -> minimum driver table, and what NVIDIA_REQUIRE_CUDA
(an image's ENV) means for a given host driver.

NVIDIA_REQUIRE_CUDA: space-separated alternatives are ORed, comma-separated constraints ANDed
(NVIDIA Container Toolkit docs, "Specialized Configurations with Docker"). `cuda>=X` compares the
CUDA version the driver supports; `driver>=` / `driver<` compare the driver version; `brand=`
the GPU brand (only the host knows it).
"""

from __future__ import annotations

import dataclasses
import re

import msgspec
from msgspec import UNSET, UnsetType

from envcheck.report import Check

# CUDA Toolkit Release Notes, Table 3 (Linux x86_64, GA releases): toolkit -> minimum driver.
CUDA_MIN_DRIVER = {
    (11, 0): (450, 36, 6), (11, 1): (455, 23), (11, 2): (460, 27, 3), (11, 3): (465, 19, 1),
    (11, 4): (470, 42, 1), (11, 5): (495, 29, 5), (11, 6): (510, 39, 1), (11, 7): (515, 43, 4),
    (11, 8): (520, 61, 5), (12, 0): (525, 60, 13), (12, 1): (530, 30, 2), (12, 2): (535, 54, 3),
    (12, 3): (545, 23, 6), (12, 4): (550, 54, 14), (12, 5): (555, 42, 2), (12, 6): (560, 28, 3),
    (12, 8): (570, 26), (12, 9): (575, 51, 3), (13, 0): (580, 65, 6),
}
# Minor-version compatibility (same page, Table 2): any 12.x runs on a driver >= 525 (limited).
MINOR_COMPAT_MIN_DRIVER = {11: (450, 80, 2), 12: (525, 60, 13), 13: (580, 65, 6)}
CONSTRAINT_RE = re.compile(r"^(cuda|driver|brand|arch)(>=|<=|==|=|>|<)(.+)$")
VERSION_RE = re.compile(r"^\d+(\.\d+)*$")


class RequirementError(ValueError):
    """An NVIDIA_REQUIRE_* value that cannot be parsed."""


def version_tuple(text: str) -> tuple[int, ...]:
    if not VERSION_RE.match(text):
        raise RequirementError(f"not a version: {text!r}")
    return tuple(int(part) for part in text.split("."))


def version_text(version: tuple[int, ...]) -> str:
    return ".".join(str(part) for part in version)


@dataclasses.dataclass(frozen=True)
class Constraint:
    key: str  # cuda | driver | brand | arch
    op: str
    value: str

    def __str__(self) -> str:
        return f"{self.key}{self.op}{self.value}"


def parse_requirement(text: str) -> list[list[Constraint]]:
    """'cuda>=12.8 brand=tesla,driver>=470,driver<471' -> [[cuda>=12.8], [brand=…, driver…]]."""
    alternatives = []
    for group in text.split():
        constraints = []
        for item in group.split(","):
            match = CONSTRAINT_RE.match(item.strip())
            if not match:
                raise RequirementError(f"NVIDIA_REQUIRE_CUDA term {item!r} is not KEY<op>VALUE "
                                       "with KEY one of cuda, driver, brand, arch")
            key, op, value = match.groups()
            if key in ("cuda", "driver"):
                version_tuple(value)
            constraints.append(Constraint(key, op, value))
        alternatives.append(constraints)
    return alternatives


def cuda_for_driver(driver: tuple[int, ...]) -> tuple[int, int] | None:
    """The newest CUDA toolkit version this driver supports natively (None if older than all)."""
    supported = [cuda for cuda, minimum in CUDA_MIN_DRIVER.items() if driver >= minimum]
    return max(supported) if supported else None


def _compare(left: tuple[int, ...], op: str, right: tuple[int, ...]) -> bool:
    width = max(len(left), len(right))
    left, right = left + (0,) * (width - len(left)), right + (0,) * (width - len(right))
    return {">=": left >= right, "<=": left <= right, ">": left > right, "<": left < right,
            "=": left == right, "==": left == right}[op]


def minimum_driver(alternative: list[Constraint]) -> str:
    """What a driver must be for this alternative, in words."""
    parts = []
    for c in alternative:
        if c.key == "cuda" and c.op in (">=", ">", "=", "=="):
            cuda = version_tuple(c.value)[:2]
            minimum = CUDA_MIN_DRIVER.get(cuda)
            parts.append(f"driver >= {version_text(minimum)} (CUDA {c.value})" if minimum
                         else f"a driver supporting CUDA {c.value}")
        elif c.key == "driver":
            parts.append(f"driver {c.op} {c.value}")
        else:
            parts.append(str(c))
    return ", ".join(parts)


def evaluate(alternatives: list[list[Constraint]], driver: tuple[int, ...],
             brand: str | None = None) -> tuple[bool | None, list[list[Constraint]]]:
    """(True, [the alternative that holds]), (False, []), or (None, the alternatives that hold
    except for a GPU brand the caller does not know)."""
    host_cuda = cuda_for_driver(driver)
    brand_only = []
    for alternative in alternatives:
        unknown_brand = False
        ok = True
        for c in alternative:
            if c.key == "cuda":
                ok &= host_cuda is not None and _compare(host_cuda, c.op, version_tuple(c.value))
            elif c.key == "driver":
                ok &= _compare(driver, c.op, version_tuple(c.value))
            elif c.key == "brand":
                if brand is None:
                    unknown_brand = True
                else:
                    ok &= (brand.lower() == c.value.lower()) == (c.op in ("=", "=="))
        if ok and not unknown_brand:
            return True, [alternative]
        if ok and unknown_brand:
            brand_only.append(alternative)
    return (None, brand_only) if brand_only else (False, [])


def cuda_runs(image: tuple[int, ...] | None, driver: tuple[int, ...],
              compat_libcuda: str | None, compat_known: bool = True) -> tuple[bool | None, str]:
    """Would CUDA work: natively, under minor-version compatibility, or only through the
    forward-compatibility package (data-center GPUs)?"""
    host_cuda = cuda_for_driver(driver)
    forward = (f"the image's cuda-compat libcuda {compat_libcuda} (forward compatibility, "
               "data-center GPUs only)") if compat_libcuda else None
    if image is None or (host_cuda is not None and host_cuda >= image):
        return True, "natively"
    minimum = MINOR_COMPAT_MIN_DRIVER.get(image[0])
    if minimum and driver >= minimum and host_cuda is not None and host_cuda[0] == image[0]:
        how = ("under minor-version compatibility (same major; PTX newer than the driver cannot "
               "be JIT-compiled)")
        return True, how + (f"; full {version_text(image)} support through {forward}"
                            if forward else "")
    if forward:
        return None, f"only through {forward}"
    if not compat_known:
        return None, ("only with a forward-compatibility package, which only streaming the "
                      "layers can show (drop --no-layers)")
    return False, "no: the driver is older than the image's CUDA and the image has no cuda-compat"


class RequirementCase(msgspec.Struct, kw_only=True):
    constraints: str  # one alternative of NVIDIA_REQUIRE_CUDA, as written
    needs: str  # what a driver must be for it, in words


class RequirementVerdict(msgspec.Struct, kw_only=True):
    """Would the Container Toolkit start the image on this driver, and would CUDA run? With no
    driver to judge against, only the cases (the alternatives and what each needs)."""

    driver: str | UnsetType = UNSET
    driver_cuda: str | None | UnsetType = UNSET  # the newest CUDA the driver runs natively
    toolkit_starts: bool | None | UnsetType = UNSET  # None: only on some GPU brands
    matched: list[str] | UnsetType = UNSET
    brands: list[str] | UnsetType = UNSET
    cuda_runs: bool | None | UnsetType = UNSET  # None: only with forward compatibility
    how: str | UnsetType = UNSET
    cases: list[RequirementCase] = []


def requirement_cases(alternatives: list[list[Constraint]]) -> list[RequirementCase]:
    return [RequirementCase(constraints=",".join(map(str, a)), needs=minimum_driver(a))
            for a in alternatives]


def requirement_verdict(require: str, image_cuda: str | None, driver_text: str,
                        compat_libcuda: str | None, compat_known: bool = True,
                        brand: str | None = None) -> RequirementVerdict:
    """Would the Container Toolkit start this image on this driver, and would CUDA run?"""
    driver = version_tuple(driver_text)
    alternatives = parse_requirement(require) if require.strip() else []
    starts, matched = evaluate(alternatives, driver, brand) if alternatives else (True, [])
    host_cuda = cuda_for_driver(driver)
    image = version_tuple(image_cuda)[:2] if image_cuda else None
    runs, how = cuda_runs(image, driver, compat_libcuda, compat_known)
    return RequirementVerdict(
        driver=driver_text, driver_cuda=version_text(host_cuda) if host_cuda else None,
        toolkit_starts=starts, matched=[",".join(map(str, a)) for a in matched],
        brands=sorted({c.value for a in matched for c in a if c.key == "brand"}),
        cuda_runs=runs, how=how, cases=requirement_cases(alternatives))


def requirement_check(env: dict[str, str], cuda_version: str | None, driver: str | None,
                      compat: list[str], compat_known: bool, brand: str | None = None
                      ) -> tuple[Check, RequirementVerdict | None]:
    require = env.get("NVIDIA_REQUIRE_CUDA", "")
    if not driver:
        return Check("image.requirement", "skip",
                     "no driver version to judge NVIDIA_REQUIRE_CUDA against",
                     fix="pass --driver-version X.Y (or run on the GPU host)"), None
    compat_version = compat[0].rsplit("libcuda.so.", 1)[-1] if compat else None
    try:
        verdict = requirement_verdict(require, cuda_version, driver, compat_version,
                                      compat_known, brand)
    except RequirementError as error:
        return Check("image.requirement", "fail", f"NVIDIA_REQUIRE_CUDA unreadable: {error}",
                     fix="fix the image's NVIDIA_REQUIRE_CUDA"), None
    if verdict.toolkit_starts is False:
        first = require.split()[0] if require else ""
        return Check("image.requirement", "fail",
                     f"driver {driver} (CUDA {verdict.driver_cuda}"
                     + (f", {brand}" if brand else "") + "): the Container Toolkit "
                     f"refuses to start this image (unsatisfied condition: {first})",
                     fix="update the host driver (see the cases), or use an image built for an "
                         "older CUDA; NVIDIA_DISABLE_REQUIRE=1 skips the check"), verdict
    status = "pass" if verdict.toolkit_starts and verdict.how == "natively" else "warn"
    if verdict.cuda_runs is False:
        return Check("image.requirement", "fail",
                     f"driver {driver} (CUDA {verdict.driver_cuda}): the toolkit would start "
                     f"the container but CUDA {cuda_version} cannot run: {verdict.how}",
                     fix="update the host driver to a branch that supports this CUDA"), verdict
    starts = "starts" if verdict.toolkit_starts else (
        f"starts only on GPU brands {', '.join(verdict.brands)}")
    return Check("image.requirement", status,
                 f"driver {driver} (CUDA {verdict.driver_cuda}): the toolkit {starts}; CUDA "
                 f"runs {verdict.how}"), verdict
