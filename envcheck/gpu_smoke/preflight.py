"""gpu-smoke's pre-flight of the JAX stack: inspect-image's static prediction (the Python
packages, JAX's version rules, what the CUDA plugin will load) for the image it is about to run,
so that a broken stack is named before the container starts; and, after the model test ran on a
GPU, the prediction held against the libraries the process really mapped.

An image's facts never change for its ID: the prediction is cached per image ID and driver in
the user's cache directory (`$XDG_CACHE_HOME/envcheck/preflight`, at most CACHE_ENTRIES files,
written atomically so concurrent runs never read half a file), so only the first gpu-smoke of an
image pays for streaming its layers.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import msgspec

from envcheck.errors import EnvcheckError
from envcheck.image.linker import Load
from envcheck.report import Check, ReportError, read_report

CACHE_ENTRIES = 64
STACK_IDS = ("image.python", "image.jax-stack", "image.jax-libraries")


class Prediction(msgspec.Struct, kw_only=True):
    image_id: str
    driver: str | None
    seconds: float  # what inspecting the image took, when it was not cached
    checks: list[Check]
    loads: list[Load]  # the CUDA libraries the plugin would load, each once
    cached: bool = False


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "envcheck" / "preflight"


def inspect_daemon_image(image_id: str, driver: str | None) -> tuple[list[Check], list[Load]]:
    """The stack checks and the CUDA loads of the daemon's image, as inspect-image finds them."""
    from envcheck.image.inspect import inspect_image
    from envcheck.image.jaxstack import WHEEL_MODULE

    report = inspect_image(f"docker-daemon:{image_id}", driver_version=driver)
    loads, seen = [], set()
    for load in report.jax_libraries.loads if report.jax_libraries else []:
        if load.name in WHEEL_MODULE and load.name not in seen:
            seen.add(load.name)
            loads.append(load)
    return [c for c in report.checks if c.id in STACK_IDS], loads


def predict(image_id: str, driver: str | None,
            inspect: Callable[[str, str | None], tuple[list[Check], list[Load]]] | None = None,
            directory: Path | None = None) -> Prediction:
    """The prediction for the image, from the cache or inspected now (and cached)."""
    directory = directory or cache_dir()
    key = hashlib.sha256(f"{image_id}\0{driver}".encode()).hexdigest()[:32]
    entry = directory / f"{key}.json"
    with contextlib.suppress(OSError, ReportError):
        found = read_report(Prediction, entry.read_bytes())
        if found.image_id == image_id and found.driver == driver:
            return msgspec.structs.replace(found, cached=True)
    start_s = time.perf_counter()
    try:
        checks, loads = (inspect or inspect_daemon_image)(image_id, driver)
    except EnvcheckError as error:
        return Prediction(image_id=image_id, driver=driver, loads=[],
                          seconds=round(time.perf_counter() - start_s, 3),
                          checks=[Check("image.jax-stack", "skip", f"the image's layers could "
                                                                   f"not be read: {error}")])
    prediction = Prediction(image_id=image_id, driver=driver, checks=checks, loads=loads,
                            seconds=round(time.perf_counter() - start_s, 3))
    store(directory, entry, prediction)
    return prediction


def store(directory: Path, entry: Path, prediction: Prediction) -> None:
    """Write the entry atomically (a temp file renamed over it), keeping the newest entries."""
    with contextlib.suppress(OSError):
        directory.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=directory, prefix=".entry-", suffix=".tmp")
        with os.fdopen(handle, "wb") as out:
            out.write(msgspec.json.encode(prediction))
        os.replace(temporary, entry)
        entries = sorted(directory.glob("*.json"), key=lambda p: p.stat().st_mtime)
        for stale in entries[:-CACHE_ENTRIES]:
            stale.unlink(missing_ok=True)


def mapped_check(prediction: Prediction | None, mapped: list[str]) -> Check | None:
    """jax.libraries: the CUDA libraries the model test's process mapped (/proc/self/maps, on
    a GPU only) against the prediction; None when there is nothing to compare."""
    if prediction is None or not mapped or not prediction.loads:
        return None
    by_stem = {_stem(path): path for path in mapped}
    differ = [(load, by_stem[_stem(load.path)]) for load in prediction.loads
              if load.path and _stem(load.path) in by_stem
              and by_stem[_stem(load.path)] != load.path]
    if differ:
        load, real = differ[0]
        return Check("jax.libraries", "warn",
                     f"{load.name}: predicted {load.path} ({load.via}), but the process mapped "
                     f"{real}", detail="; ".join(f"{d.name}: {d.path} ≠ {r}" for d, r in differ),
                     fix="the image's loader setup differs from what its files say (an "
                         "LD_LIBRARY_PATH or LD_PRELOAD set at run time?): compare `docker "
                         "inspect` ENV with the run's environment")
    return Check("jax.libraries", "pass", f"the {len(by_stem)} CUDA libraries the model test "
                                          "mapped are the ones predicted")


def _stem(path: str) -> str:
    """libcudnn.so.9.7.0 -> libcudnn: a library whatever its version suffix."""
    return posixpath.basename(path).split(".so")[0]
