"""The model test's report in, gpu-smoke's verdict out: the report read back from the container
(validated against model/report.py, or a failed `model.run` saying why there is none), its
checks joined to the chain's, and the verdict: `gpu`, `cpu-fallback` or `fail`."""

from __future__ import annotations

import json
import re

from envcheck.gpu_smoke import passthrough
from envcheck.gpu_smoke.report import FirstFailed, ModelFacts, PerfFigure, Verdict
from envcheck.nvidia.catalog import UNKNOWN, classify
from envcheck.report import Check, ReportError, read_report
from envcheck.runner import RunResult
from model.report import (
    ALL_CHECK_IDS,
    SCHEMA,
    AllReduceCheck,
    AttentionCheck,
    DeviceFacts,
    GenerateCheck,
    ModelReport,
    ParityCheck,
)

# A failed check of the model report fails the verdict: a wrong device, one below its floors.
BLOCKING = ("docker.reachable", "image.present", "model.run") + ALL_CHECK_IDS
NO_MODULE_RE = re.compile(r"No module named '?([\w.]+)'?")
OLDER_MODEL_RE = re.compile(r"model\.smoke: error: unrecognized arguments: (.+)")
REBUILD_FIX = ("the model test is of another envcheck version: rebuild the image with `envcheck "
               "build` (on the host: reinstall envcheck)")
MODEL_INSTALL_FIX = ("in a container: use the image `envcheck build` makes (Python, JAX, Flax "
                     "and the model package), or base yours on it; on the host "
                     "(--no-container): `pip install envcheck`")


def judge(checks: list[Check], model_run: RunResult | None,
          gpu_expected: bool) -> tuple[Verdict, ModelReport | None, FirstFailed | None]:
    """The model test's checks added to `checks`; the verdict, the model report it rests on,
    and the failure that decided a failed verdict (for a fallback, the first broken link)."""
    model_report = None
    if model_run is not None:
        model_report, problem = parse_model_report(model_run)
        if problem is not None:
            checks.append(problem)
        else:
            checks.append(backend_check(model_report.device, gpu_expected, model_run.err))
            checks += [model_check(check) for check in model_report.checks]
    result = verdict(checks, model_report)
    failed = [c for c in checks if c.status == "fail"]
    deciding = [c for c in failed if c.id in BLOCKING] if result == "fail" else []
    first = (deciding or failed or [None])[0]
    return result, model_report, first and FirstFailed(id=first.id, summary=first.summary)


def parse_model_report(result: RunResult) -> tuple[ModelReport | None, Check | None]:
    """The model test's report, or a failed `model.run` check saying why there is none."""
    fix = "run `python -m model.smoke` by hand (in the image) to see the full error"
    if passthrough.OUT_OF_MEMORY in result.err:
        return None, Check("model.run", "fail", "the model test ran out of memory and was "
                                                "killed", _tail(result.err),
                           "free memory on the host (the container may use up to "
                           f"{passthrough.MEMORY_LIMIT})")
    if passthrough.DAEMON_GONE in result.err:
        return None, Check("model.run", "fail", f"no model report: {passthrough.DAEMON_GONE}",
                           _tail(result.err), "rerun once dockerd is back "
                                              "(`systemctl status docker`)")
    if result.timed_out:
        return None, Check("model.run", "fail", "the model test timed out",
                           _tail(result.err), "raise --timeout-s, or check the device is not hung")
    unusable = _cannot_start(result)
    if unusable:
        return None, Check("model.run", "fail", unusable, _tail(result.err), MODEL_INSTALL_FIX)
    older = OLDER_MODEL_RE.search(result.err) if result.rc == 2 else None
    if older:
        return None, Check("model.run", "fail", f"the image's model test is of an older envcheck "
                                                f"(it does not take {older.group(1)})",
                           _tail(result.err), REBUILD_FIX)
    document = _last_json_line(result.out)
    if document is None or not str(document.get("schema")).startswith("envcheck.model-smoke/"):
        return None, Check("model.run", "fail",
                           f"the model test gave no report (exit code {result.rc})",
                           _tail(result.err or result.out), fix)
    try:
        return read_report(ModelReport, document), None
    except ReportError as error:
        problem = (f"schema {document['schema']}, not {SCHEMA}"
                   if document["schema"] != SCHEMA else str(error))
        return None, Check("model.run", "fail", f"the model test's report is not one this "
                                                f"envcheck reads: {problem}", fix=REBUILD_FIX)


