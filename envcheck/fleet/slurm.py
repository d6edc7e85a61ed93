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
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

from envcheck import runner as runner_module
from envcheck.fleet.aggregate import NodeResult, from_report, parse_report, report_node
from envcheck.runner import RC_TIMEOUT, Runner

UNAVAILABLE = {"drain": "drained", "drng": "drained", "drained": "drained", "down": "down",
               "fail": "down", "failg": "down", "maint": "down", "unk": "down", "no_respond":
               "down", "futr": "down", "boot": "down", "powered_down": "down",
               "alloc": "busy", "allocated": "busy", "comp": "busy", "completing": "busy",
               "resv": "busy", "reserved": "busy"}
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


# Slurm settings of the user's own; every other SLURM_* variable is the context of a job this
# command may be running in (SLURM_JOB_ID, SLURM_NNODES, SLURM_NTASKS, …), which srun and
# salloc would take as options: inside an sbatch job the step would land in that job's nodes.
SLURM_KEEP = {"SLURM_CONF", "SLURM_ACCOUNT", "SLURM_QOS", "SLURM_CLUSTERS", "SLURM_WCKEY",
              "SLURM_TIME_FORMAT"}


def slurm_env() -> dict[str, str]:
    """This environment without a surrounding job's context, for salloc, srun and scancel."""
    return {k: v for k, v in os.environ.items()
            if not ((k.startswith("SLURM_") and k not in SLURM_KEEP)
                    or k == "SRUN_CPUS_PER_TASK")}


class SlurmError(Exception):
    """Slurm itself is not usable (no sinfo, no controller, no such partition/node)."""


@dataclasses.dataclass(frozen=True)
class Partition:
    """A partition as sinfo shows it: name (without the default's `*`), whether it is the
    default, its availability (up, down, drain, inact), MaxTime (s) and MaxNodes (None:
    unlimited)."""

    name: str
    default: bool = False
    avail: str = "up"
    max_time_s: float | None = None
    max_nodes: int | None = None

    @property
    def up(self) -> bool:
        return self.avail == "up"


@dataclasses.dataclass(frozen=True)
class Node:
    """One node: its state, the reason an admin gave, and the partition its check goes to."""

    name: str
    state: str
    reason: str
    partition: Partition


def list_nodes(partition: str | None, nodes: str | None, run: Runner) -> list[Node]:
    """The nodes in Slurm's node order. Each goes to the partition named, else the default
    partition where the node is in it, else the first partition that lists it (up ones
    first): salloc in the default partition refuses a node outside it."""
    conf = os.environ.get("SLURM_CONF")
    if conf and not Path(conf).is_file():  # sinfo would retry for a minute
        raise SlurmError(f"SLURM_CONF={conf} does not exist: point it at the cluster's "
                         "slurm.conf (or unset it to use the default)")
    argv = ["sinfo", "-h", "-N", "-o", "%N|%t|%P|%a|%l|%s|%E"]
    argv += ["-p", partition] if partition else []
    argv += ["-n", nodes] if nodes else []
    result = run(argv, 30.0)
    if result.rc != 0:
        text = (result.err or result.out).strip().splitlines()
        raise SlurmError(f"sinfo failed: {text[-1] if text else f'exit code {result.rc}'}: "
                         "is slurmctld up and SLURM_CONF set?")
    rows: dict[str, tuple[str, str]] = {}
    homes: dict[str, list[Partition]] = {}
    for line in result.out.splitlines():
        name, state, part, up, limit, size, reason = (line.split("|", 6) + [""] * 6)[:7]
        if not name:
            continue
        reason = reason.strip()
        rows.setdefault(name, (state.strip(), "" if reason == "none" else reason))
        homes.setdefault(name, []).append(Partition(
            part.strip().rstrip("*"), part.strip().endswith("*"), up.strip(),
            slurm_time_s(limit), slurm_max_nodes(size)))
    if not rows:
        raise SlurmError(f"no nodes match (partition {partition or 'any'}, nodes "
                         f"{nodes or 'all'}): check with `sinfo -N`")
    return [Node(name, state, reason, _home(homes[name])) for name, (state, reason)
            in rows.items()]


