"""What the benchmark scripts share."""

from __future__ import annotations

import time


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
