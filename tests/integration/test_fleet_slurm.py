"""`envcheck fleet slurm` on a real one-machine Slurm cluster (Debian's slurmctld + 3 slurmd
nodes n1-n3 with 2 fake GPUs each as GRES, a private munged; scripts/fake_slurm_cluster.sh),
stopped by pid at the end: one row per node, a drained node and a node whose slurmd died."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jsonschema
import pytest

from tests.conftest import REPO, with_signals
from tests.integration.conftest import slurm_cluster

SCHEMA = json.loads((REPO / "envcheck/data/schemas/fleet.v1.json").read_text())
BASE_PORT = 17300


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slurm")
    with slurm_cluster(folder, 3, BASE_PORT) as env:
        yield folder, env


def fleet(env: dict, *args: str) -> tuple[int, dict, float]:
    start_s = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "envcheck", "fleet", "slurm", "--json",
                           "--no-container", *args],
                          capture_output=True, text=True, timeout=900, check=False, env=env)
    seconds = time.perf_counter() - start_s
    assert "Traceback" not in done.stderr, done.stderr
    report = json.loads(done.stdout)
    jsonschema.validate(report, SCHEMA)
    return done.returncode, report, seconds


def scontrol(env: dict, *args: str) -> None:
    subprocess.run(["scontrol", *args], env=env, check=True, timeout=30)


def test_one_row_per_node_with_gres(cluster):
    _, env = cluster
    rc, report, seconds = fleet(env, "--gres", "gpu:1")
    print(f"fleet slurm on 3 nodes: {seconds:.1f} s from command to table")
    assert rc == 0 and report["ok"] and report["node_count"] == 3
    nodes = {n["node"]: n for n in report["nodes"]}
    assert sorted(nodes) == ["n1", "n2", "n3"]
    for row in nodes.values():
        assert row["status"] == "reported" and row["verdict"] == "cpu-fallback"
        assert row["cuda_visible_devices"] == "0"  # Slurm's GRES allocation reached the task
        assert row["first_failed"] == "host.gpu" and row["model_s"] > 0
    assert report["groups"][0] == {**report["groups"][0], "nodes": "n[1-3]", "count": 3}


def test_a_drained_node_is_a_row_and_drain_leaves_it_to_its_admin(cluster):
    """n3 drained by an admin is a row; with --require-gpu --drain on this GPU-less cluster n1
    and n2 fail and are drained with envcheck's marker, n3 stays as the admin left it."""
    _, env = cluster
    scontrol(env, "update", "nodename=n3", "state=drain", 'reason=envcheck test (RMA 4711)')
    try:
        before = node_states(env)
        rc, report, _ = fleet(env, "--timeout-s", "300", "--require-gpu", "--drain")
        after = node_states(env)
    finally:
        subprocess.run(["scontrol", "update", "nodename=n[1-3]", "state=resume"], env=env,
                       timeout=30, check=False)
    nodes = {n["node"]: n for n in report["nodes"]}
    assert rc == 1 and not report["ok"]
    assert nodes["n3"]["status"] == "drained" and "envcheck test" in nodes["n3"]["detail"]
    assert nodes["n1"]["verdict"] == nodes["n2"]["verdict"] == "cpu-fallback"
    assert report["totals"] == {"cpu-fallback": 2, "drained": 1}
    actions = {a["node"]: a for a in report["actions"]}
    for name in ("n1", "n2"):
        assert actions[name]["action"] == "drain" and actions[name]["done"], actions[name]
        state, reason = after[name]
        assert state.startswith("drain") and reason.startswith("envcheck: host.gpu: "), after
    assert after["n3"] == before["n3"] == ("drain", "envcheck test (RMA 4711)")
    assert actions["n3"]["action"] == "left drained" and actions["n3"]["argv"] == []


def node_states(env: dict) -> dict[str, tuple[str, str]]:
    """node -> (sinfo's short state, its reason), as `sinfo -N` shows them."""
    done = subprocess.run(["sinfo", "-h", "-N", "-o", "%N|%t|%E"], env=env, check=True,
                          capture_output=True, text=True, timeout=30)
    return {name: (state, reason) for name, state, reason in
            (line.split("|", 2) for line in done.stdout.splitlines())}


def drains(env: dict) -> dict[str, str | None]:
    """node -> its drain reason, None when not drained (the allocation the run just released
    may still show its node as completing: only the drain state and reason are compared)."""
    return {name: reason if state.startswith("drain") else None
            for name, (state, reason) in node_states(env).items()}


