"""Fleet aggregation, srun output collection and the Kubernetes side, without a cluster: real
gpu-smoke reports, srun stderr recorded on the local Slurm 22.05 cluster, a PodList payload
through the kubernetes client's own deserializer, and manifests validated against the
Kubernetes schema offline."""

from __future__ import annotations

import copy
import itertools
import json
import threading
import time
from pathlib import Path

import jsonschema
import pytest
import yaml
from click.testing import CliRunner

from envcheck.cli import cli
from envcheck.fleet import k8s
from envcheck.fleet import slurm as slurm_module
from envcheck.fleet.aggregate import NodeResult, from_report, hostlist, render, summarize
from envcheck.fleet.sinfo import (
    _gres_count,
    availability,
    slurm_env,
    slurm_max_nodes,
    slurm_time_s,
)
from envcheck.fleet.slurm import collect_step, run_fleet
from envcheck.gpu_smoke import gpu_smoke
from envcheck.report import to_json
from envcheck.runner import RunResult
from tests.conftest import REPO, interrupting, planted
from tests.gpu_host import FakeDocker, connect_to, healthy_host, predicted

FIXTURES = REPO / "tests/fixtures/fleet"
SCHEMA = json.loads((REPO / "envcheck/data/schemas/fleet.v1.json").read_text())
# slurmd dead on n2 but still idle in slurmctld: srun aborts the step and kills n1's and n3's tasks
ABORTED_STEP_ERR = FIXTURES / "srun-stderr_step-aborted-tasks-killed_22.05.txt"


@pytest.fixture
def cpu_report() -> dict:
    return json.loads((FIXTURES / "smoke_cpu-fallback_container.json").read_text())


@pytest.fixture
def gpu_report(tmp_path) -> dict:
    host = healthy_host(tmp_path)
    return gpu_smoke(probe=host.probe, connect=connect_to(FakeDocker()),
                     predict=predicted()).to_json()


def test_a_node_row_from_a_real_report(cpu_report):
    row = from_report("n1", cpu_report)
    assert (row.status, row.verdict, row.gpus, row.driver) == ("reported", "cpu-fallback", 0,
                                                               None)
    assert row.first_failed == "host.gpu" and "NVIDIA GPU" in row.fix
    assert row.model_s == cpu_report["timings_s"]["model"]


def test_a_gpu_node_row(gpu_report):
    row = from_report("gpu-node-1", gpu_report)
    assert (row.verdict, row.gpus, row.driver, row.first_failed) == ("gpu", 1, "590.48.01", None)


@pytest.mark.parametrize("names,expected", [
    (["n1", "n2", "n3"], "n[1-3]"),
    (["n3", "n1", "n7", "n8", "gpu-a"], "n[1,3,7-8],gpu-a"),
    (["n5"], "n5"),
    (["node01", "node02"], "node01,node02"),  # zero-padded names are left as they are
])
def test_hostlist(names, expected):
    assert hostlist(names) == expected


@pytest.mark.parametrize("state,status", [
    ("idle", None), ("mix", None), ("alloc", "busy"), ("comp", "busy"), ("resv", "busy"),
    ("drain", "drained"), ("drng", "drained"), ("down*", "down"), ("idle*", "down"),
    ("fail", "down"),
])
def test_slurm_states(state, status):
    assert availability(state) == status


def test_collect_step_maps_files_and_srun_errors(cpu_report):
    srun_err = (FIXTURES / "srun-stderr_slurmd-killed-on-n2_22.05.txt").read_text()
    outputs = {0: "noise\n" + json.dumps(cpu_report), 1: "", 2: ""}
    rows = collect_step(["n1", "n2", "n3"], outputs, {2: "slurmstepd: error: *** STEP 6.0 "
                                                         "CANCELLED ***"}, 233, srun_err)
    by_node = {r.node: r for r in rows}
    assert by_node["n1"].verdict == "cpu-fallback"  # the report's own node name is "vm"
    assert by_node["n2"].status == "no-report"
    assert by_node["n2"].detail == "Communication connection failure"
    assert "CANCELLED" in by_node["n3"].detail


def test_collect_step_task_exit(cpu_report):
    srun_err = (FIXTURES / "srun-stderr_task-exit-3-on-n2_22.05.txt").read_text()
    rows = collect_step(["n1", "n2"], {0: json.dumps(cpu_report), 1: "Traceback ..."}, {}, 3,
                        srun_err)
    assert rows[1].status == "no-report" and rows[1].detail == "Exited with exit code 3"


