"""host.counters (gpu-smoke --level long): NVML's error and slowdown counters read before and after
the run, per GPU. A burn-in that computed right can still have cost an uncorrected ECC error, a
pending row remap or seconds of thermal or power-brake slowdown: any of those appearing during
the run is a failure. The slowdown counters are nvidia-smi's `clocks_event_reasons_counters.*`
(microseconds since the driver loaded; drivers before R535 lack them and the check says so).
Software power capping is reported, not failed: a GPU at full load reaches its power limit by
design. XID events are in the kernel log (`dmesg`), which this does not read.
"""

from __future__ import annotations

from envcheck.host import Probe
from envcheck.host.nvml import parse_query_csv
from envcheck.report import Check

COUNTERS = "clocks_event_reasons_counters"
SLOWDOWNS = {f"{COUNTERS}.hw_thermal_slowdown": "HW thermal slowdown",
             f"{COUNTERS}.sw_thermal_slowdown": "SW thermal slowdown",
             f"{COUNTERS}.hw_power_brake_slowdown": "HW power brake"}
POWER_CAP = f"{COUNTERS}.sw_power_cap"
FIELDS = ("index", "uuid", "ecc.errors.uncorrected.volatile.total", "retired_pages.pending",
          "remapped_rows.pending", "remapped_rows.failure", *SLOWDOWNS, POWER_CAP)


def read(probe: Probe) -> dict[str, dict[str, str]]:
    """uuid (else index) -> the counters of each GPU; {} where nvidia-smi cannot give them."""
    done = probe.command(["nvidia-smi", f"--query-gpu={','.join(FIELDS)}", "--format=csv"])
    rows = parse_query_csv(done.out) if done.rc == 0 else []
    return {row.get("uuid") or row.get("index", "?"): row for row in rows}


def _number(text: str | None) -> float | None:
    """'2500000 us' (csv with units) or '2500000' -> 2500000.0; '[N/A]' -> None."""
    try:
        return float((text or "").split()[0])
    except (IndexError, ValueError):
        return None


def gpu_changes(before: dict[str, str], after: dict[str, str]) -> tuple[list[str], list[str]]:
    """(failures, notes) for one GPU between two readings."""
    failures, notes = [], []
    ecc = [_number(r.get("ecc.errors.uncorrected.volatile.total")) for r in (before, after)]
    if None not in ecc and ecc[1] > ecc[0]:
        failures.append(f"{ecc[1] - ecc[0]:g} new uncorrected ECC error(s)")
    for field, said in (("retired_pages.pending", "a page retirement became pending"),
                        ("remapped_rows.pending", "a row remap became pending"),
                        ("remapped_rows.failure", "row remapping failed")):
        if after.get(field) == "Yes" and before.get(field) != "Yes":
            failures.append(said)
    for field, said in SLOWDOWNS.items():
        spent = [_number(r.get(field)) for r in (before, after)]
        if None not in spent and spent[1] > spent[0]:
            failures.append(f"{said} for {(spent[1] - spent[0]) / 1e6:.2f} s")
    capped = [_number(r.get(POWER_CAP)) for r in (before, after)]
    if None not in capped and capped[1] > capped[0]:
        notes.append(f"power-capped for {(capped[1] - capped[0]) / 1e6:.2f} s")
    return failures, notes


def counters_check(before: dict[str, dict[str, str]], after: dict[str, dict[str, str]]) -> Check:
    if not before or not after:
        return Check("host.counters", "skip", "nvidia-smi gave no error/slowdown counters "
                                              "(no GPU, or a driver before R535)")
    failures, notes = [], []
    for gpu, row in after.items():
        f, n = gpu_changes(before.get(gpu, row), row)
        tag = f"GPU {row.get('index', '?')}: "
        failures += [tag + x for x in f]
        notes += [tag + x for x in n]
    if failures:
        return Check("host.counters", "fail", "during the run: " + "; ".join(failures),
                     detail="; ".join(notes) or None,
                     fix="drain the node: check cooling, power and `dmesg` for Xid errors, "
                         "reset the GPU (`nvidia-smi -r`), then rerun --level long")
    return Check("host.counters", "pass",
                 f"no new ECC error, row remap or thermal/power-brake slowdown on {len(after)} "
                 f"GPU(s) during the run" + (f" ({'; '.join(notes)})" if notes else ""))
