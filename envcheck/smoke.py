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

import json
import os
import re
import socket
import sys
import time
from collections.abc import Callable
from types import NoneType
from typing import Any

from envcheck import passthrough
from envcheck import runner as runner_module
from envcheck.build import DEFAULT_TAG
from envcheck.catalog import UNKNOWN, classify
from envcheck.host import Probe, daemon
from envcheck.host.driver import probe_driver
from envcheck.host.nvml import probe_nvml
from envcheck.host.toolkit import HOOKS, probe_toolkit
from envcheck.report import STATUSES, Check, Report, field_problem, redact_env
from envcheck.runner import RunResult

MODEL_ARGV = ["python", "-m", "model.smoke", "--json"]
MODEL_SCHEMA = "envcheck.model-smoke/v1"  # model/smoke.py's SCHEMA
# What gpu-smoke reads of a model report and puts in its own (whose schema says the types):
# the report's fields, each check's, those of its throughput (or null), and per check id.
NUMBER = (int, float)
MODEL_REPORT_FIELDS = (("impl", str), ("impl_used", str), ("checks", list),
                       ("device.backend", str), ("device.device_kind", str),
                       ("device.device_count", int), ("device.jax", str), ("timings_s", dict),
                       ("timings_s.forward", NUMBER), ("throughput", (dict, NoneType)))
MODEL_CHECK_FIELDS = (("status", str), ("summary", str), ("fix", (str, NoneType)))
THROUGHPUT_FIELDS = (("achieved_tflops", NUMBER), ("matmul_bf16_tflops", NUMBER),
                     ("fraction_of_matmul", NUMBER))
FIELDS_BY_CHECK = {"model.load": (), "model.parity": (("max_abs_diff", NUMBER),),
                   "model.generate": (("tokens_per_s", NUMBER),),
                   "model.attention": (("implementations", list),)}
MODEL_CHECK_IDS = tuple(FIELDS_BY_CHECK)
BLOCKING = ("docker.reachable", "image.present", "model.run") + MODEL_CHECK_IDS
CONTAINER_IDS = ("image.present", "image.requirement", "container.passthrough",
                 *passthrough.INSIDE_IDS)


def gpu_smoke(*, image: str = DEFAULT_TAG, no_container: bool = False,
              timeout_s: float = 600.0, probe: Probe | None = None, connect=None,
              on_stage: Callable[[str], None] | None = None) -> Report:
    """The whole chain. `probe` (root + runner) and `connect` (the docker seam) let tests run
    the same code on fixture roots and recorded daemon answers."""
    probe = probe or Probe()
    stage = _Stages(on_stage)
    stage("host", "host: GPU, driver, NVML")
    checks, driver = probe_driver(probe)
    nvml_checks, nvml_facts = probe_nvml(probe, driver)
    checks += nvml_checks
    stage("docker", "Docker daemon")
    if no_container:
        client, reach = None, Check("docker.reachable", "skip", "--no-container: the model test "
                                                                "runs on this host")
    else:
        client, reach = (connect or daemon.connect)(probe, 30.0)
    client, info, reach = daemon.read_info(client, reach)
    stage("toolkit", "NVIDIA Container Toolkit")
    toolkit_checks, toolkit_facts = probe_toolkit(probe, driver.driver, daemon.is_rootless(info))
    checks += toolkit_checks
    facts: dict[str, Any] = {"node": node_facts(), "mode": "none",
                             "host": {**vars(driver), **nvml_facts}, "toolkit": toolkit_facts}
    if client is None:
        checks += [reach] + skipped(("docker.runtime", "docker.cdi", "docker.engine",
                                     *CONTAINER_IDS), reach)
        stage("model", "model test on this host")
        model_run, facts["mode"] = host_model_run(timeout_s), "host"
    else:
        hooks = any(toolkit_facts["binaries"].get(h) for h in HOOKS)
        daemon_checks, facts["docker"] = daemon.probe_daemon(probe, info, hooks)
        checks += daemon_checks
        model_run, mode = container_chain(client, image, driver.driver, checks, facts, stage,
                                          timeout_s)
        facts["mode"] = mode
    gpu_expected = facts["mode"] == "container-gpu" or (
        facts["mode"] == "host" and bool(nvml_facts["gpus"]))
    report = judge(checks, model_run, gpu_expected, facts)
    report.facts["timings_s"] = stage.done()
    return report


