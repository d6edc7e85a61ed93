"""fleet slurm --drain's decisions and commands, on node rows made from real gpu-smoke reports
(tests/gpu_host.py) and sinfo states; scontrol answers recorded at the runner seam. The one rule
that matters most: never drain a node without a failed verdict, never resume one envcheck did
not drain."""

from __future__ import annotations

import pytest

from envcheck.fleet import drain
from envcheck.fleet.aggregate import NodeResult, from_report
from envcheck.fleet.sinfo import Node, Partition
from envcheck.gpu_smoke import gpu_smoke
from envcheck.report import to_json
from envcheck.runner import RunResult
from tests.gpu_host import (
    FakeDocker,
    bare_host,
    connect_to,
    healthy_host,
    model_report,
    predicted,
)

PART = Partition("gpu", default=True)


def row(tmp_path, name: str, healthy: bool) -> NodeResult:
    """A healthy H100 host's row (gpu), or one of a host without a GPU whose engine cannot
    start a GPU container (cpu-fallback, first failed host.gpu)."""
    if healthy:
        host, docker = healthy_host(tmp_path / name), FakeDocker()
    else:
        host = bare_host(tmp_path / name)
        docker = FakeDocker(gpu_error='could not select device driver "" with capabilities: '
                                      '[[gpu]]', model_out=model_report(backend="cpu"))
    report = gpu_smoke(probe=host.probe, connect=connect_to(docker), predict=predicted())
    return from_report(name, to_json(report))


def node(name: str, state: str = "idle", reason: str = "") -> Node:
    return Node(name, state, reason, PART)


@pytest.fixture
def rows(tmp_path):
    """n1 healthy (gpu), n2 without a GPU (cpu-fallback), n3 no report (timed out)."""
    return [row(tmp_path, "n1", True), row(tmp_path, "n2", False),
            NodeResult("n3", "timeout", detail="the step timed out")]


def test_require_gpu_drains_the_failed_node_with_the_marker_and_never_one_without_a_report(rows):
    assert [(r.node, r.verdict) for r in rows] == [("n1", "gpu"), ("n2", "cpu-fallback"),
                                                  ("n3", None)]
    actions = drain.decide(rows, {n: node(n) for n in ("n1", "n2", "n3")}, require_gpu=True)
    assert [(a.node, a.action) for a in actions] == [("n2", "drain")]
    reason = actions[0].reason
    assert reason.startswith("envcheck: host.gpu: no NVIDIA GPU on the PCI bus")
    assert actions[0].argv == ["scontrol", "update", "NodeName=n2", "State=DRAIN",
                               f"Reason={reason}"]
    assert drain.decide(rows, {n: node(n) for n in ("n1", "n2", "n3")},
                        require_gpu=False) == []  # cpu-fallback passes without --require-gpu


def test_only_envchecks_own_drain_is_resumed(rows):
    states = {"n1": node("n1", "drain", "envcheck: host.nvml: NVML unreachable"),
              "n2": node("n2", "drain", "RMA ticket 4711 (admin)"),
              "n3": node("n3", "drng", "envcheck: model.parity: wrong logits")}
    actions = {a.node: a for a in drain.decide(rows, states, require_gpu=False)}
    assert actions["n1"].action == "resume" and actions["n1"].argv[-1] == "State=RESUME"
    assert actions["n2"].action == "left drained" and actions["n2"].argv == []
    assert "someone else: RMA ticket 4711" in actions["n2"].reason
    assert actions["n3"].action == "left drained" and "health-check program" in actions[
        "n3"].reason  # no report: not re-tested, so not resumed


def test_a_failing_node_an_admin_drained_is_left_as_it_is(rows):
    states = {"n2": node("n2", "drain", "kernel upgrade (admin)")}
    actions = drain.decide(rows, states, require_gpu=True)
    assert [(a.node, a.action, a.argv) for a in actions] == [("n2", "left drained", [])]


@pytest.mark.parametrize("summary", ['a "quoted"\nsummary\twith  blanks', "x" * 500])
def test_a_reason_is_one_line_cut_with_the_marker_intact(summary):
    reason = drain.reason_for(NodeResult("n1", "reported", verdict="fail",
                                         first_failed="model.parity", summary=summary))
    assert reason.startswith("envcheck: model.parity: ") and "\n" not in reason
    assert '"' not in reason and "  " not in reason and len(reason) <= drain.REASON_MAX


def test_dry_run_runs_nothing_and_scontrol_refusing_is_said_with_the_fix(rows):
    actions = drain.decide(rows, {"n2": node("n2")}, require_gpu=True)
    ran = []
    assert drain.apply(actions, lambda argv, t: ran.append(argv), dry_run=True) == actions
    assert ran == []
    refused = RunResult(1, "", "slurm_update error: Invalid user id")
    done = drain.apply(actions, lambda argv, t: refused, dry_run=False)
    assert not done[0].done and done[0].error.startswith("slurm_update error: Invalid user id")
    assert "sacctmgr modify user" in done[0].error
    missing = drain.apply(actions, lambda argv, t: RunResult(127, "", "scontrol: command not "
                                                                      "found"), dry_run=False)
    assert missing[0].error == "scontrol: command not found"
    accepted = drain.apply(actions, lambda argv, t: RunResult(0, "", ""), dry_run=False)
    assert accepted[0].done and accepted[0].error is None


