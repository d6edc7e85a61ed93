"""`envcheck gpu-smoke`: will this image, on this host, really compute on the GPU — and compute
correctly? The passthrough chain link by link, then the bundled model test in the container.

    host (GPU, module, driver, NVML, device nodes, health) -> toolkit -> docker daemon
      -> image vs driver -> GPU container probe -> `python -m model.smoke --json` in the container
         (with the GPU, or the labelled CPU fallback: no device request, JAX_PLATFORMS=cpu)

A broken link fails with its fix and what depends on it is skipped with the reason. With no
Docker at all, or `--no-container`, the model test runs on this host. Verdict: `gpu` (the model
ran on the GPU and matched HF), `cpu-fallback` (it ran on the CPU and matched; the first broken
link is named) or `fail` (the model test failed, or the container path itself is broken).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import time
from collections.abc import Callable

import msgspec
from msgspec import UNSET

from envcheck import build as builder
from envcheck import runner as runner_module
from envcheck.build import BuildOptions
from envcheck.dev_image import DEV_IMAGE
from envcheck.gpu_smoke import passthrough, preflight
from envcheck.gpu_smoke.judge import judge, model_facts
from envcheck.gpu_smoke.report import (
    HostFacts,
    ImageFacts,
    Leftover,
    Mode,
    NodeFacts,
    PciGpu,
    SmokeReport,
)
from envcheck.host import Probe, counters, daemon
from envcheck.host.driver import DriverFacts, probe_driver
from envcheck.host.nvml import NvmlFacts, probe_nvml
from envcheck.host.toolkit import HOOKS, ToolkitFacts, probe_toolkit
from envcheck.report import Check, redact_env
from envcheck.runner import RunResult

MODEL_ARGV = ["python", "-m", "model.smoke", "--json"]


@dataclasses.dataclass(frozen=True)
class ModelLevel:
    """How deep the model test goes (model.smoke --level), and the burn-in's length."""

    name: str = "quick"
    duration_s: float = 600.0

    def argv(self, in_container: bool) -> list[str]:
        extra = ["--level", self.name]
        extra += ["--duration", f"{self.duration_s:g}"] if self.name == "long" else []
        return [*MODEL_ARGV, *extra, *(["--in-container"] if in_container else [])]
CONTAINER_IDS = ("image.present", "image.requirement", "container.passthrough",
                 *passthrough.INSIDE_IDS)


@dataclasses.dataclass
class ContainerPath:
    """What links 4-7 found on a reachable daemon, for the report."""

    mode: Mode = "none"
    model_run: RunResult | None = None
    untested: str | None = None  # why the container path was not tested
    prediction: preflight.Prediction | None = None  # the image's JAX stack, predicted
    image: ImageFacts | None = None
    seconds: float | None = None
    leftovers: list[Leftover] = dataclasses.field(default_factory=list)


def gpu_smoke(*, image: str = DEV_IMAGE, no_container: bool = False,
              timeout_s: float = 600.0, build: BuildOptions | None = None,
              probe: Probe | None = None, connect=None, predict=None,
              on_stage: Callable[[str], None] | None = None,
              level: ModelLevel = ModelLevel()) -> SmokeReport:
    """The whole chain. With `build`, an image the engine lacks is built first (as `docker
    run` pulls one); where it cannot be (no base image to be had), the model test runs on this
    host and the report says the container path was not tested. `probe` (root + runner) and
    `connect` (the docker seam) let tests run the same code on fixture roots and recorded
    daemon answers; `predict` (image ID, driver) -> preflight.Prediction, the static JAX-stack
    prediction's."""
    probe = probe or Probe()
    stage = _Stages(on_stage)
    stage("host", "host: GPU, driver, NVML")
    checks, driver = probe_driver(probe)
    nvml_checks, nvml = probe_nvml(probe, driver)
    checks += nvml_checks
    before = counters.read(probe) if level.name == "long" and nvml.gpus else None
    stage("docker", "Docker daemon")
    if no_container:
        client, reach = None, Check("docker.reachable", "skip", "--no-container: the model test "
                                                                "runs on this host")
    else:
        client, reach = (connect or daemon.connect)(probe, 30.0)
    client, info, reach = daemon.read_info(client, reach)
    stage("toolkit", "NVIDIA Container Toolkit")
    toolkit_checks, toolkit = probe_toolkit(probe, driver.driver, nvml.gpus,
                                            daemon.is_rootless(info))
    checks += toolkit_checks
    docker = None
    if client is None:
        checks += [reach] + skipped(("docker.runtime", "docker.cdi", "docker.engine",
                                     *CONTAINER_IDS), reach)
        stage("model", "model test on this host")
        path = ContainerPath(mode="host", model_run=host_model_run(timeout_s, level))
    else:
        hooks = any(toolkit.binaries.get(h) for h in HOOKS)
        daemon_checks, docker = daemon.probe_daemon(probe, info, hooks)
        checks += daemon_checks
        build = build and build.for_host(bool(nvml.gpus or driver.pci_gpus))
        path = container_chain(client, image, driver.driver, toolkit, checks, stage, timeout_s,
                               build, predict or preflight.predict, level)
        if path.untested:
            stage("model", "model test on this host")
            path.mode, path.model_run = "host", host_model_run(timeout_s, level)
    gpu_expected = path.mode == "container-gpu" or (path.mode == "host" and bool(nvml.gpus))
    if before is not None:
        checks.append(counters.counters_check(before, counters.read(probe)))
    return smoke_report(checks, path, gpu_expected, host_facts(driver, nvml), toolkit, docker,
                        stage.done(), level.name)


