"""Every device judged: the model test on each of several real CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=N), one of them broken through the documented
fault seam; the datasheet judgement on the device names of the real GPU captures; the
all-reduce's arithmetic; NCCL's container prerequisites; the documented call's compiled path."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from model import faults, nccl
from model.perf import Measure, judge_entry, perf_check
from model.report import DeviceInfo, ModelReport, from_json
from model.specs import spec_for
from tests.conftest import REPO
from tests.gpu_host import real


def smoke(devices: int, *args: str, fault: tuple[str, int] | None = None):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "JAX_PLATFORMS": "cpu"}
    env.pop(faults.VARIABLE, None)
    if fault:
        env[faults.VARIABLE] = f"{fault[0]}:{fault[1]}:{faults.token(*fault)}"
    done = subprocess.run([sys.executable, "-m", "model.smoke", "--json", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    report = from_json(ModelReport, done.stdout.splitlines()[-1]) if done.stdout else None
    return done, report


def check(report: ModelReport, check_id: str):
    return next(c for c in report.checks if c.id == check_id)


def test_a_device_computing_wrong_logits_fails_the_run_and_is_named():
    """Two CPU devices at the long level, device 1 perturbed: its parity fails by name, its
    burn-in results leave their golden checksum, device 0 stays clean."""
    done, report = smoke(2, "--level", "long", "--duration", "2", fault=("logits", 1))
    assert done.returncode == 1, done.stderr
    assert [run.device.index for run in report.devices] == [0, 1]
    assert [run.ok for run in report.devices] == [True, False]
    parity = check(report, "model.parity")
    assert parity.status == "fail" and parity.summary.startswith("device 1 (cpu, cpu:1): ")
    assert "device 0" not in parity.summary and parity.max_abs_diff > 1e-4
    burn = check(report, "perf.burn-in")
    assert burn.status == "fail" and burn.mismatches
    assert all(m.startswith("device 1 (cpu, cpu:1), iteration ") for m in burn.mismatches)
    assert set(burn.iterations) == {"0", "1"} and min(burn.iterations.values()) >= 2
    assert report.timings_s["stage_burn_in"] >= 2
    assert check(report, "interconnect.allreduce").exact is True
    document = json.loads(done.stdout.splitlines()[-1])
    assert document["schema"] == "envcheck.model-smoke/v2" and document["level"] == "long"
    assert document["devices"][1]["device"] == {"index": 1, "id": 1, "platform": "cpu",
                                                "kind": "cpu", "uuid": None,
                                                "pci_bus_id": None}
    assert {c["id"] for c in document["checks"]} == {
        "model.load", "model.parity", "model.generate", "model.attention", "perf.matmul",
        "perf.memory", "perf.transfer", "interconnect.allreduce", "perf.burn-in"}


def test_a_slow_device_is_a_warn_naming_it_at_medium():
    done, report = smoke(2, "--level", "medium", fault=("slow", 1))
    assert done.returncode == 0, done.stderr  # a warn does not fail the run
    assert report.level == "medium" and all(run.ok for run in report.devices)
    matmul = check(report, "perf.matmul")
    assert [entry.status for entry in matmul.entries] == ["pass", "warn"], matmul
    assert matmul.status == "warn" and matmul.summary.startswith("device 1 (cpu, cpu:1): ")
    assert matmul.entries[1].value < 0.85 * matmul.entries[1].median
    reduce = check(report, "interconnect.allreduce")
    assert reduce.exact and len(reduce.sweep) == 3
    for point in reduce.sweep:  # nccl-tests' arithmetic: busbw = algbw × 2(n−1)/n, n = 2
        assert point.algbw_gbps == pytest.approx(point.size_bytes / point.time_s / 1e9, rel=1e-2)
        assert point.busbw_gbps == pytest.approx(point.algbw_gbps * 2 * 1 / 2, rel=1e-2)
    transfer = check(report, "perf.transfer")
    assert transfer.directions == ["h2d", "d2h"] * 2 and len(transfer.entries) == 4
    assert check(report, "perf.memory").entries[1].status in ("warn", "fail")


def test_one_cpu_device_at_quick_is_a_figure_not_a_verdict():
    measure = Measure("matmul", [0.08], [0], 0.60, lambda s: s.matmul_tflops)
    lone = perf_check(measure, [DeviceInfo(index=0, id=0, platform="cpu", kind="cpu")], "quick",
                      dtype="bfloat16", size=1024)
    assert lone.status == "skip" and "no datasheet entry for 'cpu'" in lone.entries[0].said
    assert lone.summary.startswith("dense matmul on 1 device: 0.08 TFLOP/s")


@pytest.mark.parametrize("value", ["logits:1", "logits:1:0000000000000000", "slow:x:y",
                                   f"logits:2:{faults.token('logits', 1)}"])
def test_the_fault_seam_refuses_a_value_it_did_not_sign(value):
    with pytest.raises(ValueError, match="test-only seam"):
        faults.configured({faults.VARIABLE: value})
    assert faults.configured({}) is None
    signed = faults.configured({faults.VARIABLE: f"slow:3:{faults.token('slow', 3)}"})
    assert signed == faults.Fault("slow", 3) and faults.slowdown(signed, 3) == 2


def test_an_unsigned_fault_is_one_line_and_exit_2():
    env = {**os.environ, faults.VARIABLE: "logits:0", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-m", "model.smoke"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().startswith(f"error: {faults.VARIABLE}=")


TABLE_ROW_RE = re.compile(r"^\|\s+\d+\s+(.+?)\s{2,}(?:On|Off)\s+\|", re.M)


def names_in_captures() -> dict[str, str]:
    """GPU name -> the capture it was read from: nvidia-smi -q's Product Name, the default
    table's name column, the query CSV's name field."""
    names = {}
    for capture in ("nvidia-smi-q_h100_590.txt", "nvidia-smi-q_rtx4080super_595.txt",
                    "nvidia-smi-q_4xa100-sxm4_555.txt"):
        for name in re.findall(r"Product Name\s*:\s*(.+?)\s*$", real(capture), re.M):
            names[name] = capture
    for capture in ("nvidia-smi_h200_590.txt", "nvidia-smi_l40s_595.txt",
                    "nvidia-smi_rtx4090-multi_550.txt", "nvidia-smi_2xh100-nvl_550.txt",
                    "nvidia-smi_tesla-t4_535_docs.txt"):
        for name in TABLE_ROW_RE.findall(real(capture)):
            names[name] = capture
    for row in real("nvidia-smi-query-gpu_tesla-p100_510.csv.txt").splitlines()[1:]:
        names[row.split(",")[0]] = "nvidia-smi-query-gpu_tesla-p100_510.csv.txt"
    return names


def test_the_captured_gpu_names_find_their_datasheets():
    found = {name: spec_for(name)[0].name for name in names_in_captures()}
    assert found == {"NVIDIA H100 80GB HBM3": "H100 SXM",
                     "NVIDIA GeForce RTX 4080 SUPER": "RTX 4080 SUPER",
                     "NVIDIA A100-SXM4-80GB": "A100 SXM4 80 GB", "NVIDIA H200": "H200 SXM",
                     "NVIDIA L40S": "L40S", "NVIDIA GeForce RTX 4090": "RTX 4090",
                     "NVIDIA H100 NVL": "H100 NVL", "Tesla T4": "T4",
                     "Tesla P100-PCIE-16GB": "P100 PCIe"}
    assert spec_for("Tesla T4")[0].matmul_dtype == "float16"  # no bf16 tensor cores


@pytest.mark.parametrize("kind, spec_name", [
    ("NVIDIA H100 NVL", "H100 NVL"), ("NVIDIA H100 PCIe", "H100 PCIe"),
    ("NVIDIA H200", "H200 SXM"), ("NVIDIA H200 NVL", "H200 NVL"),
    ("NVIDIA GH200 480GB", "GH200 96 GB"), ("NVIDIA A100-SXM4-80GB", "A100 SXM4 80 GB"),
    ("NVIDIA A100-SXM4-40GB", "A100 SXM4 40 GB"), ("NVIDIA A100 80GB PCIe", "A100 PCIe 80 GB"),
    ("NVIDIA A100-PCIE-40GB", "A100 PCIe 40 GB"), ("NVIDIA A10G", "A10G"), ("NVIDIA L4", "L4"),
    ("NVIDIA L40S", "L40S"), ("Tesla T4", "T4"), ("Tesla V100-SXM2-32GB", "V100 SXM2"),
    ("NVIDIA GeForce RTX 4090", "RTX 4090"), ("NVIDIA GeForce RTX 3090", "RTX 3090"),
    ("NVIDIA B200", "B200"),
])
def test_every_named_kind_has_a_datasheet(kind, spec_name):
    assert spec_for(kind)[0].name == spec_name


def test_a_mig_slice_and_an_unknown_kind_are_judged_by_their_siblings_only():
    spec, why = spec_for("NVIDIA H100 80GB HBM3 MIG 1g.10gb")
    assert spec is None and "MIG slice" in why and "sibling" in why
    spec, why = spec_for("NVIDIA GeForce RTX 3060 Laptop GPU")
    assert spec is None and "no datasheet entry" in why


def infos(*kinds: str) -> list[DeviceInfo]:
    return [DeviceInfo(index=i, id=i, platform="gpu", kind=k) for i, k in enumerate(kinds)]


@pytest.mark.parametrize("tflops, status", [(989.5 * 0.60, "pass"), (989.5 * 0.599, "fail"),
                                            (330.0, "fail"), (800.0, "pass")])
def test_matmul_against_the_datasheet_floor(tflops, status):
    """60% of the dense peak passes, just below fails; DCGM#122's 'a third of its speed' fails."""
    measure = Measure("matmul", [tflops], [0], 0.60, lambda s: s.matmul_tflops)
    entry = judge_entry(measure, 0, spec_for("NVIDIA H100 80GB HBM3"), None, "quick")
    assert entry.status == status and entry.peak == 989.5


