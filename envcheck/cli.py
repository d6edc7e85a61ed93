"""The `envcheck` command: click commands only. Each parses its options (validators in
options.py), calls one pipeline, renders its report and sets the exit code; the process around
them (signals, stdout, errors) is process.py's."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
from rich.console import Console

from envcheck import __version__, options
from envcheck.dev_image import CPU_BASE, CUDA_BASE, DEV_IMAGE
from envcheck.errors import EXIT_FAILED, EXIT_OK, UnreadableInput
from envcheck.process import OneLineGroup, run
from envcheck.progress import layer_bars, spinner
from envcheck.report import redacted_report, to_json


@click.group(cls=OneLineGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="envcheck")
def cli() -> None:
    """envcheck: will this image, on this host, really use the GPU — and compute correctly?"""


@cli.command("gpu-smoke")
@click.option("--image", default=DEV_IMAGE, show_default=True, callback=options.image,
              help="The image to run (the one `envcheck build` makes).")
@click.option("--no-container", is_flag=True,
              help="Host checks only; the model test runs on this host.")
@click.option("--json", "as_json", is_flag=True, help="One JSON report (envcheck.smoke/v1).")
@click.option("--require-gpu", is_flag=True, help="Exit 1 on cpu-fallback too.")
@click.option("--timeout-s", type=click.FloatRange(min=1), default=600, show_default=True,
              help="Limit for the model test.")
@click.option("--redact-uuids", is_flag=True, help="Replace GPU/MIG UUIDs (to share a report).")
@click.option("--metrics", type=click.Path(path_type=Path), callback=options.metrics_file,
              metavar="FILE", help="Also write Prometheus metrics there (node_exporter's "
                                   "textfile format, atomically).")
@click.option("--level", type=click.Choice(["quick", "medium", "long"]), default="quick",
              show_default=True, help="quick: every device's numerics and a short matmul; "
              "medium: + memory/transfer bandwidth, all-reduce sweep, siblings; long: + burn-in.")
@click.option("--duration", type=click.FloatRange(min=1), default=600, show_default=True,
              help="With --level long: the burn-in's seconds (added to --timeout-s).")
@click.option("--health-check", is_flag=True,
              help="As slurmd's HealthCheckProgram: check this node (quick level, within "
                   "--budget-s), drain it on failure, resume it if envcheck drained it.")
@click.option("--node", help="With --health-check: the node's Slurm name [default: "
                             "SLURMD_NODENAME, else the short host name].")
@click.option("--budget-s", type=click.FloatRange(min=5), default=50, show_default=True,
              help="With --health-check: kill the check after this long and drain the node "
                   "(slurmd kills its HealthCheckProgram at 60 s).")
@click.option("--build-missing", is_flag=True,
              help="Build the image first when the engine lacks it (as `envcheck build`); "
                   "where no base can be had, test on this host and say so.")
@click.option("--base-image", help=f"With --build-missing: the FROM image [default: {CUDA_BASE} "
                                   f"on a GPU host, {CPU_BASE} otherwise].")
@click.option("--ca-bundle", type=click.Path(dir_okay=False, path_type=Path),
              help="With --build-missing: as `envcheck build --ca-bundle`.")
@click.option("--network", type=click.Choice(["host", "default"]), default="default",
              show_default=True, help="With --build-missing: as `envcheck build --network`.")
def gpu_smoke_command(image: str, no_container: bool, as_json: bool, require_gpu: bool,
                      timeout_s: float, redact_uuids: bool, metrics: Path | None, level: str,
                      duration: float, health_check: bool, node: str | None, budget_s: float,
                      build_missing: bool,
                      base_image: str | None, ca_bundle: Path | None, network: str) -> None:
    """Check the GPU passthrough chain link by link, then run the bundled GPT-2 test in the
    container (on the GPU, or the labelled CPU fallback).

    \b
    Example:
        envcheck gpu-smoke --json
        envcheck gpu-smoke --image envcheck-dev:latest --require-gpu
        envcheck gpu-smoke --build-missing
        envcheck gpu-smoke --level medium --require-gpu
    """
    if health_check:
        from envcheck import runner
        from envcheck.fleet import health

        name = health.node_name(node)
        with health.exclusive(name) as alone:
            if not alone:
                click.echo(f"envcheck health check on {name}: another one is running; this one "
                           "did nothing")
                sys.exit(EXIT_OK)
            result = health.check(name, health.smoke_argv(budget_s, no_container, image,
                                                          require_gpu),
                                  budget_s, require_gpu, runner.run)
        click.echo(result.line())
        sys.exit(EXIT_OK if result.row.status == "reported" and not any(
            a.action == "drain" for a in result.actions) else EXIT_FAILED)
    from envcheck.build import BuildOptions
    from envcheck.gpu_smoke import gpu_smoke
    from envcheck.gpu_smoke.chain import ModelLevel
    from envcheck.gpu_smoke.render import render_smoke

    build = BuildOptions(base_image=base_image, network=network,
                         ca_bundle=ca_bundle) if build_missing else None
    start_s = time.perf_counter()
    with spinner("checking the host") as update:
        on_stage = (lambda name: update(f"gpu-smoke: {name}")) if update else None
        # the burn-in's duration comes on top of the model test's own limit
        limit_s = timeout_s + (duration if level == "long" else 0)
        report = gpu_smoke(image=image, no_container=no_container, timeout_s=limit_s,
                           build=build, on_stage=on_stage, level=ModelLevel(level, duration))
    if redact_uuids:
        report = redacted_report(report)
    if as_json:
        click.echo(json.dumps(to_json(report), indent=2))
    else:
        render_smoke(report, Console(highlight=False, soft_wrap=True))
    if metrics:
        from envcheck import metrics as prometheus

        prometheus.write(metrics, prometheus.smoke_registry(report,
                                                            time.perf_counter() - start_s))
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


@fleet_group.command("slurm")
@click.option("--partition", help="Only this partition.")
@click.option("--nodes", help="Only these nodes (a Slurm node list, e.g. n[1-8]).")
@click.option("--gres", help="GRES per node for the step, e.g. gpu:1 (sets CUDA_VISIBLE_DEVICES).")
@click.option("--image", callback=options.image,
              help="The image gpu-smoke runs on each node (default: its own default).")
@click.option("--no-container", is_flag=True, help="Host checks and the model test on the host.")
@click.option("--timeout-s", type=click.FloatRange(min=1), default=600, show_default=True,
              help="Limit for each node's model test (the step gets a minute more).")
@click.option("--require-gpu", is_flag=True, help="Exit 1 unless every node's verdict is gpu.")
@click.option("--all", "show_all", is_flag=True, help="List every node, however many.")
@click.option("--json", "as_json", is_flag=True, help="One JSON report (envcheck.fleet/v1).")
@click.option("--metrics", type=click.Path(path_type=Path), callback=options.metrics_file,
              metavar="FILE", help="Also write Prometheus metrics there (node_exporter's "
                                   "textfile format, atomically).")
@click.option("--drain", is_flag=True, help="Drain failing nodes (reason 'envcheck: …'); resume "
                                            "nodes envcheck drained that now pass.")
@click.option("--dry-run", is_flag=True, help="With --drain: print the scontrol commands only.")
def fleet_slurm_command(partition, nodes, gres, image, no_container, timeout_s, require_gpu,
                        show_all, as_json, metrics, drain, dry_run) -> None:
    """Run `envcheck gpu-smoke --json` on every node (one srun task per node) and print one
    table: node, verdict, GPUs, driver, model time, first failed check; then the groups of
    nodes that fail the same way.

    \b
    Example:
        envcheck fleet slurm --partition gpu --gres gpu:1
    """
    from envcheck import metrics as prometheus
    from envcheck.fleet import slurm
    from envcheck.fleet.aggregate import render, summarize

    if dry_run and not drain:
        raise click.UsageError("--dry-run goes with --drain (it prints the scontrol commands "
                               "--drain would run)")
    with spinner("running gpu-smoke on every node through srun"):
        rows, seconds = slurm.timed_fleet(partition=partition, nodes=nodes, gres=gres,
                                          image=image, timeout_s=timeout_s,
                                          no_container=no_container)
    fleet = summarize(rows, "slurm", require_gpu=require_gpu, seconds=round(seconds, 3))
    if drain:
        fleet.actions = slurm.act(rows, partition, nodes, require_gpu, dry_run)
    click.echo(json.dumps(to_json(fleet), indent=2) if as_json else render(fleet, show_all))
    if metrics:
        prometheus.write(metrics, prometheus.fleet_registry(fleet, seconds))
    if any(action.error for action in fleet.actions):
        raise UnreadableInput("some of --drain's scontrol commands failed (listed above): "
                              f"{next(a.error for a in fleet.actions if a.error)}")
    sys.exit(EXIT_OK if fleet.ok else EXIT_FAILED)


@fleet_group.group("k8s")
def fleet_k8s_group() -> None:
    """Kubernetes: render the smoke DaemonSet/Job, collect the reports from the pods.

    \b
    Example:
        envcheck fleet k8s collect --namespace envcheck
    """


@fleet_k8s_group.command("render")
@click.option("--kind", type=click.Choice(["daemonset", "job"]), default="daemonset",
              show_default=True)
@click.option("--image", default=DEV_IMAGE, show_default=True, callback=options.pulled_image)
@click.option("--namespace", default="envcheck", show_default=True, callback=options.k8s_label)
@click.option("--nodes", type=click.IntRange(min=1), default=1, show_default=True,
              help="Job completions/parallelism: the number of GPU nodes.")
@click.option("--runtime-class", callback=options.k8s_subdomain,
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
@click.option("--namespace", default="envcheck", show_default=True, callback=options.k8s_label)
@click.option("--require-gpu", is_flag=True, help="Exit 1 unless every node's verdict is gpu.")
@click.option("--all", "show_all", is_flag=True, help="List every node, however many.")
@click.option("--json", "as_json", is_flag=True, help="One JSON report (envcheck.fleet/v1).")
@click.option("--metrics", type=click.Path(path_type=Path), callback=options.metrics_file,
              metavar="FILE", help="Also write Prometheus metrics there (node_exporter's "
                                   "textfile format, atomically).")
def fleet_k8s_collect_command(namespace, require_gpu, show_all, as_json, metrics) -> None:
    """Read the smoke pods' logs (kubernetes client) and print the fleet table.

    \b
    Example:
        envcheck fleet k8s collect --namespace envcheck
    """
    from envcheck import metrics as prometheus
    from envcheck.fleet import k8s
    from envcheck.fleet.aggregate import render, summarize

    start_s = time.perf_counter()
    rows = k8s.collect(k8s.core_api(), namespace)
    fleet = summarize(rows, "kubernetes", require_gpu=require_gpu,
                      seconds=round(time.perf_counter() - start_s, 3))
    click.echo(json.dumps(to_json(fleet), indent=2) if as_json else render(fleet, show_all))
    if metrics:
        prometheus.write(metrics, prometheus.fleet_registry(fleet, fleet.seconds or 0.0))
    sys.exit(EXIT_OK if fleet.ok else EXIT_FAILED)


# Each layer in flight holds about 12 MB of buffers (bench_inspect: 56 MB at --jobs 1, 68 at 2),
# so 8 keep a run near the 150 MB budget; 8 streams keep about 16 cores busy.
JOBS_MAX = 8


@cli.command("inspect-image")
@click.argument("ref")
@click.option("--platform", callback=options.platform,
              help="OS/ARCH[/VARIANT] to pick from a multi-arch index (a single-platform image "
                   "must be that platform).")
@click.option("--files", "file_globs", multiple=True, metavar="GLOB",
              help="List matching paths of the merged filesystem (repeatable).")
@click.option("--layers/--no-layers", default=True, show_default=True,
              help="Stream every layer (diff_ids, files, ld.so.cache) or stop at the config.")
@click.option("--driver-version", metavar="X.Y[.Z]", callback=options.driver_version,
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
    from envcheck.image.inspect import inspect_image
    from envcheck.image.render import render_image

    if file_globs and not layers:
        raise click.UsageError("--files lists the layers' files, which --no-layers does not "
                               "read: drop one of them")
    with layer_bars() as progress:
        report = inspect_image(ref, platform=platform, file_globs=file_globs, layers=layers,
                               driver_version=driver_version, progress=progress,
                               timeout_s=timeout_s, jobs=jobs)
    if as_json:
        click.echo(json.dumps(to_json(report), indent=2))
    else:
        render_image(report, Console(highlight=False, soft_wrap=True))
    sys.exit(EXIT_FAILED if report.verdict == "fail" else EXIT_OK)


@cli.command("build")
@click.option("--base-image", default=CUDA_BASE, show_default=True,
              help="FROM image (must be present or pullable).")
@click.option("--tag", default=DEV_IMAGE, show_default=True)
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

    with spinner("starting the build") as update:
        on_step = (lambda step: update(f"building: {step}")) if update else None
        result = builder.build(base_image=base_image, tag=tag, jax_extra=jax_extra,
                               ca_bundle=ca_bundle, network=network, timeout_s=timeout_s,
                               on_step=on_step)
    if as_json:
        click.echo(json.dumps(to_json(result), indent=2))
    else:
        click.echo(f"built {result.tag} {result.image_id[:19]} "
                   f"{result.size_bytes / 1e6:.0f} MB in {result.seconds:.1f} s "
                   f"({result.steps} steps, base {result.base_image}, jax {result.jax_extra})")


def main() -> None:
    run(cli)
