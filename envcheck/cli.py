"""The `envcheck` command: a thin click layer. Parse -> call one pipeline -> render -> exit code."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import re
import signal
import sys
from pathlib import Path

import click
from rich.console import Console

from envcheck import __version__
from envcheck.report import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    Report,
    redacted_report,
    render_checks,
)

VERDICT_TEXT = {
    "gpu": "VERDICT gpu: the model test ran on the GPU and matched HF",
    "cpu-fallback": "VERDICT cpu-fallback: no GPU reached; the model test ran on the CPU and "
                    "matched HF",
    "fail": "VERDICT fail: the model test failed, or the container path is broken",
}


class _OneLineUsageError(click.UsageError):
    """A usage error shown as one line, like every other error envcheck prints (click's own
    shows the usage and a hint on lines above it)."""

    def show(self, file=None) -> None:
        usage = " ".join(self.ctx.get_usage().split()) if self.ctx else ""
        where = f" ({usage.replace('Usage: ', 'usage: ', 1)}; --help for more)" if usage else ""
        click.echo(f"Error: {self.format_message()}{where}", file=file, err=True)


@contextlib.contextmanager
def _one_line_usage_errors():
    try:
        yield
    except click.exceptions.NoArgsIsHelpError:
        raise  # a bare `envcheck` or `envcheck fleet` shows its help
    except click.UsageError as error:
        if isinstance(error, _OneLineUsageError):
            raise
        raise _OneLineUsageError(error.format_message(), error.ctx) from None


class _Cli(click.Group):
    """The command group: usage errors, wherever they are raised (parsing, a nested group, a
    command's own check), are one line with the exit code 2."""

    def make_context(self, *args, **kwargs) -> click.Context:
        with _one_line_usage_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: click.Context):
        with _one_line_usage_errors():
            return super().invoke(ctx)


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="envcheck")
def cli() -> None:
    """envcheck: will this image, on this host, really use the GPU — and compute correctly?"""


def _image_option(ctx, param, value: str | None) -> str | None:
    """An image as docker run takes it: a reference, or an image ID the engine has."""
    return _checked_image(value, pulled=False)


def _pulled_image_option(ctx, param, value: str) -> str:
    """An image for a Kubernetes manifest: a reference a kubelet can pull (no ID)."""
    return _checked_image(value, pulled=True)


def _checked_image(value: str | None, pulled: bool) -> str | None:
    from envcheck.image import reference

    if value is None:
        return None
    try:
        ref = reference.parse(value) if value == value.strip() else None
    except reference.RefSyntaxError:
        ref = None
    by_id = not pulled and reference.IMAGE_ID_RE.fullmatch(value) is not None
    if not by_id and (ref is None or ref.transport != "docker"):
        raise click.BadParameter(
            f"{value!r} is not an image reference{' a kubelet can pull' if pulled else ''} (e.g. "
            f"{'registry.example/envcheck:1' if pulled else 'envcheck-dev:latest or an image ID'})")
    return value


@cli.command("gpu-smoke")
@click.option("--image", default="envcheck-dev:latest", show_default=True,
              callback=_image_option, help="The image to run (the one `envcheck build` makes).")
@click.option("--no-container", is_flag=True,
              help="Host checks only; the model test runs on this host.")
@click.option("--json", "as_json", is_flag=True, help="One JSON report (envcheck.smoke/v1).")
@click.option("--require-gpu", is_flag=True, help="Exit 1 on cpu-fallback too.")
@click.option("--timeout-s", type=click.FloatRange(min=1), default=600, show_default=True,
              help="Limit for the model test.")
@click.option("--redact-uuids", is_flag=True, help="Replace GPU/MIG UUIDs (to share a report).")
def gpu_smoke_command(image: str, no_container: bool, as_json: bool, require_gpu: bool,
                      timeout_s: float, redact_uuids: bool) -> None:
    """Check the GPU passthrough chain link by link, then run the bundled GPT-2 test in the
    container (on the GPU, or the labelled CPU fallback).

    \b
    Example:
        envcheck gpu-smoke --json
        envcheck gpu-smoke --image envcheck-dev:latest --require-gpu
    """
    from envcheck.smoke import gpu_smoke

    with _spinner("checking the host") as update:
        on_stage = (lambda name: update(f"gpu-smoke: {name}")) if update else None
        report = gpu_smoke(image=image, no_container=no_container, timeout_s=timeout_s,
                           on_stage=on_stage)
    if redact_uuids:
        report = redacted_report(report)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        render_smoke(report, Console(highlight=False, soft_wrap=True))
    failed = report.verdict == "fail" or (require_gpu and report.verdict != "gpu")
    sys.exit(EXIT_FAILED if failed else EXIT_OK)


