"""`--metrics FILE` (gpu-smoke, fleet): the verdict in node_exporter's textfile-collector format,
built with prometheus_client and written atomically (a temporary file in the same directory,
then a rename, as `write_to_textfile` does; a failed write leaves neither a half-written file nor
the temporary one). Point FILE into node_exporter's `--collector.textfile.directory`, ending in
`.prom`.

    envcheck_check_status{check, status}      1 for the check's status, 0 for the other three
    envcheck_verdict{verdict}                 1 for the verdict, 0 for the other two
    envcheck_gpu_matmul_tflops{gpu, uuid, kind}
    envcheck_gpu_memory_gbps{gpu, uuid, kind}
    envcheck_gpu_transfer_gbps{gpu, uuid, kind, direction}
    envcheck_allreduce_busbw_gbps             the all-reduce's best bus bandwidth
    envcheck_duration_seconds                 the run's wall time
    envcheck_last_run_timestamp_seconds       when it ended (Unix time)

fleet writes the same with a `node` label on every series (node-level series only for nodes
that gave a report) and `envcheck_node_reported{node}`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from envcheck.errors import EnvcheckError, UnreadableInput
from envcheck.fleet.aggregate import FleetReport
from envcheck.gpu_smoke.report import PerfFigure, SmokeReport

STATUSES = ("pass", "warn", "fail", "skip")
VERDICTS = ("gpu", "cpu-fallback", "fail")
GPU_MEASURES = {"matmul_tflops": "dense matmul rate of the GPU (model test, TFLOP/s)",
                "memory_gbps": "device memory bandwidth, a copy kernel (GB/s)",
                "transfer_gbps": "host<->device transfer bandwidth (GB/s)"}


class MetricsNotWritten(EnvcheckError):
    """The run finished but its metrics file could not be written (a full disk, say)."""

    exit_code = 2


def check_target(path: Path) -> None:
    """Before the run: the file's directory exists and is writable, so that a long run does not
    end in an error it could have given at once."""
    folder = path.parent
    if path.is_dir():
        raise UnreadableInput(f"--metrics {path}: is a directory; name a file in it, e.g. "
                              f"{path / 'envcheck.prom'}")
    if not folder.is_dir():
        raise UnreadableInput(f"--metrics {path}: the directory {folder} does not exist; create "
                              "it (node_exporter's --collector.textfile.directory)")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UnreadableInput(f"--metrics {path}: the directory {folder} is not writable by "
                              "this user; choose another or fix its permissions")


def _gauges(registry, node: bool) -> dict:
    from prometheus_client import Gauge

    extra = ["node"] if node else []
    gauges = {
        "check": Gauge("envcheck_check_status", "1 for the check's status, 0 for the others",
                       [*extra, "check", "status"], registry=registry),
        "verdict": Gauge("envcheck_verdict", "1 for the gpu-smoke verdict, 0 for the others",
                         [*extra, "verdict"], registry=registry),
        "allreduce_busbw_gbps": Gauge("envcheck_allreduce_busbw_gbps",
                                      "all-reduce bus bandwidth over the local GPUs, best of "
                                      "the sweep (GB/s)", extra, registry=registry)}
    for measure, what in GPU_MEASURES.items():
        labels = [*extra, "gpu", "uuid", "kind"] + (["direction"] if measure == "transfer_gbps"
                                                    else [])
        gauges[measure] = Gauge(f"envcheck_gpu_{measure}", what, labels, registry=registry)
    return gauges


def _add_report(gauges: dict, checks: dict[str, str], verdict: str | None,
                performance: list[PerfFigure], node: tuple[str, ...]) -> None:
    for check_id, status in checks.items():
        for one in STATUSES:
            gauges["check"].labels(*node, check_id, one).set(int(status == one))
    for one in VERDICTS:
        gauges["verdict"].labels(*node, one).set(int(verdict == one))
    for figure in performance:
        if figure.device is None:  # over all devices: no gpu label (and none at all alone)
            gauge = gauges[figure.measure]
            (gauge.labels(*node) if node else gauge).set(figure.value)
            continue
        labels = [*node, str(figure.device), figure.uuid or "", figure.kind or ""]
        labels += [figure.direction or ""] if figure.measure == "transfer_gbps" else []
        gauges[figure.measure].labels(*labels).set(figure.value)


def smoke_registry(report: SmokeReport, duration_s: float):
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    _add_report(_gauges(registry, node=False), {c.id: c.status for c in report.checks},
                report.verdict, report.model.performance if report.model else [], ())
    _run_gauges(registry, duration_s)
    return registry


def fleet_registry(fleet: FleetReport, duration_s: float):
    """Every node of the fleet report, by a `node` label; checks and figures of those that
    gave a report."""
    from prometheus_client import CollectorRegistry, Gauge

    registry = CollectorRegistry()
    gauges = _gauges(registry, node=True)
    reported = Gauge("envcheck_node_reported", "1 when the node gave a gpu-smoke report",
                     ["node"], registry=registry)
    for row in sorted(fleet.nodes, key=lambda r: r.node):
        reported.labels(row.node).set(int(row.status == "reported"))
        if row.status == "reported":
            _add_report(gauges, row.checks, row.verdict, row.performance, (row.node,))
    _run_gauges(registry, duration_s)
    return registry


def _run_gauges(registry, duration_s: float) -> None:
    from prometheus_client import Gauge

    Gauge("envcheck_duration_seconds", "wall time of the envcheck run",
          registry=registry).set(round(duration_s, 3))
    Gauge("envcheck_last_run_timestamp_seconds", "when the envcheck run ended (Unix time)",
          registry=registry).set(round(time.time(), 3))


def write(path: Path, registry) -> None:
    """Atomically, or a one-line error (exit 2) and no file (nor temporary one) left."""
    from prometheus_client import write_to_textfile

    try:
        write_to_textfile(str(path), registry)
    except OSError as error:
        raise MetricsNotWritten(f"cannot write the metrics to {path}: "
                                f"{error.strerror or error} (the report itself is complete; no "
                                "metrics file was left)") from None