# A node running another envcheck version, or printing a look-alike: each was a traceback
# (KeyError, AttributeError, TypeError, ValueError) out of `fleet slurm` / `fleet k8s collect`.
@pytest.mark.parametrize("path,value,said", [
    ("checks.0", "host.gpu", "checks[0]: expected an object, got a string"),
    ("checks.0.id", ..., "checks[0].id: missing"),
    ("checks.0.id", "host gpu", "checks[0].id: expected a string matching regex"),
    ("checks.0.fix", 3, "checks[0].fix: expected a string or null, got an integer"),
    ("checks", {"host.gpu": "fail"}, "checks: expected an array, got an object"),
    ("first_failed", "host.gpu", "first_failed: expected an object or null, got a string"),
    ("first_failed.summary", ["x"], "first_failed.summary: expected a string, got an array"),
    ("device", [], "device: expected an object, got an array"),
    ("device.device_count", "1", "device.device_count: expected an integer, got a string"),
    ("host", "vm", "host: expected an object, got a string"),
    ("host.gpus", 2, "host.gpus: expected an array, got an integer"),
    ("host.driver", 570, "host.driver: expected a string or null, got an integer"),
    ("timings_s", [1.0], "timings_s: expected an object, got an array"),
    ("timings_s.model", "1.5", "timings_s.model: expected a number, got a string"),
    ("timings_s.model", False, "timings_s.model: expected a number, got a boolean"),
    ("device.device_count", True, "device.device_count: expected an integer, got a boolean"),
    ("node", ["n1"], "node: expected an object, got an array"),
    ("node.cuda_visible_devices", 0,
     "node.cuda_visible_devices: expected a string or null, got an integer"),
    ("verdict", ..., "verdict: missing"),
    ("verdict", "ok", "verdict: invalid enum value 'ok'"),
])
def test_a_report_of_another_shape_is_a_row_saying_so(cpu_report, path, value, said):
    row = from_report("n1", planted(cpu_report, path, value))
    assert row.status == "no-report" and row.verdict is None
    assert row.detail.startswith(f"unreadable gpu-smoke report ({said}")
    assert row.detail.endswith("): run the same envcheck version on every node")
    jsonschema.validate(to_json(summarize([row], "slurm")), SCHEMA)


def test_optional_parts_of_a_report_may_be_absent_or_null(gpu_report):
    """What the smoke report's definition leaves optional: null where there is none, absent
    where that stage did not run (a report without a model test has no device)."""
    for path, value in (("first_failed", None), ("checks.0.fix", None), ("device", ...),
                        ("docker", ...), ("image", ...), ("docker.docker_root_dir", ...)):
        row = from_report("n1", planted(gpu_report, path, value))
        assert (row.status, row.verdict) == ("reported", "gpu"), path
    assert from_report("n1", planted(gpu_report, "device", ...)).gpus == 1  # from NVML


def test_collect_step_with_a_report_of_another_shape(cpu_report):
    odd = planted(planted(cpu_report, "node", ["n2"]), "device.device_count", "x")
    rows = collect_step(["n1", "n2"], {0: json.dumps(cpu_report), 1: json.dumps(odd)}, {}, 0, "")
    assert [(r.node, r.status) for r in rows] == [("n1", "reported"), ("n2", "no-report")]
    assert rows[1].detail.startswith("unreadable gpu-smoke report (node: expected an object, "
                                     "got an array): run the same")
    assert rows[1].detail in [g.summary for g in summarize(rows, "slurm").groups]


def synthetic_fleet(cpu_report, gpu_report, count: int) -> list[NodeResult]:
    rows = []
    for i in range(count):
        if i % 10 == 3:
            rows.append(NodeResult(f"n{i}", "drained", detail="drain: ECC errors"))
            continue
        report = copy.deepcopy(gpu_report if i % 10 < 7 else cpu_report)
        rows.append(from_report(f"n{i}", report))
    return rows


