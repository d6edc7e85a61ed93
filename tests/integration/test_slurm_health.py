"""`envcheck gpu-smoke --health-check` as slurmd's HealthCheckProgram, for real: a one-node local
Slurm cluster (scripts/fake_slurm_cluster.sh) whose slurm.conf names a wrapper as the program,
run every 2 s by slurmd itself. While the failure is there — a check that cannot finish in its
budget (here 5 s, which the model test cannot meet) — slurmd's runs end within the budget and
drain the node saying what timed out; once it is gone (the wrapper's normal budget) the next run
passes and resumes the node. That an admin's drain is never lifted is tested on the
same decisions in tests/unit/test_drain.py and under Slurm in test_fleet_slurm.py."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.conftest import REPO
from tests.integration.conftest import slurm_cluster

BASE_PORT = 17500
WRAPPER = """#!/bin/sh
# slurmd's HealthCheckProgram in the test: the flag file says whether a GPU is required
export SLURM_CONF={conf} PYTHONPATH={repo}
flags="--no-container --budget-s 50"
[ -e {folder}/hang ] && flags="--no-container --budget-s 5"
echo "run $(date +%s) node=$SLURMD_NODENAME" >> {folder}/health.log
exec {python} -m envcheck gpu-smoke --health-check $flags >> {folder}/health.log 2>&1
"""


def state(env: dict) -> tuple[str, str]:
    done = subprocess.run(["sinfo", "-h", "-N", "-n", "n1", "-o", "%t|%E"], env=env,
                          capture_output=True, text=True, check=True, timeout=30)
    found, _, reason = done.stdout.strip().partition("|")
    return found, reason


def wait_for(env: dict, wanted, folder, limit_s: float = 150.0) -> tuple[str, str]:
    deadline = time.monotonic() + limit_s
    while not wanted(now := state(env)):
        assert time.monotonic() < deadline, (now, log(folder)[-2000:])
        time.sleep(1)
    return now


def checks(folder) -> list[str]:
    """The lines of the health checks that ran (not those that found another one running)."""
    return [line for line in log(folder).splitlines()
            if line.startswith("envcheck health check on n1: ") and "another one" not in line]


def log(folder) -> str:
    path = folder / "health.log"
    return path.read_text() if path.exists() else ""


@pytest.fixture(scope="module")
def health_cluster(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slurm-health")
    wrapper = folder / "health-check.sh"
    wrapper.write_text(WRAPPER.format(conf=folder / "etc/slurm.conf", repo=REPO, folder=folder,
                                      python=sys.executable))
    wrapper.chmod(0o755)
    (folder / "hang").touch()
    extra = (f"HealthCheckProgram={wrapper}\nHealthCheckInterval=2\n"
             "HealthCheckNodeState=ANY")
    with slurm_cluster(folder, 1, BASE_PORT, extra) as env:
        yield folder, env


def test_slurmd_runs_the_health_check_which_drains_then_resumes(health_cluster):
    folder, env = health_cluster
    start_s = time.monotonic()
    drained = wait_for(env, lambda s: s[0].startswith("drain"), folder)
    # gpu-smoke's own limit (the budget less 5 s for sinfo and scontrol) or, failing that, the
    # kill at the budget: either way the node is drained saying what timed out, within seconds
    assert drained[1] in ("envcheck: model.run: the model test timed out",
                          "envcheck: health check timed out"), (drained, log(folder))
    assert time.monotonic() - start_s < 60
    assert "node=n1" in log(folder) and "drain done" in log(folder)
    (folder / "hang").unlink()  # the failure is gone
    resumed = wait_for(env, lambda s: not s[0].startswith("drain"), folder)
    assert resumed[1] in ("", "none"), resumed
    assert "envcheck health check on n1: gpu-smoke cpu-fallback (first failed host.gpu); " \
           "resume done" in log(folder)