@cli.group("fleet")
def fleet_group() -> None:
    """gpu-smoke on every node of a cluster, through the cluster's own scheduler.

    \b
    Example:
        envcheck fleet slurm --partition gpu --gres gpu:1
        envcheck fleet k8s render | kubectl apply -f -
    """


def _emit_fleet(rows, engine: str, seconds: float, as_json: bool, show_all: bool,
                require_gpu: bool) -> None:
    from envcheck.fleet.aggregate import render, summarize

    fleet = summarize(rows, engine, require_gpu=require_gpu, seconds=round(seconds, 3))
    if as_json:
        click.echo(json.dumps(fleet, indent=2))
    else:
        click.echo("\n".join(render(fleet, show_all)))
    sys.exit(EXIT_OK if fleet["ok"] else EXIT_FAILED)


@fleet_group.command("slurm")
@click.option("--partition", help="Only this partition.")
@click.option("--nodes", help="Only these nodes (a Slurm node list, e.g. n[1-8]).")
@click.option("--gres", help="GRES per node for the step, e.g. gpu:1 (sets CUDA_VISIBLE_DEVICES).")
@click.option("--image", callback=_image_option,
              help="The image gpu-smoke runs on each node (default: its own default).")
@click.option("--no-container", is_flag=True, help="Host checks and the model test on the host.")
@click.option("--timeout-s", type=click.FloatRange(min=1), default=600, show_default=True,
              help="Limit for each node's model test (the step gets a minute more).")
@click.option("--require-gpu", is_flag=True, help="Exit 1 unless every node's verdict is gpu.")
@click.option("--all", "show_all", is_flag=True, help="List every node, however many.")
@click.option("--json", "as_json", is_flag=True, help="One JSON report (envcheck.fleet/v1).")
def fleet_slurm_command(partition, nodes, gres, image, no_container, timeout_s, require_gpu,
                        show_all, as_json) -> None:
    """Run `envcheck gpu-smoke --json` on every node (one srun task per node) and print one
    table: node, verdict, GPUs, driver, model time, first failed check; then the groups of
    nodes that fail the same way.

    \b
    Example:
        envcheck fleet slurm --partition gpu --gres gpu:1
    """
    from envcheck.fleet import slurm

    try:
        with _spinner("running gpu-smoke on every node through srun"):
            rows, seconds = slurm.timed_fleet(partition=partition, nodes=nodes, gres=gres,
                                              image=image, timeout_s=timeout_s,
                                              no_container=no_container)
    except slurm.SlurmError as error:
        _fail(str(error), EXIT_USAGE)
    _emit_fleet(rows, "slurm", seconds, as_json, show_all, require_gpu)


@fleet_group.group("k8s")
def fleet_k8s_group() -> None:
    """Kubernetes: render the smoke DaemonSet/Job, collect the reports from the pods.

    \b
    Example:
        envcheck fleet k8s collect --namespace envcheck
    """


K8S_LABEL_RE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")  # RFC 1123, as Kubernetes


def _k8s_label_option(ctx, param, value: str) -> str:
    """A namespace: a DNS label, as the API server checks it (refused before anything is
    applied)."""
    return _checked_k8s_name(value, dotted=False)


def _k8s_subdomain_option(ctx, param, value: str | None) -> str | None:
    """A runtime class name: a DNS subdomain (labels joined by dots)."""
    return None if value is None else _checked_k8s_name(value, dotted=True)


def _checked_k8s_name(value: str, dotted: bool) -> str:
    parts = value.split(".") if dotted else [value]
    if len(value) > (253 if dotted else 63) or not all(map(K8S_LABEL_RE.fullmatch, parts)):
        raise click.BadParameter(
            f"{value!r} is not a Kubernetes name: lower-case letters, digits and '-', starting "
            f"and ending with a letter or digit{', in dot-separated parts' if dotted else ''}, "
            f"at most {253 if dotted else 63} characters")
    return value


@fleet_k8s_group.command("render")
@click.option("--kind", type=click.Choice(["daemonset", "job"]), default="daemonset",
              show_default=True)
@click.option("--image", default="envcheck-dev:latest", show_default=True,
              callback=_pulled_image_option)
