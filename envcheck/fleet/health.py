"""`envcheck gpu-smoke --health-check`: slurmd's HealthCheckProgram on the node itself.

It runs gpu-smoke (the quick level; no srun) as a child with a time budget, reads the node's
state and reason from Slurm, and acts as `fleet slurm --drain` does (drain.py): a failed node is
drained with the `envcheck:` marker and the failed check; a node envcheck drained that passes is
resumed; a node drained by anyone else is left alone. A check that outlives the budget is killed
and the node drained with "envcheck: health check timed out". A child that gives no report (an
envcheck that cannot start) drains nothing: it is one line on stderr, exit 2.

Only one check per node runs at a time (an flock): one started while another is still running
does nothing and says so. The budget: slurmd kills a HealthCheckProgram that runs longer than
60 s (slurm.conf(5), HealthCheckProgram), so the default is 50 s for the check and 10 s for
sinfo and scontrol; the program itself must finish well inside HealthCheckInterval too. The
node is SLURMD_NODENAME (slurmd sets it for the program), else the short host name; --node
overrides.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import msgspec

from envcheck.errors import UnreadableInput
from envcheck.fleet import drain
from envcheck.fleet.aggregate import NodeAction, NodeResult, from_report, parse_report
from envcheck.fleet.sinfo import list_nodes, slurm_env
from envcheck.runner import RC_TIMEOUT, Runner

DEFAULT_BUDGET_S = 50.0
TIMED_OUT = "envcheck: health check timed out"


class HealthResult(msgspec.Struct, kw_only=True):
    node: str
    row: NodeResult
    actions: list[NodeAction]

    def line(self) -> str:
        what = (f"gpu-smoke {self.row.verdict}" if self.row.status == "reported"
                else self.row.status)
        failed = f" (first failed {self.row.first_failed})" if self.row.first_failed else ""
        done = "; ".join(f"{a.action}{' done' if a.done else ''}"
                         f"{' FAILED: ' + a.error if a.error else ''}" for a in self.actions)
        return f"envcheck health check on {self.node}: {what}{failed}; {done or 'no action'}"


@contextlib.contextmanager
def exclusive(node: str) -> Iterator[bool]:
    """Whether this is the only health check of `node` running now (an flock on a file in the
    temporary directory): slurmd starts the program every HealthCheckInterval whether or not the
    last one has ended, and two checks at once would slow each other past the budget."""
    name = re.sub(r"[^\w.-]", "_", node)
    fd = os.open(Path(tempfile.gettempdir()) / f"envcheck-health-{name}.lock",
                 os.O_CREAT | os.O_RDWR, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def node_name(given: str | None) -> str:
    return given or os.environ.get("SLURMD_NODENAME") or socket.gethostname().split(".")[0]


def smoke_argv(budget_s: float, no_container: bool, image: str | None,
               require_gpu: bool) -> list[str]:
    argv = [sys.executable, "-m", "envcheck", "gpu-smoke", "--json", "--level", "quick",
            "--timeout-s", f"{max(1.0, budget_s - 5):g}"]
    argv += ["--no-container"] if no_container else []
    argv += ["--image", image] if image else []
    return argv + (["--require-gpu"] if require_gpu else [])


def check(node: str, argv: list[str], budget_s: float, require_gpu: bool,
          run: Runner) -> HealthResult:
    """Run the check within `budget_s`, then drain or resume `node` as its verdict says."""
    result = run(argv, budget_s)
    if result.rc == RC_TIMEOUT:
        row = NodeResult(node, "timeout", detail=f"gpu-smoke outlived the {budget_s:g} s budget")
    else:
        document = parse_report(result.out)
        if document is None:
            tail = (result.err or result.out).strip().splitlines()
            raise UnreadableInput(f"the health check's gpu-smoke gave no report (exit code "
                                  f"{result.rc}: {tail[-1] if tail else 'no output'}): no "
                                  "action taken; run `envcheck gpu-smoke` on the node by hand")
        row = from_report(node, document)
    slurm = lambda argv, timeout_s: run(argv, timeout_s, env=slurm_env())  # noqa: E731
    nodes = {n.name: n for n in list_nodes(None, node, slurm)}
    actions = drain.decide([row], nodes, require_gpu, timed_out=TIMED_OUT)
    return HealthResult(node=node, row=row, actions=drain.apply(actions, slurm, dry_run=False))
