"""Text rendering of a gpu-smoke report: a line per check, the model test's line, the verdict."""

from __future__ import annotations

from rich.console import Console

from envcheck.gpu_smoke.report import SmokeReport
from envcheck.report import render_checks

VERDICT_TEXT = {
    "gpu": "VERDICT gpu: the model test ran on the GPU and matched HF",
    "cpu-fallback": "VERDICT cpu-fallback: no GPU reached; the model test ran on the CPU and "
                    "matched HF",
    "fail": "VERDICT fail: the model test failed, or the container path is broken",
}
WHERE = {"host": "on this host", "container-gpu": "in the container",
         "container-cpu": "in the container", "none": "nowhere"}


def render_smoke(report: SmokeReport, console: Console) -> None:
    render_checks(report.checks, console)
    if report.model and report.device:
        console.print(model_line(report), highlight=False, markup=False)
    first = report.first_failed
    link = f" (first broken link: {first.id} — {first.summary})" if first else ""
    untested = ("; the container path was not tested (image.present says why)"
                if report.container_untested else "")
    console.print(VERDICT_TEXT[report.verdict] + (link if report.verdict != "gpu" else "")
                  + untested, highlight=False, markup=False)


def model_line(report: SmokeReport) -> str:
    """What the model test did and how long it took (its timings, not a utilisation)."""
    model, device = report.model, report.device
    diff = f"{model.max_abs_diff:.2e}" if model.max_abs_diff is not None else "-"
    forward = model.timings_s.get("forward")
    decode = model.generate_tokens_per_s
    return (f"model ({WHERE[report.mode]}): attention {model.impl} → {model.impl_used} on "
            f"{device.backend} ({device.device_kind}), max |Δlogit| vs HF {diff}, forward "
            + (f"{forward * 1e3:.2f} ms" if forward is not None else "-")
            + ", greedy decode " + (f"{decode} tok/s" if decode is not None else "-"))