def container_chain(client, image: str, driver: str | None, checks: list[Check], facts: dict,
                    stage, timeout_s: float) -> tuple[RunResult | None, str]:
    """Links 4-7 on a reachable daemon: image, GPU probe container, model test in the
    container (on the GPU when the probe got one, else the CPU fallback)."""
    leftovers = passthrough.remove_leftovers(client)
    if leftovers:  # not a fault of this host's passthrough: said, but no link depends on it
        facts["leftovers_removed"] = leftovers
        checks.append(leftovers_check(leftovers))
    stage("image", f"image {image}")
    config, present = passthrough.image_env(client, image)
    checks.append(present)
    if config is None:
        checks += skipped(CONTAINER_IDS[1:], present)
        return None, "none"
    facts["image"] = {"name": image, "id": config["id"], "user": config["user"],
                      "env": redact_env({k: v for k, v in config["env"].items()
                                         if k.startswith(("NVIDIA_", "CUDA_", "NV_CUDNN",
                                                          "JAX_", "XLA_"))})}
    brands = facts["toolkit"].get("cli_info", {}).get("brands") or [None]
    checks.append(passthrough.preflight_check(config["env"], driver, brands[0]))
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
    for argv in (MODEL_ARGV, ["python3", *MODEL_ARGV[1:]]):  # Debian/Ubuntu: python3 only
        model = passthrough.run_container(
            client, image, argv, gpu=gpu, env=passthrough.GPU_ENV if gpu else
            passthrough.CPU_ENV, user=config["user"], timeout_s=timeout_s)
        if passthrough.missing_program(model.error or "") != "python":
            break
    facts["container_seconds"] = round(model.seconds, 3)
    return model.as_run_result(), "container-gpu" if gpu else "container-cpu"


def leftovers_check(leftovers: list[dict]) -> Check:
    names = ", ".join(f"{c['name']} (envcheck pid {c['owner_pid']})" for c in leftovers)
    return Check("docker.leftovers", "warn",
                 f"removed {len(leftovers)} gpu-smoke container(s) whose envcheck was killed "
                 f"before it could remove them: {names}",
                 detail="an envcheck killed outright (SIGKILL: the OOM killer, `kill -9`, "
                        "Slurm's KillWait) leaves its container running its test, holding the "
                        "GPU, until the test ends (never, on a hung GPU)",
                 fix="nothing to do now; if it recurs, find what kills envcheck (`dmesg` for "
                     "the OOM killer, the job's time limit)")


