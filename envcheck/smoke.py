"""`envcheck gpu-smoke`: will this host really compute on the GPU, and compute correctly?

This slice runs the bundled model test (`python -m model.smoke --json`) on this host through the
runner seam and judges it: which backend JAX picked (GPU, or the labelled CPU fallback) and whether
the numerics and the greedy generation match HF. The passthrough chain (driver, toolkit, daemon,
container) plugs in ahead of it as further checks.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from envcheck import runner as runner_module
from envcheck.report import Check, Report
from envcheck.runner import Runner, RunResult

MODEL_SMOKE_ARGV = [sys.executable, "-m", "model.smoke", "--json"]
MODEL_CHECK_IDS = ("model.load", "model.parity", "model.generate", "model.attention")


def gpu_smoke(*, timeout_s: float = 600.0, run: Runner | None = None) -> Report:
    run = run or runner_module.run  # looked up per call, so tests can replace the seam
    result = run(MODEL_SMOKE_ARGV, timeout_s)
    model_report, problem = parse_model_report(result)
    if problem is not None:
        return Report("smoke", "fail", [problem], {"model": None})
    checks = [backend_check(model_report["device"])]
    checks += [model_check(raw) for raw in model_report["checks"]]
    facts = {"device": model_report["device"], "model": model_facts(model_report)}
    return Report("smoke", verdict(checks, model_report["device"]), checks, facts)


def parse_model_report(result: RunResult) -> tuple[dict[str, Any] | None, Check | None]:
    """The model test's JSON report, or a failed `model.run` check saying why there is none."""
    fix = "run `python -m model.smoke` by hand to see the full error"
    if result.timed_out:
        return None, Check("model.run", "fail", "the model test timed out",
                           _tail(result.err), "raise --timeout-s, or check the device is not hung")
    try:
        report = json.loads(result.out.strip().splitlines()[-1])
        assert isinstance(report, dict) and report.get("schema") == "envcheck.model-smoke/v1"
        assert {c["id"] for c in report["checks"]} == set(MODEL_CHECK_IDS)
    except (IndexError, json.JSONDecodeError, AssertionError, KeyError, TypeError):
        return None, Check("model.run", "fail",
                           f"the model test gave no report (exit code {result.rc})",
                           _tail(result.err or result.out), fix)
    return report, None


def backend_check(device: dict[str, Any]) -> Check:
    if device["backend"] == "gpu":
        return Check("jax.backend", "pass",
                     f"JAX computes on {device['device_count']}× {device['device_kind']}")
    return Check(
        "jax.backend", "warn",
        f"JAX computes on the {device['backend']} ({device['device_kind']}): CPU fallback",
        fix="no GPU is visible to JAX: on a GPU host install `envcheck[cuda12]` "
            "(jax[cuda12]) and check the driver",
    )


def model_check(raw: dict[str, Any]) -> Check:
    return Check(raw["id"], raw["status"], raw["summary"], fix=raw.get("fix"))


def model_facts(model_report: dict[str, Any]) -> dict[str, Any]:
    by_id = {c["id"]: c for c in model_report["checks"]}
    return {
        "impl": model_report["impl"], "impl_used": model_report["impl_used"],
        "attention": by_id["model.attention"].get("implementations", []),
        "max_abs_diff": by_id["model.parity"].get("max_abs_diff"),
        "tolerance": by_id["model.parity"].get("tolerance"),
        "generate_tokens_per_s": by_id["model.generate"].get("tokens_per_s"),
        "timings_s": model_report["timings_s"],
    }


def verdict(checks: list[Check], device: dict[str, Any]) -> str:
    if any(c.status == "fail" for c in checks):
        return "fail"
    return "gpu" if device["backend"] == "gpu" else "cpu-fallback"


def _tail(text: str, lines: int = 5) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])
