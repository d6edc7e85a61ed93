"""The data model every pipeline shares: Checks in, a typed report out; rendering.

Collect first, render last: each report kind has one typed definition (a msgspec Struct: the
image report in image/report.py, gpu-smoke's in gpu_smoke/report.py, fleet's in
fleet/aggregate.py, the model test's in model/report.py) that writes its JSON (`to_json`, with a
top-level "schema": "envcheck.<kind>/v1") and reads it back, validated, where it crosses a process
(`read_report`, naming the bad path). Text is rendered from the same attributes.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from rich.console import Console
from rich.markup import escape

from model.report import ReportError, from_json, to_json

__all__ = ["Check", "ReportError", "Status", "read_report", "to_json"]
Status = Literal["pass", "warn", "fail", "skip"]
STATUSES = ("pass", "warn", "fail", "skip")
CHECK_ID_PATTERN = r"^[a-z][a-z0-9-]*\.[a-z0-9.-]+$"
_STYLE = {"pass": "green", "warn": "yellow", "fail": "bold red", "skip": "dim"}
REDACTED = "<redacted>"
# Variable names that carry secrets (HF_TOKEN, AWS_SECRET_ACCESS_KEY, DB_PASSWORD, API_KEY, ...).
SECRET_NAME = r"[A-Za-z0-9_]*(?:TOKEN|SECRET|PASSW(?:OR)?D|PASSPHRASE|API_?KEY|ACCESS_?KEY" \
              r"|PRIVATE_?KEY|CREDENTIALS?|AUTH)[A-Za-z0-9_]*"
SECRET_NAME_RE = re.compile(rf"^{SECRET_NAME}$", re.IGNORECASE)
# NAME=value anywhere, and Dockerfile's old `ENV NAME value` form.
_VALUE = r"(\"[^\"]*\"|'[^']*'|\S+)"
SECRET_ASSIGNMENT_RE = re.compile(rf"\b({SECRET_NAME}=){_VALUE}|\b(ENV\s+{SECRET_NAME}\s+){_VALUE}",
                                  re.IGNORECASE)
GPU_UUID_RE = re.compile(r"\b(GPU|MIG)-[0-9a-fA-F]{8}(?:-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}\b")
R = TypeVar("R")


class Check(msgspec.Struct, frozen=True):
    """One verdict on one fact. `id` is stable and dotted (documented in docs/checks.md);
    `fix` says what to do when status is fail or warn."""

    id: Annotated[str, msgspec.Meta(pattern=CHECK_ID_PATTERN)]
    status: Status
    summary: Annotated[str, msgspec.Meta(min_length=1)]
    detail: str = ""
    fix: str | None = None

    def __post_init__(self) -> None:
        assert self.status in STATUSES, self.status
        assert self.id and " " not in self.id, self.id


def read_report(kind: type[R], data: bytes | str | dict) -> R:
    """A report another process wrote, validated against its definition (ReportError naming
    the bad path otherwise)."""
    return from_json(kind, data)


def render_checks(checks: list[Check], console: Console) -> None:
    """One line per check: status, id, summary; then the fix, indented, when there is one."""
    for check in checks:
        style = _STYLE[check.status]
        console.print(f"[{style}]{check.status.upper():<4}[/] {check.id:<22} "
                      f"{escape(check.summary)}", highlight=False)
        if check.fix and check.status in ("fail", "warn"):
            console.print(f"     {'':<22} fix: {escape(check.fix)}", highlight=False)


def redact_env(env: dict[str, str]) -> dict[str, str]:
    """The environment with the values of secret-looking variables replaced."""
    return {k: REDACTED if v and SECRET_NAME_RE.match(k) else v for k, v in env.items()}


def redact_text(text: str) -> str:
    """`NAME=value` / `ENV NAME value` of secret-looking names, in free text (history lines)."""
    return SECRET_ASSIGNMENT_RE.sub(lambda m: (m.group(1) or m.group(3)) + REDACTED, text)


def redact_uuids(value: Any) -> Any:
    """Every GPU/MIG UUID in strings, lists and dicts replaced (for reports shared outside)."""
    if isinstance(value, str):
        return GPU_UUID_RE.sub(lambda m: f"{m.group(1)}-{REDACTED}", value)
    if isinstance(value, list):
        return [redact_uuids(v) for v in value]
    if isinstance(value, dict):
        return {k: redact_uuids(v) for k, v in value.items()}
    return value


def redacted_report(report: R) -> R:
    """The report with every GPU/MIG UUID replaced, of the same type."""
    return msgspec.convert(redact_uuids(to_json(report)), type(report))
