"""The data model every pipeline shares: Checks in, a Report out; rendering and exit codes.

Collect first, render last: pipelines build a `Report`; `render_text` is for people,
`Report.to_json` for machines (top-level "schema": "envcheck.<kind>/v1").
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Literal

from rich.console import Console
from rich.markup import escape

Status = Literal["pass", "warn", "fail", "skip"]
STATUSES = ("pass", "warn", "fail", "skip")
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 128  # + the signal's number, as a shell reports a command a signal ended
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


@dataclasses.dataclass(frozen=True)
class Check:
    """One verdict on one fact. `id` is stable and dotted (documented in the README);
    `fix` says what to do when status is fail or warn."""

    id: str
    status: Status
    summary: str
    detail: str = ""
    fix: str | None = None

    def __post_init__(self) -> None:
        assert self.status in STATUSES, self.status
        assert self.id and " " not in self.id, self.id

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Report:
    kind: str
    verdict: str
    checks: list[Check]
    facts: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"schema": f"envcheck.{self.kind}/v1", "verdict": self.verdict,
                "checks": [c.to_json() for c in self.checks], **self.facts}


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


def redacted_report(report: Report) -> Report:
    checks = [Check(**redact_uuids(c.to_json())) for c in report.checks]
    return Report(report.kind, report.verdict, checks, redact_uuids(report.facts))


def field_problem(document: dict, fields: tuple, prefix: str = "") -> str | None:
    """The first of `fields` ((dotted path, type or tuple of types), ...) that `document` lacks
    or has of another type, said as "device.device_kind is missing" / "host.gpus is str" /
    "timings_s.model is null" (None: all there). A path through a missing map is missing;
    NoneType in the types makes a field optional; a bool is no int here (as in JSON Schema).
    For documents another program (or envcheck version) wrote: checked, not asserted. A path
    may be a tuple of keys instead (for keys that hold dots)."""
    for path, kind in fields:
        value, present = document, True
        for key in path.split(".") if isinstance(path, str) else path:
            present = isinstance(value, dict) and key in value
            value = value[key] if present else None
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds:
            said = "missing" if not present else "null" if value is None else type(value).__name__
            return f"{prefix}{path if isinstance(path, str) else '.'.join(path)} is {said}"
    return None