@click.option("--namespace", default="envcheck", show_default=True, callback=_k8s_label_option)
@click.option("--nodes", type=click.IntRange(min=1), default=1, show_default=True,
              help="Job completions/parallelism: the number of GPU nodes.")
@click.option("--runtime-class", callback=_k8s_subdomain_option,
              help="runtimeClassName, where the cluster uses one (nvidia).")
def fleet_k8s_render_command(kind, image, namespace, nodes, runtime_class) -> None:
    """Print the manifests (Namespace + DaemonSet or Job) for `kubectl apply -f -`.

    \b
    Example:
        envcheck fleet k8s render --image registry.example/envcheck:1 | kubectl apply -f -
    """
    from envcheck.fleet.k8s import render

    click.echo(render(kind, image, namespace, nodes, runtime_class), nl=False)


@fleet_k8s_group.command("collect")
@click.option("--namespace", default="envcheck", show_default=True, callback=_k8s_label_option)
@click.option("--require-gpu", is_flag=True, help="Exit 1 unless every node's verdict is gpu.")
@click.option("--all", "show_all", is_flag=True, help="List every node, however many.")
@click.option("--json", "as_json", is_flag=True, help="One JSON report (envcheck.fleet/v1).")
def fleet_k8s_collect_command(namespace, require_gpu, show_all, as_json) -> None:
    """Read the smoke pods' logs (kubernetes client) and print the fleet table.

    \b
    Example:
        envcheck fleet k8s collect --namespace envcheck
    """
    import time

    from envcheck.fleet import k8s

    start_s = time.perf_counter()
    try:
        rows = k8s.collect(k8s.core_api(), namespace)
    except k8s.KubernetesError as error:
        _fail(str(error), EXIT_USAGE)
    _emit_fleet(rows, "kubernetes", time.perf_counter() - start_s, as_json, show_all, require_gpu)


# Each layer in flight holds about 12 MB of buffers (bench_inspect: 56 MB at --jobs 1, 68 at 2),
# so 8 keep a run near the 150 MB budget; 8 streams keep about 16 cores busy.
JOBS_MAX = 8


@cli.command("inspect-image")
@click.argument("ref")
@click.option("--platform", help="OS/ARCH[/VARIANT] to pick from a multi-arch index (a "
              "single-platform image must be that platform).")
@click.option("--files", "file_globs", multiple=True, metavar="GLOB",
              help="List matching paths of the merged filesystem (repeatable).")
@click.option("--layers/--no-layers", default=True, show_default=True,
              help="Stream every layer (diff_ids, files, ld.so.cache) or stop at the config.")
@click.option("--driver-version", metavar="X.Y[.Z]",
              help="Judge NVIDIA_REQUIRE_CUDA against this driver (default: this host's).")
@click.option("--json", "as_json", is_flag=True, help="One JSON report (envcheck.image/v1).")
@click.option("--timeout-s", type=click.FloatRange(min=1), default=30, show_default=True,
              help="Per-request limit for registry and daemon calls.")
@click.option("--jobs", type=click.IntRange(1, JOBS_MAX), default=None,
              help=f"Layers streamed at once, at most {JOBS_MAX} [default: CPUs/2, 2 to 4; 1 "
                   "on one core].")
def inspect_image_command(ref, platform, file_globs, layers, driver_version, as_json,
                          timeout_s, jobs) -> None:
    """Inspect an image without running it: digests, env, CUDA, where libcuda resolves.

    REF: a registry reference (nvidia/cuda:12.8.0-cudnn-devel-ubuntu24.04,
    localhost:5000/x:tag, docker://…, …@sha256:…), docker-daemon:NAME[:TAG] (or an image
    ID), docker-archive:PATH[:NAME[:TAG]|:@N] or oci:DIR[:TAG].

    \b
    Example:
        envcheck inspect-image nvidia/cuda:12.8.0-cudnn-devel-ubuntu24.04 --driver-version 550.54
    """
    from envcheck.image import inspect as pipeline
    from envcheck.image.reference import RefSyntaxError
    from envcheck.image.render import render_image

    if driver_version is not None:
        _check_version_option(driver_version)
    if platform is not None:
        platform = _platform_option(platform)
    if file_globs and not layers:
        raise click.UsageError("--files lists the layers' files, which --no-layers does not "
                               "read: drop one of them")
    try:
        with _layer_progress() as progress:
            report = pipeline.inspect_image(
                ref, platform=platform, file_globs=file_globs, layers=layers,
                driver_version=driver_version, progress=progress, timeout_s=timeout_s,
                jobs=jobs)
    except RefSyntaxError as error:
        _fail(str(error), EXIT_USAGE)
    except pipeline.LayerError as error:
        _fail(str(error), EXIT_FAILED)
    except pipeline.SourceError as error:
        _fail(str(error), error.exit_code)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        render_image(report, Console(highlight=False, soft_wrap=True))
    sys.exit(EXIT_FAILED if report.verdict == "fail" else EXIT_OK)