def _home(partitions: list[Partition]) -> Partition:
    """The default partition if it is up, else the first one up, else the first."""
    return min(partitions, key=lambda p: (not p.up, not p.default))


def slurm_max_nodes(text: str) -> int | None:
    """The most nodes of sinfo's job size (%s: `1-infinite`, `1-4`, or `2` where MinNodes
    equals MaxNodes); None for unlimited or anything else."""
    most = text.strip().rpartition("-")[2]
    return int(most) if most.isdigit() and int(most) > 0 else None


def slurm_time_s(text: str) -> float | None:
    """sinfo's time limit (`5:00` m:s, `1:30:00`, `1-02:03:00`) in seconds; None for
    `infinite` or anything else."""
    days, _, clock = text.strip().rpartition("-")
    try:
        parts = [int(part) for part in clock.split(":")]
        whole_days = int(days) if days else 0
    except ValueError:
        return None
    if not 1 <= len(parts) <= 3:
        return None
    hours, minutes, seconds = ([0, 0] + parts)[-3:] if len(parts) > 1 else (0, parts[0], 0)
    return whole_days * 86400.0 + hours * 3600 + minutes * 60 + seconds


def base_state(state: str) -> str:
    """sinfo's short state without its flag suffixes (`*` not responding, `~` powered off, …)."""
    return state.rstrip("*~#!%$@^-").lower()


def availability(state: str) -> str | None:
    """None when srun can start a task there, else the row status (drained / down / busy)."""
    base = base_state(state)
    if state.endswith("*"):  # not responding
        return "down"
    return UNAVAILABLE.get(base)


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


def mix_without_room(mixed: list[str], gres: str | None, run: Runner) -> dict[str, str]:
    """The partly used nodes that sinfo already shows cannot take the check (no idle CPU, or
    fewer free GRES than asked for), with why; asking salloc for them would only wait out
    IMMEDIATE_S. Any other limit (memory, say) is still found by salloc. {} where sinfo
    cannot tell (no -O GresUsed before Slurm 19.05)."""
    result = run(["sinfo", "-h", "-N", "-n", ",".join(mixed), "-O",
                  "NodeList:|,CPUsState:|,Gres:|,GresUsed:|"], 30.0)
    if result.rc != 0:
        return {}
    wanted = _gres_request(gres) if gres else None
    full = {}
    for line in result.out.splitlines():
        name, cpus, configured, used = (line.split("|") + [""] * 3)[:4]
        idle = cpus.split("/")[1] if cpus.count("/") == 3 else ""
        if idle == "0":
            full[name] = f"no idle CPU (allocated/idle/other/total {cpus})"
        elif wanted is not None:
            kind, count = wanted
            total = _gres_count(configured, kind)
            free = total - _gres_count(used, kind)
            if total >= count > free:  # (a node with too few at all: salloc says so)
                full[name] = f"{free} {':'.join(kind)} free of {total}, {count} asked for"
    return full


def _gres_request(gres: str) -> tuple[tuple[str, ...], int] | None:
    """`gpu:2` / `gpu:a100:2` / `gpu` as ((name[, type]), count); None for anything else."""
    parts = gres.split(",")[0].split(":")
    count = int(parts.pop()) if len(parts) > 1 and parts[-1].isdigit() else 1
    return (tuple(parts), count) if 1 <= len(parts) <= 2 and parts[0] else None


def _gres_count(listed: str, kind: tuple[str, ...]) -> int:
    """How many of `kind` (name, or name and type) sinfo's Gres/GresUsed text lists:
    `gpu:2(S:0-1)`, `gpu:a100:1(IDX:0),gpu:v100:0(IDX:N/A)`, `(null)`."""
    total = 0
    for item in re.sub(r"\([^)]*\)", "", listed).split(","):
        parts = item.strip().split(":")
        if len(parts) < 2 or not parts[-1].isdigit() or parts[0] != kind[0]:
            continue
        if len(kind) == 1 or (len(parts) == 3 and parts[1] == kind[1]):
            total += int(parts[-1])
    return total


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


def timed_fleet(**options) -> tuple[list[NodeResult], float]:
    start_s = time.perf_counter()
    rows = run_fleet(**options)
    return rows, time.perf_counter() - start_s
