"""The model test's report (`envcheck.model-smoke/v1`): one typed definition that `python -m
model.smoke` writes and `envcheck gpu-smoke` reads back from the container, so a field is named
once. Imports nothing of envcheck (and no JAX): envcheck reads the definition from here.

Also the two helpers every envcheck report uses to cross a process boundary: `to_json` and
`from_json`, which validates while it decodes and names the bad path
(`checks[1].max_abs_diff: expected a number, got null`).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from msgspec import UNSET, UnsetType

SCHEMA = "envcheck.model-smoke/v1"
Status = Literal["pass", "warn", "fail", "skip"]
CHECK_IDS = ("model.load", "model.parity", "model.generate", "model.attention")
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


ModelCheck = LoadCheck | ParityCheck | GenerateCheck | AttentionCheck


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
    schema: Literal["envcheck.model-smoke/v1"] = SCHEMA
    ok: bool
    impl: str
    impl_used: str
    checkpoint: str
    device: DeviceFacts
    checks: list[ModelCheck]
    timings_s: dict[str, float]

    def __post_init__(self) -> None:
        ids = [check.id for check in self.checks]
        if sorted(ids) != sorted(CHECK_IDS):
            raise ValueError(f"checks are {', '.join(ids) or 'none'}, not "
                             f"{', '.join(CHECK_IDS)}")

    def check(self, kind: type[T]) -> T:
        """The one check of this type."""
        return next(check for check in self.checks if isinstance(check, kind))