def smoke_report(checks: list[Check], path: ContainerPath, gpu_expected: bool,
                 host: HostFacts, toolkit: ToolkitFacts, docker, timings_s: dict,
                 level: str = "quick") -> SmokeReport:
    verdict, model_report, first = judge(checks, path.model_run, gpu_expected)
    mapped = preflight.mapped_check(path.prediction, model_report.device.mapped_libraries
                                    if model_report else [])
    checks += [mapped] if mapped else []
    return SmokeReport(
        verdict=verdict, level=level, checks=checks, node=node_facts(), mode=path.mode,
        host=host,
        toolkit=toolkit, docker=docker or UNSET,
        leftovers_removed=path.leftovers or UNSET, image=path.image or UNSET,
        container_seconds=UNSET if path.seconds is None else path.seconds,
        container_untested=path.untested or UNSET,
        device=model_report.device if model_report else UNSET,
        model=model_facts(model_report) if model_report else None, first_failed=first,
        timings_s=timings_s)


def host_facts(driver: DriverFacts, nvml: NvmlFacts) -> HostFacts:
    return HostFacts(
        pci_gpus=[PciGpu(**gpu) for gpu in driver.pci_gpus], wsl=driver.wsl,
        module_loaded=driver.module_loaded, nouveau=driver.nouveau, driver=driver.driver,
        kernel_module=driver.kernel_module, driver_cuda=nvml.driver_cuda or driver.driver_cuda,
        device_nodes=driver.device_nodes, gpus=nvml.gpus, nvml_via=nvml.nvml_via)


def container_chain(client, image: str, driver: str | None, toolkit: ToolkitFacts,
                    checks: list[Check], stage, timeout_s: float,
                    build: BuildOptions | None = None, predict=preflight.predict,
                    level: ModelLevel = ModelLevel()) -> ContainerPath:
    """Links 4-7 on a reachable daemon: image (built first when missing and `build` says
    how), GPU probe container, model test in the container (on the GPU when the probe got
    one, else the CPU fallback)."""
    path = ContainerPath(leftovers=[Leftover(**c) for c in
                                    passthrough.remove_leftovers(client)])
    if path.leftovers:  # not a fault of this host's passthrough: said, but no link depends on it
        checks.append(leftovers_check(path.leftovers))
    stage("image", f"image {image}")
    config, present = passthrough.image_env(client, image)
    if config is None and present.detail == passthrough.MISSING and build:
        present, path.untested = build_missing(image, build, stage)
        if present.status == "pass":
            config, present = passthrough.image_env(client, image)
            present = msgspec.structs.replace(present, summary=f"{present.summary}; built by "
                                              f"this run from {build.base_image}")
    checks.append(present)
    if config is None:
        checks += skipped(CONTAINER_IDS[1:], present)
        return path
    path.image = ImageFacts(name=image, id=config["id"], user=config["user"],
                            env=redact_env({k: v for k, v in config["env"].items()
                                            if k.startswith(("NVIDIA_", "CUDA_", "NV_CUDNN",
                                                             "JAX_", "XLA_"))}))
    brands = (toolkit.cli_info.brands if toolkit.cli_info else None) or [None]
    checks.append(passthrough.preflight_check(config["env"], driver, brands[0]))
    stage("preflight", "the image's JAX stack, predicted (cached per image)")
    path.prediction = predict(config["id"], driver)
    checks += path.prediction.checks
    stage("passthrough", "GPU passthrough probe container")
    probe_run = passthrough.run_container(client, image, ["sh", "-c", passthrough.PROBE_SCRIPT],
                                          gpu=True, env=passthrough.GPU_ENV,
                                          user=config["user"], timeout_s=60.0)
    checks += passthrough.passthrough_checks(probe_run, {c.id for c in checks})
    # An image without a shell got as far as exec: its GPU request went through, so the model
    # test (which needs no shell) still asks for the GPU and decides.
    gpu = (probe_run.error is None and probe_run.rc == 0) or bool(
        passthrough.missing_program(probe_run.error or ""))
    stage("model", "model test in the container" + (" on the GPU" if gpu else
                                                               " (CPU fallback)"))
    python = level.argv(in_container=True)
    for argv in (python, ["python3", *python[1:]]):  # Debian/Ubuntu: python3 only
        model = passthrough.run_container(
            client, image, argv, gpu=gpu, env=passthrough.GPU_ENV if gpu else
            passthrough.CPU_ENV, user=config["user"], timeout_s=timeout_s)
        if passthrough.missing_program(model.error or "") != "python":
            break
    path.mode, path.model_run = ("container-gpu" if gpu else "container-cpu"), (
        model.as_run_result())
    path.seconds = round(model.seconds, 3)
    return path