def test_dry_run_prints_the_commands_and_changes_nothing(cluster):
    _, env = cluster
    # the last test's allocation may still be completing, or its resume not yet done: a node
    # that is not idle is a busy row, with no verdict and so no action
    wait_for_states(env, {"n1": "idle", "n2": "idle", "n3": "idle"})
    before = drains(env)
    rc, report, _ = fleet(env, "--nodes", "n1", "--require-gpu", "--drain", "--dry-run",
                          "--timeout-s", "300")
    assert report["nodes"][0]["status"] == "reported", report["nodes"]
    assert rc == 1 and drains(env) == before == {"n1": None, "n2": None, "n3": None}
    assert [(a["node"], a["action"], a["done"]) for a in report["actions"]] == [
        ("n1", "drain", False)]
    assert report["actions"][0]["argv"][:4] == ["scontrol", "update", "NodeName=n1",
                                                "State=DRAIN"]


def test_run_from_inside_a_job(cluster):
    """The variables a surrounding sbatch job leaves (its id, one node, 64 tasks) would make
    srun use that job: the fleet run leaves them out, and both nodes report."""
    _, env = cluster
    inside = {**env, "SLURM_JOB_ID": "4242", "SLURM_NNODES": "1", "SLURM_NTASKS": "64",
              "SLURM_JOB_NODELIST": "n1", "SRUN_CPUS_PER_TASK": "2"}
    rc, report, _ = fleet(inside, "--nodes", "n1,n2", "--timeout-s", "300")
    assert rc == 0 and [n["status"] for n in report["nodes"]] == ["reported", "reported"]


def test_busy_nodes_are_rows_and_the_free_ones_run(cluster):
    """n3 taken whole by a job (alloc), n2 with both GPUs taken (mix): both are busy rows,
    n1 runs — the busy nodes do not hold the others back, and sinfo's GresUsed tells that n2
    has no room without waiting for salloc to give up."""
    _, env = cluster
    jobs = [sbatch(env, "-w", "n3", "--exclusive"), sbatch(env, "-w", "n2", "-n1",
                                                           "--gres=gpu:2")]
    try:
        wait_for_states(env, {"n2": "mix", "n3": "alloc"})
        rc, report, _ = fleet(env, "--gres", "gpu:1", "--timeout-s", "300")
    finally:
        subprocess.run(["scancel", *jobs], env=env, check=False, timeout=30)
        wait_for_states(env, {"n1": "idle", "n2": "idle", "n3": "idle"})
    nodes = {n["node"]: n for n in report["nodes"]}
    assert rc == 1 and nodes["n1"]["status"] == "reported"
    assert nodes["n3"]["status"] == "busy" and nodes["n3"]["detail"].startswith("alloc: ")
    assert nodes["n2"]["status"] == "busy"
    assert nodes["n2"]["detail"] == "mix: 0 gpu free of 2, 1 asked for"


def test_partition_limits(cluster):
    """MaxTime=5 (minutes): the allocation asks for 5 instead of the check's 14 and every node
    reports (over MaxTime Slurm would queue it for ever). MaxNodes=2: the three nodes go in
    two allocations (one of three would be queued for ever) and every node reports.
    MinNodes=4, which no check of 3 nodes can meet: Slurm queues the request for a partition
    limit; every row says so, and names where to look."""
    _, env = cluster
    rc, report = fleet_under_partition(env, "maxtime=5", "maxtime=INFINITE")
    assert rc == 0 and {n["status"] for n in report["nodes"]} == {"reported"}
    rc, report = fleet_under_partition(env, "maxnodes=2", "maxnodes=UNLIMITED")
    assert rc == 0 and {n["status"] for n in report["nodes"]} == {"reported"}
    assert report["node_count"] == 3
    rc, report = fleet_under_partition(env, "minnodes=4", "minnodes=0")
    assert rc == 1 and {n["status"] for n in report["nodes"]} == {"no-report"}
    assert all("partition's limits" in n["detail"] and "scontrol show partition" in n["detail"]
               for n in report["nodes"])


def test_nodes_outside_the_default_partition(cluster):
    """n3 only in partition `extra` (MaxTime 5): salloc in the default partition would refuse
    all three nodes; n3 runs in its own. With `extra` down, n3 is a row that says so at once
    (salloc would wait out --immediate and say only "Connection timed out")."""
    _, env = cluster
    scontrol(env, "update", "partitionname=debug", "nodes=n1,n2")
    scontrol(env, "create", "partitionname=extra", "nodes=n3", "maxtime=5")
    try:
        rc, report, _ = fleet(env, "--timeout-s", "300")
        assert rc == 0 and [n["status"] for n in report["nodes"]] == ["reported"] * 3
        scontrol(env, "update", "partitionname=extra", "state=down")
        rc, report, seconds = fleet(env, "--nodes", "n3")
    finally:
        scontrol(env, "delete", "partitionname=extra")
        scontrol(env, "update", "partitionname=debug", "nodes=ALL")
    assert rc == 1 and report["nodes"][0]["status"] == "down" and seconds < 20
    assert report["nodes"][0]["detail"].startswith("partition extra is down")


