"""The `envcheck` command: a thin click layer. Parse -> call one pipeline -> render -> exit code."""

from __future__ import annotations

import json
import sys

import click
from rich.console import Console

from envcheck import __version__
from envcheck.report import EXIT_FAILED, EXIT_OK, Report, render_checks

VERDICT_TEXT = {
    "gpu": "VERDICT gpu: the model test ran on the GPU and matched HF",
    "cpu-fallback": "VERDICT cpu-fallback: no GPU reached; the model test ran on the CPU and "
                    "matched HF",
    "fail": "VERDICT fail: see the failed checks above",
}


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="envcheck")
def cli() -> None:
    """envcheck: will this image, on this host, really use the GPU — and compute correctly?"""


@cli.command("gpu-smoke")
@click.option("--json", "as_json", is_flag=True, help="One JSON report (envcheck.smoke/v1).")
@click.option("--require-gpu", is_flag=True, help="Exit 1 on cpu-fallback too.")
@click.option("--timeout-s", type=click.FloatRange(min=1), default=600, show_default=True,
              help="Limit for the model test.")
def gpu_smoke_command(as_json: bool, require_gpu: bool, timeout_s: float) -> None:
    """Check the GPU works end to end and run the bundled GPT-2 test on it.

    \b
    Example:
        envcheck gpu-smoke --json
    """
    from envcheck.smoke import gpu_smoke

    with _progress("running the bundled model test"):
        report = gpu_smoke(timeout_s=timeout_s)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        render_smoke(report, Console(highlight=False, soft_wrap=True))
    failed = report.verdict == "fail" or (require_gpu and report.verdict != "gpu")
    sys.exit(EXIT_FAILED if failed else EXIT_OK)


def render_smoke(report: Report, console: Console) -> None:
    render_checks(report.checks, console)
    model = report.facts.get("model")
    if model:
        device = report.facts["device"]
        timings_s = model["timings_s"]
        console.print(
            f"model: attention {model['impl']} → {model['impl_used']} on {device['backend']} "
            f"({device['device_kind']}), "
            f"max |Δlogit| vs HF {model['max_abs_diff']:.2e}, forward "
            f"{timings_s['forward'] * 1e3:.2f} ms, greedy decode "
            f"{model['generate_tokens_per_s']} tok/s"
        )
    console.print(VERDICT_TEXT[report.verdict])


class _progress:
    """A spinner on stderr while a slow step runs, only when stderr is a terminal."""

    def __init__(self, message: str):
        self._status = None
        if sys.stderr.isatty():
            self._status = Console(stderr=True).status(message)

    def __enter__(self):
        if self._status is not None:
            self._status.__enter__()
        return self

    def __exit__(self, *exc):
        if self._status is not None:
            self._status.__exit__(*exc)
        return False


def main() -> None:
    cli()
