"""Wall time of a full `envcheck gpu-smoke` CPU-fallback run, cold and warm, next to its floor:
the bare model test in the same image (`docker run --rm --network none IMAGE python -m
model.smoke --json`). The difference is what the chain (host, toolkit, daemon, image, GPU probe
container, least-privilege options) costs on top of the model test. Then the model test's own
stages at --level quick and medium, from its report: what the quick level adds to the model
checks (a short matmul per device, an exact all-reduce) and each medium stage's extra time.

    python -m scripts.bench_smoke [--image envcheck-dev:latest] [--runs 3]

Needs a Docker Engine (DOCKER_HOST) with the image; "cold" drops the page cache first (as root)
so the image's files and the JAX/XLA libraries are read from disk again.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from scripts.benchlib import print_goals

GOAL_OVERHEAD_S = 3.0
GOAL_QUICK_S = 2.0  # what --level quick may add to the model checks
LEVEL_STAGES = ("perf", "interconnect")  # the stages the levels add (stage_load, stage_model were)


def drop_caches() -> bool:
    if os.geteuid() != 0:
        return False
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    return True


def timed(argv: list[str]) -> tuple[float, str]:
    start_s = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=1200, check=False)
    seconds = time.perf_counter() - start_s
    if done.returncode not in (0,):
        raise SystemExit(f"{' '.join(argv[:4])} failed ({done.returncode}): {done.stderr[-500:]}")
    return seconds, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default="envcheck-dev:latest")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    envcheck = [sys.executable, "-m", "envcheck", "gpu-smoke", "--image", args.image, "--json"]
    peer = ["docker", "run", "--rm", "--network", "none", "-e", "JAX_PLATFORMS=cpu", args.image,
            "python", "-m", "model.smoke", "--json"]
    rows = {}
    for name, argv in (("envcheck gpu-smoke", envcheck), ("docker run model.smoke", peer)):
        cold = drop_caches()
        cold_s, out = timed(argv)
        warm_s = statistics.median(timed(argv)[0] for _ in range(args.runs))
        rows[name] = (cold_s if cold else float("nan"), warm_s)
        if name.startswith("envcheck"):
            report = json.loads(out)
            assert report["verdict"] == "cpu-fallback", report["verdict"]
            stages = report["timings_s"]
    print(f"{'':<24} {'cold s':>8} {'warm s':>8}")
    for name, (cold_s, warm_s) in rows.items():
        print(f"{name:<24} {cold_s:8.2f} {warm_s:8.2f}")
    print("envcheck stages (last run): " + ", ".join(f"{k} {v:.2f} s" for k, v in stages.items()))
    overhead_s = rows["envcheck gpu-smoke"][1] - rows["docker run model.smoke"][1]
    ratio = rows["envcheck gpu-smoke"][1] / rows["docker run model.smoke"][1]
    print(f"warm: envcheck / bare model test = {ratio:.2f}, chain overhead {overhead_s:+.2f} s")
    levels = {level: level_stages(args.image, level) for level in ("quick", "medium")}
    for level, stages in levels.items():
        print(f"model.smoke --level {level} stages: " + ", ".join(
            f"{k.removeprefix('stage_')} {v:.2f} s" for k, v in stages.items()))
    quick_added = sum(levels["quick"].get(f"stage_{s}", 0.0) for s in LEVEL_STAGES)
    medium_added = sum(levels["medium"].get(f"stage_{s}", 0.0) for s in LEVEL_STAGES)
    print(f"--level quick adds {quick_added:.2f} s to the model checks; --level medium "
          f"{medium_added:.2f} s")
    print_goals({f"the chain costs < {GOAL_OVERHEAD_S:.0f} s on top of the model test (warm)":
                 overhead_s < GOAL_OVERHEAD_S,
                 f"--level quick adds ≤ {GOAL_QUICK_S:.0f} s": quick_added <= GOAL_QUICK_S})


def level_stages(image: str, level: str) -> dict[str, float]:
    """The model test's stage timings at `level` (the median run of three, by total)."""
    argv = ["docker", "run", "--rm", "--network", "none", "-e", "JAX_PLATFORMS=cpu", image,
            "python", "-m", "model.smoke", "--json", "--level", level]
    runs = []
    for _ in range(3):
        timings = json.loads(timed(argv)[1].splitlines()[-1])["timings_s"]
        runs.append({k: v for k, v in timings.items() if k.startswith("stage_")})
    return sorted(runs, key=lambda r: sum(r.values()))[1]


if __name__ == "__main__":
    main()
