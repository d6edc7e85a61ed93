"""What `fleet slurm` asks Slurm before it allocates anything: the nodes, their states and
partitions (`sinfo -N`), the partitions' limits, which partly used nodes have no room for the
check (`sinfo -O GresUsed`), and the environment salloc and srun get (without a surrounding
job's context)."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from envcheck.errors import UnreadableInput
from envcheck.runner import Runner

UNAVAILABLE = {"drain": "drained", "drng": "drained", "drained": "drained", "down": "down",
               "fail": "down", "failg": "down", "maint": "down", "unk": "down", "no_respond":
               "down", "futr": "down", "boot": "down", "powered_down": "down",
               "alloc": "busy", "allocated": "busy", "comp": "busy", "completing": "busy",
               "resv": "busy", "reserved": "busy"}

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


class SlurmError(UnreadableInput):
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