class FakeSlurm:
    """sinfo, salloc and scancel answer as Slurm 22.05 does. `states` is what sinfo lists
    ("n1:idle,n2:mix") in the default partition `debug*` with time limit `max_time` (sinfo's
    %l); `salloc(nodelist)` may refuse an allocation (a RunResult) or grant it (None); each
    srun step is `step(nodes, files)`, which returns a RunResult after writing the per-node
    output files it likes. `sinfo`, where given, is sinfo's whole node list instead (other
    partitions, other limits). `max_jobs` is a limit on the user's jobs (a QOS's
    MaxJobsPerUser): salloc waits, then gives up, while that many allocations are held
    (`turned_away` counts those). Calls may come from several threads at once."""

    def __init__(self, states: str, step=None, salloc=None, max_time: str = "infinite",
                 room: dict | None = None, job_size: str = "1-infinite",
                 sinfo: str | None = None, max_jobs: int | None = None):
        self.states = [item.split(":") for item in states.split(",")]
        self.sinfo = sinfo
        self.step, self.salloc = step, salloc or (lambda nodelist: None)
        self.max_time, self.times, self.job_size = max_time, [], job_size
        self.room = room or {}  # node -> sinfo -O "CPUsState|Gres|GresUsed"
        self.steps: list[list[str]] = []
        self.allocations: list[str] = []
        self.partitions: list[str] = []
        self.calls: list[str] = []
        self.max_jobs, self.held, self.most_held = max_jobs, set(), 0
        self.job_ids, self.lock = itertools.count(8), threading.Lock()
        self.turned_away = threading.Semaphore(0)  # released by each wait for max_jobs

    def __call__(self, argv, timeout_s, **_):
        self.calls.append(argv[0])
        options = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
        if argv[0] == "sinfo" and "-O" in argv:  # the partly used nodes' CPUs and GRES
            nodes = argv[argv.index("-n") + 1].split(",")
            return RunResult(0, "".join(f"{n}|{self.room.get(n, '1/1/0/2|gpu:2|gpu:0')}|\n"
                                        for n in nodes), "")
        if argv[0] == "sinfo":
            assert argv[4] == "%N|%t|%P|%a|%l|%s|%E"
            return RunResult(0, self.sinfo or "".join(
                f"{n}|{state}|debug*|up|{self.max_time}|{self.job_size}|none\n"
                for n, state in self.states), "")
        if argv[0] == "salloc":
            return self.allocate(options)
        if argv[0] == "scancel":
            with self.lock:
                self.held.remove(argv[1])
            return RunResult(0, "", "")
        assert options["jobid"] in self.held
        nodes = options["nodelist"].split(",")
        self.steps.append(nodes)
        return self.step(nodes, lambda i: Path(options["output"].replace("%n", str(i))))

    def allocate(self, options: dict) -> RunResult:
        self.allocations.append(options["nodelist"])
        self.partitions.append(options["partition"])
        self.times.append(int(options["time"]))
        refused = self.salloc(options["nodelist"])
        with self.lock:
            if refused is None and self.max_jobs is not None and len(self.held) >= self.max_jobs:
                job = next(self.job_ids)
                refused = RunResult(1, "", f"salloc: Pending job allocation {job}\nsalloc: job "
                                           f"{job} queued and waiting for resources\nsalloc: "
                                           "error: Unable to allocate resources: Connection "
                                           "timed out\n")
                self.turned_away.release()
            if refused is not None:
                return refused
            job = str(next(self.job_ids))
            self.held.add(job)
            self.most_held = max(self.most_held, len(self.held))
        return RunResult(0, "", f"salloc: Granted job allocation {job}\n")


def reports(cpu_report):
    """A step in which every node prints its report."""
    def step(nodes, output):
        for index, node in enumerate(nodes):
            report = {**cpu_report, "node": {**cpu_report["node"], "name": node}}
            output(index).write_text(json.dumps(report))
        return RunResult(0, "", "")
    return step


def test_a_launch_failure_reruns_the_healthy_nodes_once(cpu_report):
    """One dead slurmd must not hide the other nodes: they run again in a second step of the
    same allocation, which is released at the end."""
    def step(nodes, output):
        if len(nodes) == 3:
            return RunResult(233, "", ABORTED_STEP_ERR.read_text())
        return reports(cpu_report)(nodes, output)

    slurm = FakeSlurm("n1:idle,n2:idle,n3:idle", step)
    rows = {row.node: row for row in run_fleet(envcheck=["envcheck"], run=slurm)}
    assert slurm.steps == [["n1", "n2", "n3"], ["n1", "n3"]]
    assert slurm.calls == ["sinfo", "salloc", "srun", "srun", "scancel"]
    assert rows["n2"].status == "no-report" and "Communication" in rows["n2"].detail
    assert rows["n1"].status == rows["n3"].status == "reported"
    assert list(rows) == ["n1", "n2", "n3"]