def build_missing(image: str, build: BuildOptions, stage) -> tuple[Check, str | None]:
    """`envcheck build` of the missing image: a passing image.present; a skipped one and why
    the container path goes untested when no base image (or no checkout) can be had; a failed
    one when the build itself fails."""
    stage("build", f"building {image} from {build.base_image} (jax {build.jax_extra})")
    try:
        builder.build(base_image=build.base_image, tag=image, jax_extra=build.jax_extra,
                      network=build.network, ca_bundle=build.ca_bundle,
                      on_step=lambda step: stage.say(f"building {image}: {step}"))
    except (builder.NoBase, builder.NoSources) as error:
        why = f"{image} is not in this Docker engine and cannot be built here: {error}"
        return Check("image.present", "skip", why,
                     fix="build the image where its base can be pulled (`envcheck build`), "
                         "or pass --base-image with a base this engine has"), why
    except builder.BuildError as error:
        return Check("image.present", "fail", f"{image} is not in this Docker engine and "
                                              f"building it failed: {error}",
                     detail="\n".join(error.tail),
                     fix="fix the build (`envcheck build` shows its output)"), None
    return Check("image.present", "pass", f"{image} built"), None


def leftovers_check(leftovers: list[Leftover]) -> Check:
    names = ", ".join(f"{c.name} (envcheck pid {c.owner_pid})" for c in leftovers)
    return Check("docker.leftovers", "warn",
                 f"removed {len(leftovers)} gpu-smoke container(s) whose envcheck was killed "
                 f"before it could remove them: {names}",
                 detail="an envcheck killed outright (SIGKILL: the OOM killer, `kill -9`, "
                        "Slurm's KillWait) leaves its container running its test, holding the "
                        "GPU, until the test ends (never, on a hung GPU)",
                 fix="nothing to do now; if it recurs, find what kills envcheck (`dmesg` for "
                     "the OOM killer, the job's time limit)")


def node_facts() -> NodeFacts:
    """Which machine this is (Slurm's node name when run as a Slurm task) and the GPUs a
    scheduler gave it."""
    return NodeFacts(name=os.environ.get("SLURMD_NODENAME") or socket.gethostname(),
                     cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"))


def host_model_run(timeout_s: float, level: ModelLevel = ModelLevel()) -> RunResult:
    return runner_module.run([sys.executable, *level.argv(in_container=False)[1:]], timeout_s)


def skipped(ids, cause: Check) -> list[Check]:
    return [Check(i, "skip", f"{cause.summary} ({cause.id})") for i in ids]


class _Stages:
    """Stage names to the progress display, and the wall time of each."""

    def __init__(self, on_stage):
        self.on_stage, self.timings_s = on_stage, {}
        self.start_s = self.mark_s = time.perf_counter()
        self.current = None

    def __call__(self, key: str, label: str) -> None:
        self._close()
        self.current = key
        if self.on_stage:
            self.on_stage(label)

    def say(self, label: str) -> None:
        """A new label for the stage that runs (a build's step)."""
        if self.on_stage:
            self.on_stage(label)

    def _close(self) -> None:
        now_s = time.perf_counter()
        if self.current:
            self.timings_s[self.current] = round(now_s - self.mark_s, 3)
        self.mark_s = now_s

    def done(self) -> dict[str, float]:
        self._close()
        self.timings_s["total"] = round(time.perf_counter() - self.start_s, 3)
        return self.timings_s
