"""Per-node gpu-smoke reports -> one fleet report (`envcheck.fleet/v1`): a row per node (nodes
that never answered included, with why), totals, and the groups of nodes that fail the same way.
Engine-neutral: Slurm and Kubernetes collectors both produce `NodeResult`s.
"""

from __future__ import annotations

import collections
import json
import re
import shlex
from typing import Any, Literal

import msgspec

from envcheck.gpu_smoke.report import PerfFigure, SmokeReport
from envcheck.report import ReportError, read_report

SCHEMA = "envcheck.fleet/v1"
OK_VERDICTS = ("gpu", "cpu-fallback")
UNREADABLE_REPORT = "unreadable gpu-smoke report"
# status of a node row: "reported" (a gpu-smoke report came back) or why none did
NodeStatus = Literal["reported", "no-report", "drained", "down", "busy", "timeout", "pending"]
NODE_NAME_RE = re.compile(r"^(.*?)(\d+)$")
ROWS_BY_DEFAULT = 50


class NodeResult(msgspec.Struct):
    """One node's row: its gpu-smoke verdict, or why there is none."""

    node: str
    status: NodeStatus
    verdict: Literal["gpu", "cpu-fallback", "fail"] | None = None
    gpus: int | None = None
    driver: str | None = None
    first_failed: str | None = None
    summary: str = ""
    fix: str | None = None
    model_s: float | None = None
    cuda_visible_devices: str | None = None
    checks: dict[str, str] = {}  # check id -> status, of a node that reported
    performance: list[PerfFigure] = []  # its model test's perf figures (for --metrics)
    detail: str = ""

    def key(self) -> tuple[str, str, str]:
        """What 'fails the same way' means: same status, verdict and first broken link (or,
        for nodes without a report, the same reason)."""
        if self.status != "reported":
            return self.status, "", self.detail.split(":")[0][:80]
        return self.status, self.verdict or "", self.first_failed or ""


class Group(msgspec.Struct, kw_only=True):
    """Nodes that fail (or pass) the same way, in Slurm's compressed host list."""

    nodes: str
    count: int
    status: NodeStatus
    verdict: Literal["gpu", "cpu-fallback", "fail"] | None
    first_failed: str | None
    summary: str
    fix: str | None


class NodeAction(msgspec.Struct, kw_only=True):
    """What `fleet slurm --drain` did (or, with --dry-run, would do) on one node, and why."""

    node: str
    action: Literal["drain", "resume", "left drained"]
    reason: str | None = None
    argv: list[str] = []  # the scontrol command (none for "left drained")
    done: bool = False  # the command ran and scontrol accepted it
    error: str | None = None


class FleetReport(msgspec.Struct, kw_only=True):
    schema: Literal["envcheck.fleet/v1"] = SCHEMA
    engine: Literal["slurm", "kubernetes"]
    ok: bool
    node_count: int
    totals: dict[str, int]
    seconds: float | None
    groups: list[Group]
    nodes: list[NodeResult]
    actions: list[NodeAction] = []  # --drain's, in node order

    def to_json(self) -> dict:
        return msgspec.to_builtins(self)


def from_report(node: str, document: dict[str, Any]) -> NodeResult:
    """A node row from one `envcheck.smoke/v1` report (a no-report row naming the bad field
    when the report is not one this envcheck reads: a node may run another version)."""
    try:
        report = read_report(SmokeReport, document)
    except ReportError as problem:
        return NodeResult(node=node, status="no-report",
                          detail=f"{UNREADABLE_REPORT} ({problem}): run the same envcheck "
                                 "version on every node")
    checks = {c.id: c for c in report.checks}
    first = report.first_failed
    device = report.device or None
    gpus = len(report.host.gpus)
    if device and device.backend == "gpu":
        gpus = max(gpus, device.device_count)
    return NodeResult(
        node=node, status="reported", verdict=report.verdict, gpus=gpus,
        driver=report.host.driver, first_failed=first and first.id,
        summary=first.summary if first else "",
        fix=checks[first.id].fix if first and first.id in checks else None,
        model_s=report.timings_s.get("model"),
        cuda_visible_devices=report.node.cuda_visible_devices,
        checks={c.id: c.status for c in report.checks},
        performance=report.model.performance if report.model else [])


def report_node(report: dict[str, Any]) -> str | None:
    """The node name a report gives for itself, if it gives one as a string."""
    node = report.get("node")
    name = node.get("name") if isinstance(node, dict) else None
    return name if isinstance(name, str) else None


def parse_report(text: str) -> dict[str, Any] | None:
    """The last line of `text` that is an envcheck.smoke/v1 JSON object (logs may precede it);
    a multi-line (indented) document is accepted too."""
    candidates = [text[text.find("{"):]] if text.lstrip().startswith("{") else []
    candidates += [line for line in reversed(text.splitlines()) if line.startswith("{")]
    for candidate in candidates:
        try:
            report = json.loads(candidate)
        except json.JSONDecodeError:
            continue
        if isinstance(report, dict) and report.get("schema") == "envcheck.smoke/v1":
            return report
    return None