def test_without_a_launch_failure_nothing_is_rerun():
    slurm = FakeSlurm("n1:idle,n2:idle", lambda nodes, output: RunResult(
        1, "", "srun: error: n2: task 1: Exited with exit code 2\n"))
    rows = run_fleet(envcheck=["envcheck"], run=slurm)
    assert len(slurm.steps) == 1 and [row.status for row in rows] == ["no-report", "no-report"]
    assert slurm.calls[-1] == "scancel"


def test_partly_used_nodes_are_dropped_when_the_allocation_is_refused(cpu_report):
    """n3 is fully allocated (a busy row, never asked for); n2 is partly in use (mix) and the
    allocation with it times out: n2 becomes busy and n1 is allocated alone."""
    waited = RunResult(1, "", "salloc: Pending job allocation 7\nsalloc: job 7 queued and "
                              "waiting for resources\nsalloc: error: Unable to allocate "
                              "resources: Connection timed out\n")  # as Slurm 22.05 words it
    slurm = FakeSlurm("n1:idle,n2:mix,n3:alloc", reports(cpu_report),
                      salloc=lambda nodelist: waited if "n2" in nodelist else None)
    rows = {row.node: row for row in run_fleet(envcheck=["envcheck"], run=slurm)}
    assert slurm.allocations == ["n1,n2", "n1"]
    assert rows["n1"].status == "reported"
    assert rows["n2"].status == "busy" and rows["n2"].detail.startswith("mix: partly in use")
    assert rows["n3"].status == "busy" and rows["n3"].detail.startswith("alloc: every CPU")


def test_partly_used_nodes_without_room_are_busy_without_asking(cpu_report):
    """sinfo shows n2 with no idle CPU and n3 with both GPUs taken (real sinfo -O text, GPU
    indices included): both are busy rows at once, only n1 and n4 are allocated, no 30 s wait."""
    slurm = FakeSlurm("n1:idle,n2:mix,n3:mix,n4:mix", reports(cpu_report), room={
        "n2": "2/0/0/2|gpu:2(S:0-1)|gpu:1(IDX:0)",
        "n3": "1/1/0/2|gpu:2(S:0-1)|gpu:2(IDX:0-1)",
        "n4": "1/1/0/2|gpu:2(S:0-1)|gpu:1(IDX:1)"})
    rows = {row.node: row for row in run_fleet(envcheck=["envcheck"], gres="gpu:1",
                                               run=slurm)}
    assert slurm.allocations == ["n1,n4"]
    assert rows["n2"].status == "busy" and "no idle CPU" in rows["n2"].detail
    assert rows["n3"].status == "busy" and rows["n3"].detail == \
        "mix: 0 gpu free of 2, 1 asked for"
    assert rows["n1"].status == rows["n4"].status == "reported"


@pytest.mark.parametrize("listed, kind, count", [
    ("gpu:2(S:0-1)", ("gpu",), 2), ("gpu:a100:1(IDX:0),gpu:v100:2(IDX:1-2)", ("gpu",), 3),
    ("gpu:a100:1(IDX:0),gpu:v100:2(IDX:1-2)", ("gpu", "v100"), 2), ("(null)", ("gpu",), 0),
    ("gpu:4(IDX:0,2-3),nic:1", ("nic",), 1), ("bandwidth:10G", ("bandwidth",), 0)])
def test_gres_counts_from_sinfo(listed, kind, count):
    assert _gres_count(listed, kind) == count


def test_a_surrounding_jobs_context_is_left_out(monkeypatch):
    for name, value in {"SLURM_JOB_ID": "4242", "SLURM_NNODES": "1", "SLURM_NTASKS": "64",
                        "SRUN_CPUS_PER_TASK": "2", "SLURM_CONF": "/etc/slurm/slurm.conf",
                        "SLURM_ACCOUNT": "gpu-ops"}.items():
        monkeypatch.setenv(name, value)
    env = slurm_env()
    assert {k for k in env if k.startswith(("SLURM_", "SRUN_"))} == {"SLURM_CONF",
                                                                     "SLURM_ACCOUNT"}
    assert env["PATH"]


