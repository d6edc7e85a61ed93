"""--metrics FILE: the verdict in node_exporter's textfile format, written atomically; promtool
(Debian's prometheus package) checks every file, and prometheus_client's parser reads it back."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from envcheck import metrics
from envcheck.cli import cli
from envcheck.fleet.aggregate import from_report, summarize
from envcheck.gpu_smoke import gpu_smoke
from tests.conftest import REPO, require_binary
from tests.gpu_host import FakeDocker, connect_to, healthy_host, model_report, predicted

UUID = "GPU-b42dd28e-ffdd-8720-1df0-98bd8cdc05b1"  # the 8×H100 capture's GPU 0


def with_perf(report: dict) -> dict:
    """A model report of one H100 with perf.matmul, perf.transfer and an all-reduce sweep."""
    device = {"index": 0, "id": 0, "platform": "gpu", "kind": "NVIDIA H100 80GB HBM3",
              "uuid": UUID, "pci_bus_id": "00000000:18:00.0"}
    report["devices"] = [{"device": device, "ok": True, "checks": report["checks"][1:4],
                          "timings_s": {}}]
    report["checks"] += [
        {"id": "perf.matmul", "status": "pass", "summary": "dense matmul", "unit": "TFLOP/s",
         "dtype": "bfloat16", "size": 8192,
         "entries": [{"device": 0, "value": 712.5, "status": "pass", "peak": 989.5}]},
        {"id": "perf.transfer", "status": "pass", "summary": "transfer", "unit": "GB/s",
         "size_bytes": 1 << 28, "directions": ["h2d", "d2h"],
         "entries": [{"device": 0, "value": 24.5, "status": "pass"},
                     {"device": 0, "value": 26.0, "status": "pass"}]},
        {"id": "interconnect.allreduce", "status": "pass", "summary": "exact", "devices": 2,
         "exact": True, "sweep": [{"size_bytes": 1 << 20, "time_s": 0.001, "algbw_gbps": 1.0,
                                   "busbw_gbps": 1.0},
                                  {"size_bytes": 1 << 29, "time_s": 0.003,
                                   "algbw_gbps": 178.9, "busbw_gbps": 178.9}]}]
    return report


def smoke_report(tmp_path):
    host = healthy_host(tmp_path)
    docker = FakeDocker(model_out=with_perf(model_report(backend="gpu")))
    return gpu_smoke(probe=host.probe, connect=connect_to(docker), predict=predicted())


def samples(path) -> dict[tuple, float]:
    found = {}
    for family in text_string_to_metric_families(path.read_text()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def promtool(path) -> None:
    require_binary("promtool")
    done = subprocess.run(["promtool", "check", "metrics"], stdin=path.open(),
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_gpu_smoke_reports_metrics_as_promtool_and_the_parser_read_them(tmp_path):
    report = smoke_report(tmp_path)
    assert report.verdict == "gpu", report.first_failed
    path = tmp_path / "envcheck.prom"
    metrics.write(path, metrics.smoke_registry(report, 12.5))
    promtool(path)
    got = samples(path)
    assert got[("envcheck_verdict", (("verdict", "gpu"),))] == 1
    assert got[("envcheck_verdict", (("verdict", "fail"),))] == 0
    assert got[("envcheck_check_status", (("check", "model.parity"), ("status", "pass")))] == 1
    assert got[("envcheck_check_status", (("check", "model.parity"), ("status", "fail")))] == 0
    h100 = (("gpu", "0"), ("kind", "NVIDIA H100 80GB HBM3"), ("uuid", UUID))
    assert got[("envcheck_gpu_matmul_tflops", h100)] == 712.5
    assert got[("envcheck_gpu_transfer_gbps", tuple(sorted((*h100, ("direction", "d2h")))))] == 26
    assert got[("envcheck_allreduce_busbw_gbps", ())] == 178.9
    assert got[("envcheck_duration_seconds", ())] == 12.5
    assert got[("envcheck_last_run_timestamp_seconds", ())] > 1.7e9
    checks = {c.id for c in report.checks}
    assert {k[1][0][1] for k in got if k[0] == "envcheck_check_status"} == checks


def test_fleet_metrics_carry_a_node_label_escaped(tmp_path):
    """Node names are what Slurm or Kubernetes say; quotes, backslashes and newlines in a label
    are escaped and read back as they were."""
    from envcheck.report import to_json

    node_report = to_json(smoke_report(tmp_path))
    odd = 'gpu"07\\a\nb'
    rows = [from_report("gpu01", node_report), from_report(odd, node_report),
            from_report("gpu02", {"schema": "envcheck.smoke/v1"})]
    fleet = summarize(rows, "slurm", require_gpu=False, seconds=3.0)
    path = tmp_path / "fleet.prom"
    metrics.write(path, metrics.fleet_registry(fleet, 3.0))
    promtool(path)
    got = samples(path)
    assert got[("envcheck_node_reported", (("node", "gpu02"),))] == 0
    assert got[("envcheck_node_reported", (("node", odd),))] == 1
    assert got[("envcheck_verdict", (("node", odd), ("verdict", "gpu")))] == 1
    assert not any(dict(labels).get("node") == "gpu02" for name, labels in got
                   if name == "envcheck_verdict")
    assert got[("envcheck_gpu_matmul_tflops", (("gpu", "0"), ("kind", "NVIDIA H100 80GB HBM3"),
                                               ("node", "gpu01"), ("uuid", UUID)))] == 712.5


FULL_DISK = """
import resource, signal, sys
from pathlib import Path
from envcheck import metrics
from envcheck.errors import EnvcheckError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))
from prometheus_client import CollectorRegistry, Gauge
registry = CollectorRegistry()
for i in range(50):
    Gauge(f"envcheck_filler_{i}", "x" * 40, registry=registry).set(i)