def hostlist(names: list[str]) -> str:
    """n1,n2,n3,n7,gpu-a -> n[1-3,7],gpu-a (Slurm's compressed form, for summaries)."""
    by_prefix: dict[str, list[int]] = collections.defaultdict(list)
    plain = []
    for name in names:
        match = NODE_NAME_RE.match(name)
        if match and not match.group(2).startswith("0"):
            by_prefix[match.group(1)].append(int(match.group(2)))
        else:
            plain.append(name)
    parts = []
    for prefix, numbers in sorted(by_prefix.items()):
        ranges, numbers = [], sorted(set(numbers))
        start = prev = numbers[0]
        for n in numbers[1:] + [None]:
            if n is not None and n == prev + 1:
                prev = n
                continue
            ranges.append(str(start) if start == prev else f"{start}-{prev}")
            if n is not None:
                start = prev = n
        parts.append(f"{prefix}{ranges[0]}" if len(numbers) == 1 else
                     f"{prefix}[{','.join(ranges)}]")
    return ",".join(parts + sorted(plain))


def summarize(nodes: list[NodeResult], engine: str, require_gpu: bool = False,
              seconds: float | None = None) -> FleetReport:
    """The fleet report: rows (sorted by node), totals, failure groups (largest first)."""
    rows = sorted(nodes, key=_natural)
    totals = collections.Counter(n.verdict if n.status == "reported" else n.status for n in rows)
    groups = collections.defaultdict(list)
    for node in rows:
        groups[node.key()].append(node)
    ordered = sorted(groups.values(), key=lambda members: (-len(members), members[0].node))
    good = OK_VERDICTS[:1] if require_gpu else OK_VERDICTS
    ok = bool(rows) and all(n.status == "reported" and n.verdict in good for n in rows)
    return FleetReport(engine=engine, ok=ok, node_count=len(rows),
                       totals=dict(sorted(totals.items())), seconds=seconds,
                       groups=[_group(members) for members in ordered], nodes=rows)


def _group(members: list[NodeResult]) -> Group:
    first = members[0]
    return Group(nodes=hostlist([m.node for m in members]), count=len(members),
                 status=first.status, verdict=first.verdict, first_failed=first.first_failed,
                 summary=first.summary or first.detail, fix=first.fix)


def _natural(node: NodeResult):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", node.node)]


def render(fleet: FleetReport, show_all: bool = False) -> str:
    """The node table (every node up to 50, or with --all), totals, groups."""
    return "\n".join(render_lines(fleet, show_all))


def render_lines(fleet: FleetReport, show_all: bool = False) -> list[str]:
    lines = []
    if show_all or len(fleet.nodes) <= ROWS_BY_DEFAULT:
        lines.append(f"{'NODE':<16} {'RESULT':<13} {'GPUS':>4} {'CVD':<5} {'DRIVER':<11} "
                     f"{'MODEL S':>7}  FIRST FAILED CHECK")
        for n in fleet.nodes:
            result = n.verdict if n.status == "reported" else n.status
            model = f"{n.model_s:.1f}" if n.model_s is not None else "-"
            failed = n.first_failed or (n.detail[:60] if n.status != "reported" else "")
            lines.append(f"{n.node:<16} {result:<13} {_dash(n.gpus):>4} "
                         f"{_dash(n.cuda_visible_devices):<5} {_dash(n.driver):<11} "
                         f"{model:>7}  {failed}")
    else:
        lines.append(f"({len(fleet.nodes)} nodes: the table is left out; --all prints every "
                     "node)")
    totals = ", ".join(f"{count} {name}" for name, count in fleet.totals.items())
    took = f" in {fleet.seconds:.1f} s" if fleet.seconds is not None else ""
    lines.append(f"{fleet.node_count} nodes{took}: {totals}")
    for group in fleet.groups:
        what = group.verdict or group.status
        link = f" — first failed {group.first_failed}" if group.first_failed else ""
        lines.append(f"  {group.count:>4} × {what}{link}: {group.nodes}")
        if group.summary:
            lines.append(f"         {group.summary[:160]}")
        if group.fix:
            lines.append(f"         fix: {group.fix[:160]}")
    dry_run = any(a.argv and not a.done and not a.error for a in fleet.actions)
    lines += [f"{'would run (--dry-run)' if dry_run else 'actions (--drain)'}:"] * bool(
        fleet.actions)
    for action in fleet.actions:
        state = "" if not action.argv else (" done" if action.done else f" FAILED: {action.error}"
                                            if action.error else " (not run)")
        lines.append(f"  {action.node}: {action.action}{state} — {action.reason or ''}")
        if action.argv and not action.done and not action.error:
            lines.append("    " + shlex.join(action.argv))
    return lines


def _dash(value) -> str:
    return "-" if value is None else str(value)