@cli.command("build")
@click.option("--base-image", default="nvidia/cuda:12.8.0-cudnn-devel-ubuntu24.04",
              show_default=True, help="FROM image (must be present or pullable).")
@click.option("--tag", default="envcheck-dev:latest", show_default=True)
@click.option("--jax-extra", type=click.Choice(["cuda12", "cpu"]), default="cuda12",
              show_default=True, help="jax[cuda12] or plain (CPU) jax.")
@click.option("--ca-bundle", type=click.Path(dir_okay=False, path_type=Path),
              help="Extra CA bundle for pip inside the build (TLS-intercepting proxies).")
@click.option("--network", type=click.Choice(["host", "default"]), default="default",
              show_default=True, help="Network of the build's RUN steps (host to pip-install "
                                      "on a daemon without bridges).")
@click.option("--json", "as_json", is_flag=True, help="One JSON result.")
@click.option("--timeout-s", type=click.FloatRange(min=1), default=3600, show_default=True)
def build_command(base_image, tag, jax_extra, ca_bundle, network, as_json, timeout_s) -> None:
    """Build the dev/smoke image (docker/Dockerfile) through the Docker SDK.

    \b
    Example:
        envcheck build --jax-extra cpu --network host \\
            --ca-bundle /etc/ssl/certs/ca-certificates.crt
    """
    from envcheck import build as builder

    try:
        with _spinner("starting the build") as update:
            on_step = (lambda step: update(f"building: {step}")) if update else None
            result = builder.build(base_image=base_image, tag=tag, jax_extra=jax_extra,
                                   ca_bundle=ca_bundle, network=network, timeout_s=timeout_s,
                                   on_step=on_step)
    except builder.BundleError as error:
        _fail(str(error), EXIT_USAGE)
    except builder.BuildError as error:
        click.echo(f"Error: {error}", err=True)
        for line in error.tail:
            click.echo(f"  | {line}", err=True)
        sys.exit(EXIT_FAILED)
    payload = {"schema": "envcheck.build/v1", **dataclasses.asdict(result)}
    if as_json:
        click.echo(json.dumps(payload, indent=2))
    else:
        click.echo(f"built {result.tag} {result.image_id[:19]} "
                   f"{result.size_bytes / 1e6:.0f} MB in {result.seconds:.1f} s "
                   f"({result.steps} steps, base {result.base_image}, jax {result.jax_extra})")


def _check_version_option(text: str) -> None:
    if not re.fullmatch(r"\d+(\.\d+){1,2}", text):
        raise click.BadParameter(f"{text!r} is not X.Y or X.Y.Z", param_hint="--driver-version")


def _platform_option(text: str) -> str:
    """OS/ARCH[/VARIANT], lower-cased as Docker does (linux/amd64, linux/arm64/v8)."""
    if not re.fullmatch(r"[a-z0-9_.-]+/[a-z0-9_.-]+(/[a-z0-9_.-]+)?", text.lower()):
        raise click.BadParameter(f"{text!r} is not OS/ARCH or OS/ARCH/VARIANT (e.g. "
                                 "linux/amd64, linux/arm64/v8)", param_hint="--platform")
    return text.lower()


def _fail(message: str, code: int):
    click.echo(f"Error: {message}", err=True)
    sys.exit(code)