def test_the_states_are_read_again_after_the_run(rows):
    """An admin who drains a node during the run wins: the states come from sinfo after it."""
    reads = []

    def relist():
        reads.append(1)
        return [node("n2", "drain", "drained during the run (admin)")]

    actions = drain.drain_fleet(rows, relist, lambda argv, t: RunResult(0, "", ""),
                                require_gpu=True, dry_run=False)
    assert reads == [1] and [(a.node, a.action) for a in actions] == [("n2", "left drained")]


class Node1:
    """The runner seam of one health check on node n1: the gpu-smoke child's answer, then
    sinfo's line for n1 (state, reason), and every scontrol command recorded."""

    def __init__(self, smoke: RunResult, state: str = "idle", reason: str = "none"):
        self.smoke, self.state, self.reason = smoke, state, reason
        self.scontrol: list[list[str]] = []

    def __call__(self, argv, timeout_s, env=None, input_text=None) -> RunResult:
        if argv[0] == "sinfo":
            return RunResult(0, f"n1|{self.state}|debug*|up|infinite|1-infinite|{self.reason}\n",
                             "")
        if argv[0] == "scontrol":
            self.scontrol.append(argv)
            return RunResult(0, "", "")
        assert "--health-check" not in argv and timeout_s == 50
        return self.smoke


def smoke_out(tmp_path, healthy: bool) -> RunResult:
    import json

    report = row_report(tmp_path, healthy)
    return RunResult(0 if healthy else 1, json.dumps(report) + "\n", "")


def row_report(tmp_path, healthy: bool) -> dict:
    if healthy:
        host, docker = healthy_host(tmp_path / "h"), FakeDocker()
    else:
        host, docker = healthy_host(tmp_path / "f"), FakeDocker(
            model_out=model_report(backend="gpu", parity="fail", diff=0.3))
    return to_json(gpu_smoke(probe=host.probe, connect=connect_to(docker), predict=predicted()))


def health_check(seam: Node1):
    from envcheck.fleet import health

    return health.check("n1", health.smoke_argv(50, True, None, False), 50, False, seam)


def test_the_health_check_drains_a_failing_node_and_resumes_it_once_it_passes(tmp_path):
    failing = Node1(smoke_out(tmp_path, healthy=False))
    result = health_check(failing)
    assert [a.action for a in result.actions] == ["drain"] and result.actions[0].done
    assert failing.scontrol[0][:4] == ["scontrol", "update", "NodeName=n1", "State=DRAIN"]
    assert failing.scontrol[0][4].startswith("Reason=envcheck: model.parity: ")
    assert "model.parity" in result.line() and "drain done" in result.line()
    passing = Node1(smoke_out(tmp_path, healthy=True), "drain", failing.scontrol[0][4][7:])
    result = health_check(passing)
    assert passing.scontrol == [["scontrol", "update", "NodeName=n1", "State=RESUME"]]
    admins = Node1(smoke_out(tmp_path, healthy=True), "drain", "bad fan (admin)")
    assert [a.action for a in health_check(admins).actions] == ["left drained"]
    assert admins.scontrol == []


def test_a_check_that_outlives_its_budget_drains_the_node_saying_so():
    hung = Node1(RunResult(124, "", "python: timed out after 50 s"))
    result = health_check(hung)
    assert hung.scontrol == [["scontrol", "update", "NodeName=n1", "State=DRAIN",
                              "Reason=envcheck: health check timed out"]]
    assert result.row.status == "timeout"
    admins = Node1(RunResult(124, "", ""), "drain", "maintenance (admin)")
    health_check(admins)
    assert admins.scontrol == []


def test_a_child_without_a_report_drains_nothing():
    from envcheck.errors import UnreadableInput

    broken = Node1(RunResult(1, "", "ModuleNotFoundError: No module named 'click'"))
    with pytest.raises(UnreadableInput, match="gave no report .* No module named 'click'"):
        health_check(broken)
    assert broken.scontrol == []


def test_the_node_is_slurmds_name_for_it(monkeypatch):
    from envcheck.fleet import health

    monkeypatch.setenv("SLURMD_NODENAME", "gpu-017")
    assert health.node_name(None) == "gpu-017" and health.node_name("n9") == "n9"
    monkeypatch.delenv("SLURMD_NODENAME")
    import socket

    assert health.node_name(None) == socket.gethostname().split(".")[0]


def test_one_health_check_of_a_node_at_a_time():
    """slurmd starts the program every interval even while the last one runs: the second
    finds the lock taken and does nothing."""
    from envcheck.fleet import health

    with health.exclusive("n1") as first:
        with health.exclusive("n1") as second, health.exclusive("n2") as other:
            assert (first, second, other) == (True, False, True)
    with health.exclusive("n1") as again:
        assert again