def test_a_refused_request_does_not_blame_the_mix_nodes():
    """An invalid request (no waiting for resources) is the request's fault: every node gets
    Slurm's reason, the partly used ones too, and nothing is retried."""
    invalid = RunResult(1, "", "salloc: error: Invalid generic resource (gres) specification\n")
    slurm = FakeSlurm("n1:idle,n2:mix", salloc=lambda nodelist: invalid)
    rows = run_fleet(envcheck=["envcheck"], gres="gpu:9", run=slurm, nodes="n[1-2]")
    assert slurm.calls == ["sinfo", "sinfo", "salloc"]
    assert {(r.status, r.detail) for r in rows} == {
        ("no-report", "salloc: error: Invalid generic resource (gres) specification")}


@pytest.mark.parametrize("text, seconds", [
    ("5:00", 300), ("1:30:00", 5400), ("1-02:03:00", 93780), ("30", 1800),
    ("infinite", None), ("UNLIMITED", None), ("", None)])
def test_sinfo_time_limits(text, seconds):
    assert slurm_time_s(text) == seconds


def test_the_allocation_fits_the_partitions_max_time(cpu_report):
    """The check's time (--timeout-s 600 + slack + the re-run margin: 14 min) is cut to a
    5-minute MaxTime; under an unlimited partition it stays."""
    short = FakeSlurm("n1:idle,n2:idle", reports(cpu_report), max_time="5:00")
    run_fleet(envcheck=["envcheck"], run=short)
    unlimited = FakeSlurm("n1:idle", reports(cpu_report))
    run_fleet(envcheck=["envcheck"], run=unlimited)
    assert short.times == [5] and unlimited.times == [14]


def test_over_max_nodes_the_nodes_go_in_groups_of_max_nodes(cpu_report):
    """MaxNodes=2 (sinfo's job size `1-2`): five nodes in three allocations (one of five would
    be queued for ever), held at the same time: the three steps run together (each waits
    until all three have started; one after another, the first would wait in vain). Every
    node reports; every allocation is released."""
    together = threading.Barrier(3, timeout=10)

    def step(nodes, output):
        together.wait()
        return reports(cpu_report)(nodes, output)

    slurm = FakeSlurm(",".join(f"n{i}:idle" for i in range(1, 6)), step, job_size="1-2")
    rows = run_fleet(envcheck=["envcheck"], run=slurm)
    assert sorted(slurm.allocations) == ["n1,n2", "n3,n4", "n5"]
    assert sorted(slurm.calls) == sorted(["sinfo"] + ["salloc", "srun", "scancel"] * 3)
    assert slurm.most_held == 3 and not slurm.held
    assert [(r.node, r.status) for r in rows] == [(f"n{i}", "reported") for i in range(1, 6)]


def test_under_a_limit_on_the_users_jobs_the_batches_run_in_turn(cpu_report):
    """MaxJobsPerUser=1: of three allocations asked for together, two wait and give up, with
    nothing in salloc's words to tell a job limit from busy nodes. Those batches are asked
    for again alone once the first is released: every node reports, n2 (mix) is not blamed
    for the wait, and no allocation is left behind."""
    def step(nodes, output):  # the batch that got the one job holds it until both waits end
        if not slurm.steps[1:]:
            assert all(slurm.turned_away.acquire(timeout=10) for _ in range(2))
        return reports(cpu_report)(nodes, output)

    slurm = FakeSlurm("n1:idle,n2:mix,n3:idle,n4:idle,n5:idle", step, job_size="1-2",
                      max_jobs=1)
    rows = run_fleet(envcheck=["envcheck"], run=slurm)
    assert sorted(slurm.allocations[:3]) == ["n1,n2", "n3,n4", "n5"]
    assert len(slurm.allocations) == 5 and slurm.most_held == 1 and not slurm.held
    assert [(r.node, r.status) for r in rows] == [(f"n{i}", "reported") for i in range(1, 6)]


def test_more_batches_than_run_at_once(cpu_report, monkeypatch):
    """Twelve batches of one node, at most four allocations held at a time."""
    monkeypatch.setattr(slurm_module, "BATCHES_AT_ONCE", 4)
    slurm = FakeSlurm(",".join(f"n{i}:idle" for i in range(12)), reports(cpu_report),
                      job_size="1")
    rows = run_fleet(envcheck=["envcheck"], run=slurm)
    assert len(slurm.allocations) == 12 and slurm.most_held <= 4 and not slurm.held
    assert [(r.node, r.status) for r in rows] == [(f"n{i}", "reported") for i in range(12)]