try:
    metrics.write(Path(sys.argv[1]), registry)
except EnvcheckError as error:
    print(error.exit_code, error)
"""


def test_a_write_that_fails_midway_leaves_no_file(tmp_path):
    """A full disk (here: RLIMIT_FSIZE, so a write fails after 64 bytes) is one line, exit 2,
    and neither the metrics file nor the temporary one is left."""
    target = tmp_path / "envcheck.prom"
    done = subprocess.run([sys.executable, "-c", FULL_DISK, str(target)], capture_output=True,
                          text=True, cwd=REPO, timeout=60)
    code, _, message = done.stdout.strip().partition(" ")
    assert code == "2" and message.startswith(f"cannot write the metrics to {target}: "), done
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where, said", [
    ("missing/envcheck.prom", "does not exist; create it"),
    ("", "is a directory"),
    ("ro/envcheck.prom", "is not writable"),
])
def test_a_metrics_path_that_cannot_be_written_is_refused_before_the_run(tmp_path, where, said,
                                                                         monkeypatch):
    import os

    (tmp_path / "ro").mkdir(mode=0o555)
    if os.geteuid() == 0 and where.startswith("ro/"):  # root writes anywhere: stand in for it
        monkeypatch.setattr(os, "access", lambda *args, **kwargs: False)
    ran = []
    monkeypatch.setattr("envcheck.gpu_smoke.gpu_smoke", lambda **kwargs: ran.append(1))
    outcome = CliRunner().invoke(cli, ["gpu-smoke", "--metrics", str(tmp_path / where)])
    assert outcome.exit_code == 2 and not ran, outcome.output
    assert said in outcome.output and "Traceback" not in outcome.output


def test_a_failed_run_still_writes_its_metrics_and_exits_1(tmp_path, monkeypatch):
    import msgspec

    broken = msgspec.structs.replace(smoke_report(tmp_path), verdict="fail")
    monkeypatch.setattr("envcheck.gpu_smoke.gpu_smoke", lambda **kwargs: broken)
    path = tmp_path / "m.prom"
    outcome = CliRunner().invoke(cli, ["gpu-smoke", "--metrics", str(path)])
    assert outcome.exit_code == 1, outcome.output
    assert samples(path)[("envcheck_verdict", (("verdict", "fail"),))] == 1


def test_the_documented_alert_rules_are_valid(tmp_path):
    """docs/metrics.md's sample Alertmanager rules, as promtool checks a rules file."""
    import re

    text = (REPO / "docs" / "metrics.md").read_text()
    rules = re.search(r"```yaml\n(groups:.*?)```", text, re.S).group(1)
    (tmp_path / "rules.yml").write_text(rules)
    require_binary("promtool")
    done = subprocess.run(["promtool", "check", "rules", str(tmp_path / "rules.yml")],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and "SUCCESS: 3 rules found" in done.stdout, done.stdout