def test_a_mixed_host_compares_each_device_with_its_own_kind():
    """Two RTX 4090s and two RTX 3090s: the 3090s are not 'slow 4090s'."""
    kinds = infos("NVIDIA GeForce RTX 4090", "NVIDIA GeForce RTX 3090",
                  "NVIDIA GeForce RTX 4090", "NVIDIA GeForce RTX 3090")
    measure = Measure("matmul", [150.0, 65.0, 148.0, 50.0], [0, 1, 2, 3], 0.60,
                      lambda s: s.matmul_tflops)
    check = perf_check(measure, kinds, "medium", dtype="bfloat16", size=8192)
    assert [e.status for e in check.entries] == ["pass", "pass", "pass", "warn"]
    assert check.entries[3].median == pytest.approx(65.0)
    assert check.summary.startswith("device 3 (NVIDIA GeForce RTX 3090, gpu:3)")
    assert "siblings' median" in check.summary
    long = perf_check(measure, kinds, "long", dtype="bfloat16", size=8192)
    assert long.status == "fail"


def test_mig_slices_are_compared_with_each_other():
    kinds = infos(*["NVIDIA H100 80GB HBM3 MIG 1g.10gb"] * 3)
    measure = Measure("memory", [200.0, 210.0, 120.0], [0, 1, 2], 0.70, lambda s: s.memory_gbps)
    check = perf_check(measure, kinds, "medium", size=1 << 30)
    assert [e.status for e in check.entries] == ["pass", "pass", "warn"]
    assert check.entries[0].peak is None and "MIG slice" in check.entries[0].said