def fleet_under_partition(env: dict, setting: str, undo: str) -> tuple[int, dict]:
    """A fleet run with the partition's `setting`, put back with `undo` afterwards."""
    scontrol(env, "update", "partitionname=debug", setting)
    try:
        rc, report, _ = fleet(env)
    finally:
        scontrol(env, "update", "partitionname=debug", undo)
    return rc, report


def sbatch(env: dict, *args: str) -> str:
    done = subprocess.run(["sbatch", "--parsable", "-J", "envcheck-busy", "--output=/dev/null",
                           *args, "--wrap", "sleep 600"], env=env, capture_output=True,
                          text=True, check=True, timeout=30)
    return done.stdout.strip().split(";")[0]


def wait_for_states(env: dict, wanted: dict[str, str], limit_s: float = 60) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        listed = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=env,
                                capture_output=True, text=True, timeout=30).stdout.split()
        states = dict(zip(listed[::2], listed[1::2], strict=False))
        if all(states.get(node) == state for node, state in wanted.items()):
            return
        time.sleep(0.5)
    raise AssertionError(f"nodes never reached {wanted}: {states}")


def test_a_node_whose_slurmd_died_never_answers(cluster):
    folder, env = cluster
    pid = int((folder / "run/slurmd-n2.pid").read_text())
    os.kill(pid, 15)
    try:
        rc, report, _ = fleet(env, "--nodes", "n1,n2", "--timeout-s", "300")
    finally:
        subprocess.run(["slurmd", "-N", "n2"], env=env, check=True, timeout=30)
    nodes = {n["node"]: n for n in report["nodes"]}
    assert rc == 1 and nodes["n2"]["status"] == "no-report"
    assert "Communication connection failure" in nodes["n2"]["detail"]
    assert report["node_count"] == 2
    # srun aborted the step for n2 and killed n1's task with it; n1 ran again without n2
    assert nodes["n1"]["status"] == "reported" and nodes["n1"]["verdict"] == "cpu-fallback"


def fleet_until(env: dict, squeue_args: list[str]) -> subprocess.Popen:
    """`envcheck fleet slurm` started, once `squeue … squeue_args` lists something (after
    the allocations of earlier tests have ended: they stay a while as completing)."""
    deadline = time.monotonic() + 120
    while squeue(env):
        assert time.monotonic() < deadline, squeue(env)
        time.sleep(0.5)
    command = subprocess.Popen(
        with_signals([sys.executable, "-m", "envcheck", "fleet", "slurm", "--json",
                      "--no-container", "--timeout-s", "300"], {signal.SIGTERM: signal.SIG_DFL}),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not squeue(env, *squeue_args):
        assert time.monotonic() < deadline and command.poll() is None, command.communicate()
        time.sleep(0.2)
    return command


def squeue(env: dict, *args: str) -> str:
    return subprocess.run(["squeue", "-h", "-n", "envcheck-fleet", *args], env=env,
                          capture_output=True, text=True, timeout=30).stdout.strip()


def stopped(command: subprocess.Popen, env: dict) -> None:
    """SIGTERM to `command`: once it has exited, squeue lists no job of it pending or
    running (a cancelled one may still be completing), and it said so in one line with exit
    code 143."""
    command.send_signal(signal.SIGTERM)
    out, err = command.communicate(timeout=60)
    assert squeue(env, "-t", "PD,R") == ""
    assert command.returncode == 128 + signal.SIGTERM and out == ""
    assert err.splitlines() == [
        "Error: interrupted (SIGTERM): stopped before a verdict, nothing reported"]


def test_a_stop_signal_withdraws_the_allocation_salloc_waits_for(cluster):
    """SIGTERM while salloc waits (a maintenance starting in 5 minutes leaves no room for the
    check's time; sinfo still says idle): salloc gets SIGTERM and withdraws its pending job.
    envcheck used to die at once, leaving salloc waiting; SIGKILLed, salloc leaves the job
    queued, to be granted later and held until its time limit."""
    _, env = cluster
    scontrol(env, "create", "reservationname=envcheck-later", "starttime=now+300",
             "duration=10", "nodes=ALL", "users=root")
    try:
        stopped(fleet_until(env, ["-t", "PD"]), env)
    finally:
        subprocess.run(["scancel", "-n", "envcheck-fleet"], env=env, check=False, timeout=30)
        scontrol(env, "delete", "reservationname=envcheck-later")


def test_a_stop_signal_during_the_step_releases_the_allocation(cluster):
    """SIGTERM while the nodes run the check: the allocation is cancelled, which ends the
    step. envcheck used to die at once, leaving srun, its step and the allocation (salloc
    --no-shell: until its time limit) behind."""
    _, env = cluster
    try:
        stopped(fleet_until(env, ["-s"]), env)  # once a step is running
    finally:
        subprocess.run(["scancel", "-n", "envcheck-fleet"], env=env, check=False, timeout=30)
        wait_for_states(env, {"n1": "idle", "n2": "idle", "n3": "idle"})