def test_a_stop_signal_releases_every_allocation_and_starts_no_other_batch(cpu_report,
                                                                            monkeypatch):
    """Ctrl-C or SIGTERM while four of twelve batches run: their allocations are cancelled
    (which ends their steps), each once, and the eight waiting batches never allocate.
    Before, the main thread waited for the running steps to end by themselves (up to the
    smoke's timeout), and a second signal left their allocations (salloc --no-shell) held
    until their time limit."""
    import os
    import signal

    from envcheck.process import Interrupted

    def step(nodes, output):  # runs until its allocation is cancelled (or 3 s have passed)
        with slurm.lock:
            if len(slurm.held) == 4 and not fired:
                fired.append(True)
                os.kill(os.getpid(), signal.SIGUSR1)
        deadline = time.monotonic() + 3
        while slurm.held and time.monotonic() < deadline:
            time.sleep(0.01)
        ended.append("cancelled" if not slurm.held else "ran its course")
        return reports(cpu_report)(nodes, output)

    monkeypatch.setattr(slurm_module, "BATCHES_AT_ONCE", 4)
    slurm, fired, ended = FakeSlurm(",".join(f"n{i}:idle" for i in range(12)), step,
                                    job_size="1"), [], []
    with interrupting(signal.SIGUSR1), pytest.raises(Interrupted):
        run_fleet(envcheck=["envcheck"], run=slurm)
    assert fired and len(slurm.allocations) == 4 and not slurm.held
    # (a batch whose allocation came as the stop did runs no step: 3 or 4 steps ran)
    assert set(ended) == {"cancelled"} and slurm.calls.count("scancel") == 4


@pytest.mark.parametrize("text, most", [("1-infinite", None), ("1-4", 4), ("2", 2),
                                        ("0-infinite", None), ("n/a", None), ("", None)])
def test_sinfo_job_sizes(text, most):
    assert slurm_max_nodes(text) == most


# sinfo -N of a cluster whose default partition `cpu` holds n1-n2, and `gpu` n2-n4 with a
# 5-minute MaxTime and MaxNodes=2; `old` (down) holds n4 and n5 (format as in list_nodes).
PARTITIONED = """\
n1|idle|cpu*|up|infinite|1-infinite|none
n2|idle|cpu*|up|infinite|1-infinite|none
n2|idle|gpu|up|5:00|1-2|none
n3|idle|gpu|up|5:00|1-2|none
n4|idle|old|down|infinite|1-infinite|none
n4|idle|gpu|up|5:00|1-2|none
n5|idle|old|down|infinite|1-infinite|none
"""


def test_each_node_runs_in_a_partition_of_its_own(cpu_report):
    """salloc in the default partition refuses nodes outside it: each node goes to the
    default partition where it is in it (n2), else to the first partition that is up (n4
    skips the down `old`), with that partition's MaxTime and MaxNodes. A node whose only
    partition is down is a row that says so, without asking salloc to wait for it."""
    slurm = FakeSlurm("", reports(cpu_report), sinfo=PARTITIONED)
    rows = run_fleet(envcheck=["envcheck"], run=slurm)
    assert sorted(zip(slurm.partitions, slurm.allocations, slurm.times, strict=True)) == [
        ("cpu", "n1,n2", 14), ("gpu", "n3,n4", 5)]
    status = {r.node: r.status for r in rows}
    assert status == {"n1": "reported", "n2": "reported", "n3": "reported",
                      "n4": "reported", "n5": "down"}
    assert [r.detail for r in rows if r.node == "n5"] == [
        "partition old is down: no job can start there "
        "(`scontrol update partitionname=old state=up`)"]


def test_a_request_over_a_partition_limit_blames_no_node():
    """Queued for a partition limit (Slurm words it so, then times out like a wait for
    resources): the partly used nodes are not blamed, nothing is retried, and the row says
    which limit to look at."""
    queued = RunResult(1, "", "salloc: Requested partition configuration not available now\n"
                              "salloc: Pending job allocation 1\nsalloc: job 1 queued and "
                              "waiting for resources\nsalloc: error: Unable to allocate "
                              "resources: Connection timed out\n")  # real, Slurm 22.05
    slurm = FakeSlurm("n1:idle,n2:mix", salloc=lambda nodelist: queued)
    rows = run_fleet(envcheck=["envcheck"], nodes="n[1-2]", run=slurm)
    assert slurm.calls == ["sinfo", "sinfo", "salloc"]
    assert {r.status for r in rows} == {"no-report"}
    assert "over one of the partition's limits" in rows[0].detail
    assert "scontrol show partition" in rows[0].detail