@pytest.mark.parametrize("shm, memlock, rdma, status, said", [
    (64 << 20, 8 << 20, [], "warn", "/dev/shm is 64 MiB"),
    (8 << 30, 8 << 20, [], "pass", "memlock 8 MiB"),
    (8 << 30, 8 << 20, ["mlx5_0"], "warn", "memlock is 8 MiB with RDMA devices mlx5_0"),
    (1 << 30, None, ["mlx5_0"], "pass", "memlock unlimited"),
    (None, None, [], "warn", "no /dev/shm"),
])
def test_nccls_container_prerequisites(shm, memlock, rdma, status, said):
    check = nccl.nccl_check(shm, memlock, "ipc:[4026532176]", rdma)
    assert check.status == status and said in check.summary, check.summary
    assert (check.fix is None) == (status == "pass")


def test_the_documented_call_is_compiled_once_per_shape_and_sees_new_weights():
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from model.gpt2 import GPT2, GPT2Config, _compiled_forward

    gpt2 = GPT2(GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2),
                rngs=nnx.Rngs(0))
    ids_BT = np.array([[1, 2, 3, 4]], np.int32)
    before = _compiled_forward._cache_size()
    first_BTV = gpt2(ids_BT)
    gpt2(ids_BT + 1)
    assert _compiled_forward._cache_size() == before + 1  # one shape, one compile
    gpt2(ids_BT[:, :3])
    assert _compiled_forward._cache_size() == before + 2
    np.testing.assert_allclose(first_BTV, gpt2.forward(jnp.asarray(ids_BT))[0], atol=1e-6)
    gpt2.wte.embedding.set_value(gpt2.wte.embedding.get_value() * 2)
    np.testing.assert_allclose(gpt2(ids_BT), gpt2.forward(jnp.asarray(ids_BT))[0], atol=1e-6)
    traced = jax.jit(lambda m, x: m(x))(gpt2, ids_BT)  # inside a transform: traced as is
    np.testing.assert_allclose(traced, gpt2.forward(jnp.asarray(ids_BT))[0], atol=1e-6)