@contextlib.contextmanager
def _layer_progress():
    """Per-layer progress bars (bytes, rate, ETA) on stderr, only on a terminal; yields
    start(index, size) -> advance(n), where index is a layer's number or a step's label."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = ("{task.fields[label]}", BarColumn(), DownloadColumn(),
               TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        def start(index: int | str, size: int):
            label = f"layer {index}" if isinstance(index, int) else index
            task = progress.add_task("", total=size or None, label=label)
            return lambda n: progress.advance(task, n)

        yield start


def render_smoke(report: Report, console: Console) -> None:
    render_checks(report.checks, console)
    model = report.facts.get("model")
    if model:
        device = report.facts["device"]
        timings_s = model["timings_s"]
        where = {"host": "on this host", "container-gpu": "in the container",
                 "container-cpu": "in the container"}[report.facts["mode"]]
        console.print(
            f"model ({where}): attention {model['impl']} → {model['impl_used']} on "
            f"{device['backend']} ({device['device_kind']}), "
            f"max |Δlogit| vs HF {model['max_abs_diff']:.2e}, forward "
            f"{timings_s['forward'] * 1e3:.2f} ms, greedy decode "
            f"{model['generate_tokens_per_s']} tok/s" + _throughput_text(model["throughput"])
        )
    first = report.facts.get("first_failed")
    link = f" (first broken link: {first['id']} — {first['summary']})" if first else ""
    console.print(VERDICT_TEXT[report.verdict] + (link if report.verdict != "gpu" else ""))


def _throughput_text(throughput: dict | None) -> str:
    if not throughput:
        return ""
    return (f", {throughput['achieved_tflops']:.3g} TFLOP/s of a measured "
            f"{throughput['matmul_bf16_tflops']:.3g} TFLOP/s bf16 matmul")


@contextlib.contextmanager
def _spinner(message: str):
    """A spinner on stderr while a slow step runs, only on a terminal; yields update(text)."""
    if not sys.stderr.isatty():
        yield None
        return
    with Console(stderr=True).status(message) as status:
        yield status.update


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(BaseException):
    """A stop signal (Ctrl-C, scancel's and kubectl delete's SIGTERM, a closed terminal's
    SIGHUP) raised in the main thread, so `finally` blocks run on the way out: the gpu-smoke
    container is removed (dockerd would otherwise keep it, and the GPU, until the model test
    ends), layer streams stop, the Slurm allocation is released, the cursor comes back.
    Not a KeyboardInterrupt: click would turn that into "Aborted!" and exit 1, a failed check."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _interrupt(signum: int, frame) -> None:
    for stop in STOP_SIGNALS:  # a second signal ends envcheck at once, cleanup or not
        if signal.getsignal(stop) is _interrupt:
            signal.signal(stop, signal.SIG_DFL)
    raise Interrupted(signum)


def catch_stop_signals() -> None:
    """Stop signals raise Interrupted; one that is ignored (nohup, a background job) stays
    ignored."""
    for stop in STOP_SIGNALS:
        if signal.getsignal(stop) in (signal.SIG_DFL, signal.default_int_handler):
            signal.signal(stop, _interrupt)


class OutputFailed(BaseException):
    """Writing to stdout failed: its reader has gone (`| head`, a closed ssh session), or the
    file it goes to cannot take it (a full disk). Not an OSError, so that neither click (exit 1,
    a failed check, for a broken pipe; a traceback for anything else) nor rich (exit 1) takes
    it for theirs."""

    def __init__(self, error: OSError):
        super().__init__(error)
        self.error = error


class CheckedStdout:
    """sys.stdout, whose write errors raise OutputFailed."""

    def __init__(self, stream):
        self._stream = stream

    def __getattr__(self, name: str):
        return getattr(self._stream, name)

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as error:
            raise OutputFailed(error) from None

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as error:
            raise OutputFailed(error) from None


def _output_failed(error: OSError) -> int:
    """The exit code for a failed write to stdout, after saying why (unless nobody reads)."""
    with contextlib.suppress(OSError, ValueError):  # what is left in the buffer goes nowhere,
        devnull = os.open(os.devnull, os.O_WRONLY)  # instead of failing again at exit
        os.dup2(devnull, sys.__stdout__.fileno())
    if error.errno == errno.EPIPE:  # as a shell reports a program SIGPIPE ended, silently
        return EXIT_INTERRUPTED + signal.SIGPIPE
    with contextlib.suppress(OSError):  # stderr on the same full disk (`2>&1`): the code says it
        click.echo(f"Error: cannot write to standard output ({error.strerror or error}): what "
                   "was written is incomplete; write the output elsewhere", err=True)
    return EXIT_USAGE


def main() -> None:
    catch_stop_signals()
    if sys.stdout is not None:  # None: started with stdout closed (`>&-`); click writes nothing
        sys.stdout = CheckedStdout(sys.stdout)
    try:
        try:
            cli()
        finally:
            if sys.stdout is not None:  # what is still buffered fails here, not at the exit
                sys.stdout.flush()
    except Interrupted as stop:
        name = signal.Signals(stop.signum).name
        click.echo(f"Error: interrupted ({name}): stopped before a verdict, nothing reported",
                   err=True)
        sys.exit(EXIT_INTERRUPTED + stop.signum)
    except OutputFailed as failed:
        sys.exit(_output_failed(failed.error))