def node_facts() -> dict[str, str | None]:
    """Which machine this is (Slurm's node name when run as a Slurm task) and the GPUs a
    scheduler gave it."""
    return {"name": os.environ.get("SLURMD_NODENAME") or socket.gethostname(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


def host_model_run(timeout_s: float) -> RunResult:
    return runner_module.run([sys.executable, *MODEL_ARGV[1:]], timeout_s)


def skipped(ids, cause: Check) -> list[Check]:
    return [Check(i, "skip", f"{cause.summary} ({cause.id})") for i in ids]


def judge(checks: list[Check], model_run: RunResult | None, gpu_expected: bool,
          facts: dict) -> Report:
    """Model checks in, verdict out."""
    facts["model"] = None
    if model_run is not None:
        model_report, problem = parse_model_report(model_run)
        if problem is not None:
            checks.append(problem)
        else:
            checks.append(backend_check(model_report["device"], gpu_expected, model_run.err))
            checks += [model_check(raw) for raw in model_report["checks"]]
            facts["device"] = model_report["device"]
            facts["model"] = model_facts(model_report)
    result = verdict(checks, facts)
    # A failed verdict names the failure that decided it; a fallback, the first broken link.
    failed = [c for c in checks if c.status == "fail"]
    deciding = [c for c in failed if c.id in BLOCKING] if result == "fail" else []
    first = (deciding or failed or [None])[0]
    facts["first_failed"] = first and {"id": first.id, "summary": first.summary}
    return Report("smoke", result, checks, facts)


def parse_model_report(result: RunResult) -> tuple[dict[str, Any] | None, Check | None]:
    """The model test's JSON report, or a failed `model.run` check saying why there is none."""
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
        return None, Check("model.run", "fail", unusable, _tail(result.err), INSTALL_FIX)
    report = _last_json_line(result.out)
    if report is None or not str(report.get("schema")).startswith("envcheck.model-smoke/"):
        return None, Check("model.run", "fail",
                           f"the model test gave no report (exit code {result.rc})",
                           _tail(result.err or result.out), fix)
    problem = _report_problem(report)
    if problem:
        return None, Check("model.run", "fail", f"the model test's report is not one this "
                                                f"envcheck reads: {problem}",
                           fix="the model test is of another envcheck version: rebuild the "
                               "image with `envcheck build` (on the host: reinstall envcheck)")
    return report, None


def _last_json_line(out: str) -> dict | None:
    try:
        report = json.loads(out.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return None
    return report if isinstance(report, dict) else None


def _report_problem(report: dict) -> str | None:
    """What of the fields judge() and the text rendering read is missing or mistyped in a
    model report (None: all there). Checked here, not asserted: the report comes from the
    image, which another envcheck version may have built."""
    if report["schema"] != MODEL_SCHEMA:
        return f"schema {report['schema']}, not {MODEL_SCHEMA}"
    problem = field_problem(report, MODEL_REPORT_FIELDS) or field_problem(
        report["timings_s"], tuple(((key,), NUMBER) for key in report["timings_s"]), "timings_s.")
    if not problem and report.get("throughput") is not None:
        problem = field_problem(report["throughput"], THROUGHPUT_FIELDS, "throughput.")
    if problem:
        return problem
    checks = report["checks"]
    ids = sorted(str(c.get("id")) for c in checks if isinstance(c, dict))
    if len(ids) != len(checks) or ids != sorted(MODEL_CHECK_IDS):
        return f"checks are {', '.join(ids) or 'none'}, not {', '.join(MODEL_CHECK_IDS)}"
    for check in checks:
        problem = field_problem(check, MODEL_CHECK_FIELDS + FIELDS_BY_CHECK[check["id"]],
                                f"check {check['id']}: ")
        if problem or check["status"] not in STATUSES:
            return problem or (f"check {check['id']}: status {check['status']!r}, not one of "
                               f"{', '.join(STATUSES)}")
    return None


NO_MODULE_RE = re.compile(r"No module named '?([\w.]+)'?")
INSTALL_FIX = ("in a container: use the image `envcheck build` makes (Python, JAX, Flax and the "
               "model package), or base yours on it; on the host (--no-container): "
               "`pip install envcheck`")


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


def backend_check(device: dict[str, Any], gpu_expected: bool, stderr: str) -> Check:
    if device["backend"] == "gpu":
        return Check("jax.backend", "pass",
                     f"JAX computes on {device['device_count']}× {device['device_kind']}")
    if gpu_expected:
        entry, matched = classify(stderr)
        if entry is UNKNOWN:
            return Check("jax.backend", "fail", "a GPU was reachable but JAX computes on the "
                                                f"{device['backend']}",
                         fix="install `jax[cuda12]` in the image (`envcheck build "
                             "--jax-extra cuda12`)")
        return Check("jax.backend", "fail", f"a GPU was reachable but JAX fell back to the "
                                            f"{device['backend']}: {matched}",
                     detail=entry.cause, fix=entry.fix)
    return Check("jax.backend", "warn",
                 f"JAX computes on the {device['backend']} ({device['device_kind']}): CPU "
                 "fallback, no GPU reached (the first failed link above says why)")


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
        "throughput": model_report.get("throughput"),
        "timings_s": model_report["timings_s"],
    }


def verdict(checks: list[Check], facts: dict) -> str:
    if any(c.status == "fail" and c.id in BLOCKING for c in checks) or facts["model"] is None:
        return "fail"
    return "gpu" if facts["device"]["backend"] == "gpu" else "cpu-fallback"


def _tail(text: str, lines: int = 5) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


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

    def _close(self) -> None:
        now_s = time.perf_counter()
        if self.current:
            self.timings_s[self.current] = round(now_s - self.mark_s, 3)
        self.mark_s = now_s

    def done(self) -> dict[str, float]:
        self._close()
        self.timings_s["total"] = round(time.perf_counter() - self.start_s, 3)
        return self.timings_s