@pytest.mark.parametrize("status, verdict", [("fail", "fail"), ("warn", "gpu"), ("skip", "gpu")])
def test_a_device_below_its_floor_fails_gpu_smokes_verdict(status, verdict):
    """The model report's perf checks join gpu-smoke's: a fail fails the verdict, a warn is said."""
    from envcheck.gpu_smoke.judge import judge
    from envcheck.runner import RunResult
    from tests.gpu_host import model_report

    report = model_report(backend="gpu")
    report["checks"].append({
        "id": "perf.matmul", "status": status, "summary": "device 3 (…): 330 TFLOP/s",
        "unit": "TFLOP/s", "dtype": "bfloat16", "size": 8192,
        "entries": [{"device": 0, "value": 330.0, "status": status, "peak": 989.5,
                     "floor": 593.7}]})
    checks = []
    result, _, first = judge(checks, RunResult(0, json.dumps(report), ""), gpu_expected=True)
    assert result == verdict and [c.status for c in checks if c.id == "perf.matmul"] == [status]
    assert (first is not None and first.id == "perf.matmul") == (status == "fail")


def counters_of(csv: str, **changes: str) -> dict[str, dict[str, str]]:
    from envcheck.host.nvml import parse_query_csv

    row = parse_query_csv(real(csv))[0]
    return {row["uuid"]: {**row, **{k.replace("__", "."): v for k, v in changes.items()}}}


@pytest.mark.parametrize("changes, status, said", [
    ({}, "pass", "no new ECC error"),
    ({"clocks_event_reasons_counters__hw_thermal_slowdown": "2500000 us"}, "fail",
     "HW thermal slowdown for 2.50 s"),
    ({"ecc__errors__uncorrected__volatile__total": "3"}, "fail", "3 new uncorrected ECC"),
    ({"remapped_rows__pending": "Yes"}, "fail", "a row remap became pending"),
    ({"clocks_event_reasons_counters__sw_power_cap": "9000000 us"}, "pass", "power-capped for"),
])
def test_nvml_counters_before_and_after_a_long_run(changes, status, said):
    """The real H100 capture's counters as the 'before' reading; 'after' the same row with one
    counter moved."""
    from envcheck.host.counters import counters_check

    csv = "nvidia-smi-query-gpu-allfields_h100_590.csv.txt"
    before = counters_of(csv)
    row = next(iter(before.values()))
    assert row["clocks_event_reasons_counters.hw_thermal_slowdown"] == "0 us"
    check = counters_check(before, counters_of(csv, **changes))
    assert check.status == status and said in check.summary + (check.detail or ""), check