def test_an_allocation_refused_is_a_row_per_node():
    busy = RunResult(1, "", "salloc: error: Unable to allocate resources: Requested nodes are "
                            "busy\n")
    slurm = FakeSlurm("n1:idle,n2:idle", salloc=lambda nodelist: busy)
    rows = run_fleet(envcheck=["envcheck"], run=slurm)
    assert slurm.calls == ["sinfo", "salloc"]
    assert [(r.status, r.detail) for r in rows] == [
        ("no-report", "salloc: error: Unable to allocate resources: Requested nodes are busy")] * 2


def test_thousand_nodes_are_grouped_not_listed(cpu_report, gpu_report):
    fleet = summarize(synthetic_fleet(cpu_report, gpu_report, 1000), "slurm", seconds=1.0)
    jsonschema.validate(to_json(fleet), SCHEMA)
    assert fleet.node_count == 1000 and not fleet.ok
    assert fleet.totals == {"cpu-fallback": 300, "drained": 100, "gpu": 600}
    assert [g.count for g in fleet.groups] == [600, 300, 100]
    lines = render(fleet).splitlines()
    assert len(lines) < 15 and "--all prints every node" in lines[0]
    assert "300 × cpu-fallback — first failed host.gpu" in "\n".join(lines)
    assert len(render(fleet, show_all=True).splitlines()) > 1000


def test_every_node_gpu_is_ok_and_require_gpu_is_strict(cpu_report, gpu_report):
    rows = [from_report("n1", gpu_report), from_report("n2", cpu_report)]
    assert summarize(rows, "slurm").ok is True
    assert summarize(rows, "slurm", require_gpu=True).ok is False


def test_manifests_validate_against_the_kubernetes_schema():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for kind in ("daemonset", "job"):
        text = k8s.render(kind, "registry.example/envcheck:1", "gpu-checks", nodes=4,
                          runtime_class="nvidia")
        docs = list(yaml.safe_load_all(text))
        for doc in docs:
            kubernetes_validate.validate(doc, "1.32.0", strict=True)
        workload = docs[1]
        pod = workload["spec"]["template"]["spec"]
        assert workload["metadata"]["namespace"] == "gpu-checks"
        assert pod["runtimeClassName"] == "nvidia"
        container = pod["containers"][0]
        assert container["image"] == "registry.example/envcheck:1"
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert "--json" in " ".join(container["command"])
        if kind == "job":
            assert workload["spec"]["completions"] == workload["spec"]["parallelism"] == 4


def test_a_broken_manifest_is_caught():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    doc = list(yaml.safe_load_all(k8s.render("job", "x", "ns")))[1]
    doc["spec"]["completions"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, "1.32.0", strict=True)


class RecordedCoreV1:
    """CoreV1Api's two calls answered from recorded payloads, deserialized by the real client."""

    def __init__(self, logs: dict[str, str]):
        from kubernetes.client import ApiClient

        self.client = ApiClient()
        self.logs = logs

    def _deserialize(self, payload: dict, kind: str):
        return self.client.deserialize(json.dumps(payload), kind, "application/json")

    def list_namespaced_pod(self, namespace, label_selector):
        assert label_selector == k8s.SELECTOR
        return self._deserialize(json.loads((FIXTURES / "k8s-pods.json").read_text()),
                                 "V1PodList")

    def list_node(self, label_selector):
        names = ["gpu-node-1", "gpu-node-2", "gpu-node-3", "gpu-node-4", "gpu-node-5"]
        return self._deserialize({"kind": "NodeList", "apiVersion": "v1", "metadata": {},
                                  "items": [{"metadata": {"name": n}} for n in names]},
                                 "V1NodeList")

    def read_namespaced_pod_log(self, name, namespace, container):
        assert container == k8s.CONTAINER
        return self.logs[name]


