"""The data model every pipeline shares: Checks in, a Report out; rendering and exit codes.

Collect first, render last: pipelines build a `Report`; `render_text` is for people,
`Report.to_json` for machines (top-level "schema": "envcheck.<kind>/v1").
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from rich.console import Console
from rich.markup import escape

Status = Literal["pass", "warn", "fail", "skip"]
STATUSES = ("pass", "warn", "fail", "skip")
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
_STYLE = {"pass": "green", "warn": "yellow", "fail": "bold red", "skip": "dim"}


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