def test_the_long_level_reads_the_counters_before_and_after(tmp_path):
    from envcheck.gpu_smoke import gpu_smoke
    from envcheck.gpu_smoke.chain import ModelLevel
    from tests.gpu_host import FakeDocker, connect_to, healthy_host, predicted

    runs = {}
    for level in ("quick", "long"):
        report = gpu_smoke(probe=healthy_host(tmp_path / level).probe,
                           connect=connect_to(FakeDocker()), predict=predicted(),
                           level=ModelLevel(level, 5))
        runs[level] = {c.id: c for c in report.checks}
        assert report.level == level
    assert "host.counters" not in runs["quick"]
    assert runs["long"]["host.counters"].status == "pass"


def test_an_image_with_an_older_model_test_says_to_rebuild():
    """An image `envcheck build` made before the levels: its model.smoke refuses the new flags."""
    from envcheck.gpu_smoke.judge import parse_model_report
    from envcheck.runner import RunResult

    err = ("usage: python -m model.smoke [-h] [--json]\n"
           "python -m model.smoke: error: unrecognized arguments: --level quick --in-container\n")
    report, problem = parse_model_report(RunResult(2, "", err))
    assert report is None and problem.id == "model.run" and problem.status == "fail"
    assert problem.summary == ("the image's model test is of an older envcheck (it does not take "
                               "--level quick --in-container)")
    assert "rebuild the image with `envcheck build`" in problem.fix


def pcie_max(capture: str) -> list[tuple[int, int]]:
    """(PCIe Generation Max, Link Width Max) of each GPU of an `nvidia-smi -q` capture."""
    gens = re.findall(r"PCIe Generation\s*\n\s*Max\s*:\s*(\d+)", real(capture))
    widths = re.findall(r"Link Width\s*\n\s*Max\s*:\s*(\d+)x", real(capture))
    return [(int(g), int(w)) for g, w in zip(gens, widths, strict=True)]


def test_the_all_reduce_link_from_nvml_facts_as_the_captures_give_them():
    from model.links import LinkFacts, expected

    assert pcie_max("nvidia-smi-q_rtx4080super_595.txt") == [(4, 16)]
    assert pcie_max("nvidia-smi-q_4xa100-sxm4_555.txt") == [(4, 16)] * 4
    rtx = spec_for("NVIDIA GeForce RTX 4080 SUPER")[0]
    facts = [LinkFacts(pcie_gen=g, pcie_width=w, nvlinks_active=0)
             for g, w in pcie_max("nvidia-smi-q_rtx4080super_595.txt") * 2]
    assert expected([rtx, rtx], facts) == ("PCIe 4.0 x16 (NVML), 31.5 GB/s per direction", 31.5)
    narrow = [facts[0], LinkFacts(pcie_gen=4, pcie_width=8, nvlinks_active=0)]
    assert expected([rtx, rtx], narrow)[1] == 15.75  # a x8 slot lowers what the link gives
    a100 = spec_for("NVIDIA A100-SXM4-80GB")[0]
    nvlink = [LinkFacts(pcie_gen=g, pcie_width=w, nvlinks_active=12)
              for g, w in pcie_max("nvidia-smi-q_4xa100-sxm4_555.txt")]
    assert expected([a100] * 4, nvlink) == (
        "NVLink, 12 active links (NVML), 300 GB/s per direction", 300.0)
    nvlink[2] = LinkFacts(pcie_gen=4, pcie_width=16, nvlinks_active=8)  # four links down
    assert expected([a100] * 4, nvlink)[0].startswith(
        "NVLink, 8 active links (the datasheet's 12) (NVML), 200 GB/s")
    h100 = spec_for("NVIDIA H100 80GB HBM3")[0]
    assert expected([h100, h100], [None, None]) == (
        "NVLink, 450 GB/s per direction (H100 SXM datasheet)", 450.0)
    assert expected([None, None], [None, None]) == (None, None)  # CPU devices: nothing to say