def test_k8s_collect_builds_the_same_table(cpu_report, gpu_report):
    pytest.importorskip("kubernetes")
    logs = {"envcheck-gpu-smoke-7xk2p": json.dumps(gpu_report, indent=2),
            "envcheck-gpu-smoke-m4q9z": "WARNING: jax noise\n" + json.dumps(cpu_report),
            "envcheck-gpu-smoke-zt5wd": (FIXTURES / "k8s-log_envcheck-gpu-smoke-zt5wd.txt")
            .read_text()}
    rows = {r.node: r for r in k8s.collect(RecordedCoreV1(logs), "envcheck")}
    assert rows["gpu-node-1"].verdict == "gpu" and rows["gpu-node-1"].gpus == 1
    assert rows["gpu-node-2"].verdict == "cpu-fallback"
    pending = rows["(unscheduled) envcheck-gpu-smoke-qq8rt"]
    assert pending.status == "pending" and "Insufficient nvidia.com/gpu" in pending.detail
    assert rows["gpu-node-4"].status == "no-report"
    assert rows["gpu-node-4"].detail.startswith("CrashLoopBackOff")
    assert rows["gpu-node-3"].detail.startswith("no envcheck pod")
    fleet = summarize(list(rows.values()), "kubernetes")
    jsonschema.validate(to_json(fleet), SCHEMA)
    assert fleet.totals == {"cpu-fallback": 1, "gpu": 1, "no-report": 3, "pending": 1}


def test_k8s_collect_without_a_cluster_is_one_line(monkeypatch, tmp_path):
    pytest.importorskip("kubernetes")
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    outcome = CliRunner().invoke(cli, ["fleet", "k8s", "collect"])
    assert outcome.exit_code == 2 and outcome.output.startswith("Error: no Kubernetes config")
    assert len(outcome.output.strip().splitlines()) == 1


def test_slurm_without_a_controller_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "absent.conf"))
    outcome = CliRunner().invoke(cli, ["fleet", "slurm"])
    assert outcome.exit_code == 2
    assert outcome.output == f"Error: SLURM_CONF={tmp_path}/absent.conf does not exist: point it " \
        "at the cluster's slurm.conf (or unset it to use the default)\n"


@pytest.mark.parametrize("args, named", [
    (["--image", ""], "'' is not an image reference"),
    (["--image", "Registry.Example/Envcheck:1"], "is not an image reference"),
    (["--image", "docker-daemon:envcheck-dev"], "a kubelet can pull"),
    (["--namespace", "GPU_checks"], "'GPU_checks' is not a Kubernetes name"),
    (["--namespace", "-gpu"], "starting and ending with a letter or digit"),
    (["--namespace", "n" * 64], "at most 63 characters"),
    (["--runtime-class", "Nvidia"], "in dot-separated parts"),
])
def test_k8s_render_refuses_what_the_api_server_would(args, named):
    """Refused before anything is applied: one line, exit 2, naming the value."""
    outcome = CliRunner().invoke(cli, ["fleet", "k8s", "render", *args], prog_name="envcheck")
    assert outcome.exit_code == 2 and outcome.stdout == "", outcome.output
    assert outcome.stderr.count("\n") == 1 and named in outcome.stderr, outcome.stderr


def test_k8s_render_takes_valid_names():
    image = "registry.example:5000/gpu/envcheck@sha256:" + "a" * 64
    outcome = CliRunner().invoke(cli, ["fleet", "k8s", "render", "--image", image, "--namespace",
                                       "gpu-checks-2", "--runtime-class", "nvidia.example.com"])
    assert outcome.exit_code == 0, outcome.output
    docs = list(yaml.safe_load_all(outcome.stdout))
    assert docs[0]["metadata"]["name"] == "gpu-checks-2"
    assert docs[1]["spec"]["template"]["spec"]["runtimeClassName"] == "nvidia.example.com"


def test_k8s_collect_with_a_report_of_another_shape(cpu_report, gpu_report):
    pytest.importorskip("kubernetes")
    logs = {"envcheck-gpu-smoke-7xk2p": json.dumps(planted(gpu_report, "host", "gpu-node-1")),
            "envcheck-gpu-smoke-m4q9z": json.dumps(cpu_report),
            "envcheck-gpu-smoke-zt5wd": ""}
    rows = {r.node: r for r in k8s.collect(RecordedCoreV1(logs), "envcheck")}
    assert rows["gpu-node-2"].verdict == "cpu-fallback"
    assert rows["gpu-node-1"].status == "no-report"
    assert rows["gpu-node-1"].detail.startswith(
        "unreadable gpu-smoke report (host: expected an object, got a string)")
