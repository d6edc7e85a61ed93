"""`envcheck fleet slurm`: gpu-smoke on every node through Slurm itself — `sinfo` for the nodes
and their states, one allocation of the available ones (`salloc --no-shell --no-kill`; one per
partition, each node in its default-first partition, and at most MaxNodes nodes each; up to
BATCHES_AT_ONCE of them at the same time), one `srun --ntasks-per-node=1` step in it (each
task runs `envcheck gpu-smoke --json`: in the container where the node has Docker, on the host
otherwise), one output file per node (`%n`), then the aggregation; the allocation is released
at the end. Drained or down nodes, nodes whose task never reported and a step that timed
out are rows with that status, never silence.

A node that cannot be launched on (its slurmd died, and slurmctld has not noticed yet) makes
srun abort the whole step, killing the tasks on healthy nodes too. Those nodes run once more in
a second step of the same allocation without the failed ones (at once: a new allocation would
wait for the dead node to time out), so one dead node does not hide the others.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

from envcheck import runner as runner_module
from envcheck.fleet import drain
from envcheck.fleet.aggregate import (
    NodeAction,
    NodeResult,
    from_report,
    parse_report,
    report_node,
)
from envcheck.fleet.sinfo import (
    Partition,
    availability,
    base_state,
    list_nodes,
    mix_without_room,
    slurm_env,
)
from envcheck.runner import RC_TIMEOUT, Runner

NO_REASON = {"busy": "every CPU or GPU is taken by running jobs (or reserved)"}
TASK_ERROR_RE = re.compile(r"(?:error: (\S+): task \d+: (.+)|failed on node (\S+): (.+))$",
                           re.MULTILINE)
LAUNCH_FAILED_RE = re.compile(r"Task launch for \S+ failed on node (\S+):")
GRANTED_RE = re.compile(r"Granted job allocation (\d+)")
STEP_SLACK_S = 60.0
IMMEDIATE_S = 30  # how long salloc may wait for the nodes
RERUN_MARGIN_S = 120.0
PARTITION_LIMIT = "Requested partition configuration not available now"
BATCHES_AT_ONCE = 8  # allocations in flight together (each thread only waits on salloc/srun)


def smoke_argv(envcheck: list[str], image: str | None, timeout_s: float,
               no_container: bool = False) -> list[str]:
    argv = [*envcheck, "gpu-smoke", "--json", "--timeout-s", f"{timeout_s:g}"]
    return argv + (["--image", image] if image else []) + (
        ["--no-container"] if no_container else [])


def run_fleet(*, partition: str | None = None, nodes: str | None = None,
              gres: str | None = None, image: str | None = None, timeout_s: float = 600.0,
              no_container: bool = False, envcheck: list[str] | None = None,
              run: Runner | None = None) -> list[NodeResult]:
    run = run or runner_module.run
    envcheck = envcheck or [sys.executable, "-m", "envcheck"]
    listed = list_nodes(partition, nodes, run)
    status = {node.name: availability(node.state) for node in listed}
    results = [NodeResult(node.name, status[node.name], detail=f"{node.state}: "
                          f"{node.reason or NO_REASON.get(status[node.name], '')}")
               for node in listed if status[node.name]]
    mixed = {node.name for node in listed if base_state(node.state) == "mix"}
    full = mix_without_room(sorted(mixed), gres, run) if mixed else {}
    results += [NodeResult(name, "busy", detail=f"mix: {why}") for name, why in full.items()]
    groups: dict[Partition, list[str]] = {}
    for node in listed:
        if not status[node.name] and node.name not in full:
            groups.setdefault(node.partition, []).append(node.name)
    batches: list[tuple[list[str], Placement]] = []
    for home, ready in groups.items():
        if not home.up:  # salloc would wait out IMMEDIATE_S and say only "timed out"
            results += [NodeResult(name, "down", detail=f"partition {home.name} is "
                                   f"{home.avail}: no job can start there (`scontrol update "
                                   f"partitionname={home.name} state=up`)") for name in ready]
            continue
        placement = Placement(home.name, gres, home.max_time_s)
        size = home.max_nodes or len(ready)  # over MaxNodes Slurm would queue it for ever
        batches += [(ready[start:start + size], placement)
                    for start in range(0, len(ready), size)]
    smoke = smoke_argv(envcheck, image, timeout_s, no_container)
    return results + run_batches(batches, mixed, smoke, timeout_s + STEP_SLACK_S, run)


def run_batches(batches: list[tuple[list[str], Placement]], mixed: set[str],
                smoke: list[str], limit_s: float, run: Runner) -> list[NodeResult]:
    """Each batch (a partition's nodes, MaxNodes at most) in an allocation of its own, up to
    BATCHES_AT_ONCE at the same time: the run takes as long as the slowest batch, not all of
    them in turn. A batch refused after waiting while others held theirs may have met a limit
    on the user's jobs (MaxJobsPerUser; salloc does not say which) rather than busy nodes:
    it is tried again alone once the others are done, as a lone batch always is. A stop signal
    (Ctrl-C, SIGTERM) releases every allocation held, which ends their steps, and starts no
    other batch."""
    held = Allocations(run)
    if len(batches) <= 1:
        return [row for ready, placement in batches
                for row in run_steps(ready, mixed, placement, smoke, limit_s, held)]
    pool = concurrent.futures.ThreadPoolExecutor(min(len(batches), BATCHES_AT_ONCE))
    try:
        together = list(pool.map(lambda batch: run_steps(
            batch[0], mixed, batch[1], smoke, limit_s, held, alone=False), batches))
    except BaseException:  # the main thread's Interrupted: the batches' threads carry on
        held.stop()
        pool.shutdown(cancel_futures=True)
        raise
    pool.shutdown()
    rows = []
    for (ready, placement), got in zip(batches, together, strict=True):
        rows += run_steps(ready, mixed, placement, smoke, limit_s, held) if got is None else got
    return rows


class Allocations:
    """The allocations held at a time, and the runner that makes and releases them. Each is
    released (scancel) once: by the batch that made it when done, or by `stop`, after which
    none is kept."""

    def __init__(self, run: Runner):
        self.run, self.stopped = run, False
        self._held: set[str] = set()
        self._lock = threading.Lock()

    def hold(self, job: str) -> bool:
        """Keep `job` until `release`; False (released now) once stopped."""
        with self._lock:
            if not self.stopped:
                self._held.add(job)
                return True
        self._cancel(job)
        return False

    def release(self, job: str) -> None:
        with self._lock:
            mine = job in self._held
            self._held.discard(job)
        if mine:
            self._cancel(job)

    def stop(self) -> None:
        with self._lock:
            self.stopped, jobs = True, sorted(self._held)
            self._held.clear()
        for job in jobs:
            self._cancel(job)

    def _cancel(self, job: str) -> None:
        self.run(["scancel", job], 30.0, env=slurm_env())


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where the allocation goes: the nodes' partition, GRES as asked, the partition's
    MaxTime."""

    partition: str
    gres: str | None
    max_time_s: float | None = None


def run_steps(ready: list[str], mixed: set[str], placement: Placement, smoke: list[str],
              limit_s: float, held: Allocations, alone: bool = True) -> list[NodeResult] | None:
    """Allocate `ready`, run the step, re-run once the nodes a launch failure took down with
    it, release the allocation. When the allocation is refused and some nodes are partly in
    use (mix), those are the likely cause: they become busy rows and the rest is tried alone.
    Not `alone` (other batches allocating meanwhile), a refusal after waiting is None: the
    wait may be for the user's other jobs, so nothing is concluded about these nodes."""
    # A re-run follows an aborted step, which ends within seconds: a margin is enough for it
    # (and a long --time would trip partitions' MaxTime).
    job, why, waited = allocate(ready, placement, limit_s + RERUN_MARGIN_S, held.run)
    if job is None and waited and not alone:
        return None
    if job is None and waited and mixed & set(ready):
        rest = [name for name in ready if name not in mixed]
        rows = {row.node: row for row in (
            run_steps(rest, set(), placement, smoke, limit_s, held) if rest else [])}
        partly = f"mix: partly in use; Slurm could not fit the check there in {IMMEDIATE_S} s"
        return [rows.get(name) or NodeResult(name, "busy", detail=partly) for name in ready]
    if job is None:
        return [NodeResult(name, "no-report", detail=why) for name in ready]
    if not held.hold(job):  # stopped while salloc waited
        return []
    try:
        rows, launch_failed = run_step(job, ready, smoke, limit_s, held.run)
        lost = [row.node for row in rows if row.status == "no-report"
                and row.node not in launch_failed] if launch_failed else []
        if lost and not held.stopped:  # once: a second launch failure leaves its rows
            again, _ = run_step(job, lost, smoke, limit_s, held.run)
            rerun = {row.node: row for row in again}
            rows = [rerun.get(row.node, row) for row in rows]
        return rows
    finally:
        held.release(job)


def allocate(ready: list[str], placement: Placement, limit_s: float,
             run: Runner) -> tuple[str | None, str, bool]:
    """(job id, "", _) of an allocation holding one task slot on each node, or (None, why not,
    whether Slurm accepted the request and only waited for free resources). --no-kill keeps
    it when a node fails, so the healthy nodes can run another step. The time asked for is
    cut to the partition's MaxTime: over it, Slurm would queue the job for ever (reason
    PartitionTimeLimit) or refuse it (EnforcePartLimits)."""
    minutes = int(limit_s // 60) + 1
    if placement.max_time_s is not None:
        minutes = max(1, min(minutes, int(placement.max_time_s // 60)))
    argv = ["salloc", "--no-shell", "--no-kill", f"--nodes={len(ready)}",
            "--ntasks-per-node=1", f"--nodelist={','.join(ready)}", f"--immediate={IMMEDIATE_S}",
            f"--time={minutes}", "--job-name=envcheck-fleet"]
    argv.append(f"--partition={placement.partition}")
    argv += [f"--gres={placement.gres}"] if placement.gres else []
    done = run(argv, 60.0, env=slurm_env())
    granted = GRANTED_RE.search(done.err or "")
    if done.rc == 0 and granted:
        return granted.group(1), "", False
    err = done.err or ""
    if PARTITION_LIMIT in err:  # queued for ever, not for resources: no node is to blame
        return None, (f"salloc: {PARTITION_LIMIT.lower()}: the request is over one of the "
                      "partition's limits (MaxNodes, MaxTime, …) or the partition is not up: "
                      "`scontrol show partition`"), False
    why = _last_line(err or done.out) or f"salloc failed (exit code {done.rc})"
    return None, why, "waiting for resources" in err


def run_step(job: str, ready: list[str], smoke: list[str], limit_s: float,
             run: Runner) -> tuple[list[NodeResult], set[str]]:
    """One srun step over `ready` in allocation `job`: its rows, and the nodes srun could not
    launch on."""
    with tempfile.TemporaryDirectory(prefix="envcheck-fleet-") as folder:
        out = Path(folder)
        argv = ["srun", f"--jobid={job}", f"--nodes={len(ready)}", "--ntasks-per-node=1",
                f"--nodelist={','.join(ready)}", "--kill-on-bad-exit=0",
                f"--output={out}/node-%n.out", f"--error={out}/node-%n.err"]
        step = run(argv + smoke, limit_s, env=slurm_env())
        by_index = {i: _read(out / f"node-{i}.out") for i in range(len(ready))}
        errors = {i: _read(out / f"node-{i}.err") for i in range(len(ready))}
    launch_failed = set(LAUNCH_FAILED_RE.findall(step.err or ""))
    return collect_step(ready, by_index, errors, step.rc, step.err), launch_failed


def collect_step(ready: list[str], outputs: dict[int, str], errors: dict[int, str], rc: int,
                 srun_err: str) -> list[NodeResult]:
    """Rows from the per-node files: a report names its node; a node without one gets the
    reason srun or its own stderr gave."""
    reports = {}
    for index, text in outputs.items():
        report = parse_report(text)
        if report is not None:
            name = report_node(report) or ready[index]
            reports[name if name in ready else ready[index]] = report
    task_errors = {m.group(1) or m.group(3): (m.group(2) or m.group(4)).strip()
                   for m in TASK_ERROR_RE.finditer(srun_err)}
    step_failed = _last_line(srun_err) if rc != 0 else ""
    rows = []
    for index, name in enumerate(ready):
        if name in reports:
            rows.append(from_report(name, reports[name]))
            continue
        why = (task_errors.get(name) or _last_line(errors.get(index, "")) or step_failed
               or "the task printed no gpu-smoke report")
        status = "timeout" if rc == RC_TIMEOUT or "time limit" in why.lower() else "no-report"
        rows.append(NodeResult(name, status, detail=why))
    return rows


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def act(rows: list[NodeResult], partition: str | None, nodes: str | None, require_gpu: bool,
        dry_run: bool, run: Runner | None = None) -> list[NodeAction]:
    """--drain: drain the failed nodes, resume those envcheck drained that passed (drain.py)."""
    run = run or runner_module.run
    return drain.drain_fleet(rows, lambda: list_nodes(partition, nodes, run),
                             lambda argv, timeout_s: run(argv, timeout_s, env=slurm_env()),
                             require_gpu, dry_run)


def timed_fleet(**options) -> tuple[list[NodeResult], float]:
    start_s = time.perf_counter()
    rows = run_fleet(**options)
    return rows, time.perf_counter() - start_s
