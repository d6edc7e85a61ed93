"""`envcheck fleet slurm --drain [--dry-run]`: the verdict acted on through Slurm's own
mechanism, undoing only what envcheck did.

- A node whose gpu-smoke failed (with --require-gpu: any verdict but gpu) is drained:
  `scontrol update NodeName=N State=DRAIN Reason="envcheck: <check id>: <summary>"`, the reason
  one line, cut to REASON_MAX characters with the marker intact.
- A node envcheck drained earlier (its reason starts with the marker) that passed is resumed.
- A node drained by anyone else is never touched, and is listed as such.
- A node that gave no report (timed out, never ran, busy, down) is never drained: no verdict, no
  action. A drained node takes no job, so fleet cannot re-test one; the health-check program on
  the node itself is what resumes it.
The node states and reasons are read again (sinfo) after the run, so an admin's drain during
the run is seen. `--dry-run` prints the commands and runs none.
"""

from __future__ import annotations

import msgspec

from envcheck.fleet.aggregate import NodeAction, NodeResult
from envcheck.fleet.sinfo import Node, base_state
from envcheck.runner import Runner

MARKER = "envcheck:"
REASON_MAX = 200  # Slurm keeps longer ones, but sinfo -R and scontrol show cut them in columns
DRAINED = ("drain", "drng", "drained")
NOT_OPERATOR = ("Invalid user", "Access/permission denied", "Permission denied",
                "Authentication failure", "not authorized")


def reason_for(row: NodeResult) -> str:
    """`envcheck: <check id>: <summary>` on one line (newlines and runs of blanks as one
    space, double quotes as single ones), at most REASON_MAX characters."""
    said = " ".join(f"{row.first_failed or row.verdict}: {row.summary}".split()).replace('"', "'")
    return f"{MARKER} {said}"[:REASON_MAX].rstrip()


def is_drained(node: Node) -> bool:
    return base_state(node.state) in DRAINED or "drain" in node.state.lower()


def decide(rows: list[NodeResult], nodes: dict[str, Node], require_gpu: bool,
           timed_out: str | None = None) -> list[NodeAction]:
    """One action per node the run says something about. `timed_out`: the reason to drain a
    node whose check timed out with (the health check's; fleet drains no such node)."""
    actions = []
    for row in rows:
        node = nodes.get(row.node)
        if node is None:
            continue
        ours = node.reason.startswith(MARKER)
        drained = is_drained(node)
        failed = row.status == "reported" and (
            row.verdict == "fail" or (require_gpu and row.verdict != "gpu"))
        passed = row.status == "reported" and not failed
        hung = row.status == "timeout" and timed_out is not None
        if drained and not ours:
            actions.append(NodeAction(node=row.node, action="left drained",
                                      reason=f"drained by someone else: {node.reason or '-'}"))
        elif failed or hung:
            reason = reason_for(row) if failed else timed_out
            actions.append(NodeAction(node=row.node, action="drain", reason=reason, argv=[
                "scontrol", "update", f"NodeName={row.node}", "State=DRAIN",
                f"Reason={reason}"]))
        elif passed and drained:
            actions.append(NodeAction(node=row.node, action="resume", reason=node.reason,
                                      argv=["scontrol", "update", f"NodeName={row.node}",
                                            "State=RESUME"]))
        elif drained:
            actions.append(NodeAction(node=row.node, action="left drained", reason=(
                f"{node.reason} (drained by envcheck; a drained node takes no job, so the "
                "health-check program on the node re-tests and resumes it)")))
    return actions


def apply(actions: list[NodeAction], run: Runner, dry_run: bool) -> list[NodeAction]:
    """Run each action's scontrol command (none with dry_run); an error is kept per node."""
    done = []
    for action in actions:
        if not action.argv or dry_run:
            done.append(action)
            continue
        result = run(action.argv, 30.0)
        error = None
        if result.rc != 0:
            text = (result.err or result.out).strip().splitlines()
            error = text[-1] if text else f"scontrol exited with {result.rc}"
            if any(word in error for word in NOT_OPERATOR):
                error += (" — draining needs a Slurm operator: run as root or SlurmUser, or "
                          "`sacctmgr modify user <you> set adminlevel=operator`")
        done.append(msgspec.structs.replace(action, done=result.rc == 0, error=error))
    return done


def drain_fleet(rows: list[NodeResult], relist, run: Runner, require_gpu: bool,
                dry_run: bool) -> list[NodeAction]:
    """The actions for `rows`, decided on the node states `relist()` reads now, applied."""
    nodes = {node.name: node for node in relist()}
    return apply(decide(rows, nodes, require_gpu), run, dry_run)
