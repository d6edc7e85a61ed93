"""What the benchmark scripts share."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path


def best_time_s(fn, repeats: int) -> float:
    """The fastest of `repeats` timed calls, after one untimed call (compilation, warm-up)."""
    fn()
    runs_s = []
    for _ in range(repeats):
        start_s = time.perf_counter()
        fn()
        runs_s.append(time.perf_counter() - start_s)
    return min(runs_s)


def print_goals(goals: dict[str, bool]) -> None:
    """One line per goal: MET or MISS, then the goal."""
    for goal, met in goals.items():
        print(f"  {'MET ' if met else 'MISS'} {goal}")


def process_cpu_s(pid: int) -> float:
    """utime + stime of a running process, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed_once(name: str, command: str, workdir: Path, server_pid: int | None,
               limit_s: float = 1800) -> dict:
    """Run a shell pipeline under GNU time: wall time, the peak RSS of its largest process, its
    CPU (user + sys of the whole pipeline) and the CPU the registry spent meanwhile. (GNU time
    measures its own child, so the figure is not inflated by this Python process's memory,
    which a fork from here would carry into the child's high-water mark.)"""
    stats_file = workdir / f"time-{name.replace(' ', '_').replace('|', '_')}.txt"
    server_before = process_cpu_s(server_pid) if server_pid else 0.0
    start_s = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-f", "%M %U %S", "-o", str(stats_file), "bash",
                           "-o", "pipefail", "-c", command], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, timeout=limit_s, check=False)
    wall_s = time.perf_counter() - start_s
    server_s = (process_cpu_s(server_pid) - server_before) if server_pid else 0.0
    stats = stats_file.read_text().split()[-3:] if stats_file.exists() else ["0", "0", "0"]
    row = {"name": name, "wall_s": wall_s, "peak_rss_bytes": int(stats[0]) * 1024,
           "cpu_s": float(stats[1]) + float(stats[2]), "server_cpu_s": server_s,
           "rc": done.returncode, "command": command}
    if done.returncode != 0:
        row["error"] = done.stderr.decode(errors="replace")[-500:]
    return row


def timed_rounds(rows: list[tuple[str, str, int | None]], workdir: Path,
                 repeat: int) -> list[dict]:
    """Run each (name, command, server pid) once per round, `repeat` rounds, the rows taking
    turns, so rows compared with each other see the same state of a drifting machine. Each row
    is its fastest run, with every run's wall time in `runs_s` (a failed run ends that row)."""
    best: dict[str, dict] = {}
    runs_s: dict[str, list[float]] = {name: [] for name, _, _ in rows}
    for _ in range(repeat):
        for name, command, server_pid in rows:
            if best.get(name, {}).get("rc"):
                continue
            row = timed_once(name, command, workdir, server_pid)
            runs_s[name].append(row["wall_s"])
            if name not in best or row["rc"] != 0 or row["wall_s"] < best[name]["wall_s"]:
                best[name] = row
    for name, _, _ in rows:
        row = best[name]
        row["runs_s"] = runs_s[name]
        print(f"  {name:<12} {row['wall_s']:8.2f} s  {row['cpu_s'] + row['server_cpu_s']:6.2f} "
              f"CPU s  {row['peak_rss_bytes'] / 1e6:6.0f} MB  rc={row['rc']}", file=sys.stderr)
    return [best[name] for name, _, _ in rows]


def dockerd_pid() -> int | None:
    """The running dockerd's pid (the oldest), whose CPU a row's `server` column counts."""
    found = subprocess.run(["pgrep", "-o", "-x", "dockerd"], capture_output=True, text=True)
    return int(found.stdout) if found.returncode == 0 else None


def failure(row: dict) -> str | None:
    """How a timed row failed (its exit status and last error line), or None: a failed run's
    time is no result, and a table must not show it as one."""
    if "wall_s" not in row or row.get("rc"):
        lines = (row.get("error") or "").strip().splitlines() or [""]
        return f"FAILED (rc {row.get('rc', '?')}) {lines[-1][:70]}"
    return None


def timed(name: str, command: str, workdir: Path, server_pid: int | None,
          repeat: int) -> dict:
    """The fastest of `repeat` runs of one row."""
    return timed_rounds([(name, command, server_pid)], workdir, repeat)[0]