def _last_json_line(out: str) -> dict | None:
    try:
        report = json.loads(out.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return None
    return report if isinstance(report, dict) else None


def _cannot_start(result: RunResult) -> str | None:
    """Why the model test could not even start: no Python, or a module it imports is missing."""
    program = passthrough.missing_program(result.err)
    if program:
        name = "`python` nor `python3`" if program == "python3" else f"`{program}`"
        return (f"the image has no {name}: the model test needs Python with JAX, Flax and "
                "envcheck's model package")
    # what the run died of (its last lines), not a warning about an optional module
    missing = NO_MODULE_RE.search(_tail(result.err, 2)) if result.rc != 0 else None
    return missing and f"the model test cannot import `{missing.group(1)}`"


def backend_check(device: DeviceFacts, gpu_expected: bool, stderr: str) -> Check:
    if device.backend == "gpu":
        return Check("jax.backend", "pass",
                     f"JAX computes on {device.device_count}× {device.device_kind}")
    if gpu_expected:
        entry, matched = classify(stderr)
        if entry is UNKNOWN:
            return Check("jax.backend", "fail", "a GPU was reachable but JAX computes on the "
                                                f"{device.backend}",
                         fix="install `jax[cuda12]` in the image (`envcheck build "
                             "--jax-extra cuda12`)")
        return Check("jax.backend", "fail", f"a GPU was reachable but JAX fell back to the "
                                            f"{device.backend}: {matched}",
                     detail=entry.cause, fix=entry.fix)
    return Check("jax.backend", "warn",
                 f"JAX computes on the {device.backend} ({device.device_kind}): CPU "
                 "fallback, no GPU reached (the first failed link above says why)")


def model_check(check) -> Check:
    return Check(check.id, check.status, check.summary, fix=check.fix)


def model_facts(report: ModelReport) -> ModelFacts:
    parity = report.check(ParityCheck)
    return ModelFacts(impl=report.impl, impl_used=report.impl_used,
                      attention=report.check(AttentionCheck).implementations,
                      max_abs_diff=parity.max_abs_diff, tolerance=parity.tolerance,
                      generate_tokens_per_s=report.check(GenerateCheck).tokens_per_s,
                      timings_s=report.timings_s, devices=report.devices,
                      performance=perf_figures(report))


MEASURES = {"perf.matmul": "matmul_tflops", "perf.memory": "memory_gbps",
            "perf.transfer": "transfer_gbps"}


def perf_figures(report: ModelReport) -> list[PerfFigure]:
    """Every figure of the report's perf.* checks, with its device's UUID and kind, and the
    all-reduce's best bus bandwidth."""
    infos = {run.device.index: run.device for run in report.devices}
    figures = []
    for check in report.checks:
        if check.id in MEASURES:
            directions = getattr(check, "directions", None)
            for i, entry in enumerate(check.entries):
                info = infos.get(entry.device)
                figures.append(PerfFigure(
                    measure=MEASURES[check.id], value=entry.value, device=entry.device,
                    uuid=info and info.uuid, kind=info and info.kind,
                    direction=directions[i] if directions else None))
        elif isinstance(check, AllReduceCheck) and check.sweep:
            figures.append(PerfFigure(measure="allreduce_busbw_gbps",
                                      value=max(p.busbw_gbps for p in check.sweep)))
    return figures


def verdict(checks: list[Check], model_report: ModelReport | None) -> Verdict:
    if any(c.status == "fail" and c.id in BLOCKING for c in checks) or model_report is None:
        return "fail"
    return "gpu" if model_report.device.backend == "gpu" else "cpu-fallback"


def _tail(text: str, lines: int = 5) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])
