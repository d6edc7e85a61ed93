"""`python -m model.smoke [--json] [--impl NAME] [--checkpoint DIR] [--level L]`: the bundled
model test, on every device JAX sees.

Loads the bundled tiny GPT-2 with the real loader and, on each visible device in turn (weights
and inputs placed there explicitly), checks its logits against golden logits that HF
transformers computed (scripts/make_tiny_checkpoint.py), a greedy generation against HF's, and
every attention implementation against the reference. Then, by level: quick (default) a short
dense matmul per device judged against its datasheet, and an exact all-reduce; medium adds
memory and transfer bandwidth, an all-reduce sweep and the comparison of each device with its
siblings; long adds a burn-in of --duration seconds with a golden checksum every iteration. In
a container (--in-container) NCCL's prerequisites are checked too. This is what `envcheck
gpu-smoke` runs inside the container; it imports nothing from envcheck. The report is
model/report.py's. Exit 0 when no check fails, 1 otherwise (a checkpoint that does not load is
a failed `model.load`), 128 + N when signal N (Ctrl-C, SIGTERM) stopped it.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import re
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import msgspec
import numpy as np
from flax import nnx

from model import _cli, burnin, collective, devices, faults, nccl, perf
from model import report as contract
from model._cli import EXIT_FAILED, EXIT_OK, add_impl_option, run_main
from model.attention import IMPLEMENTATIONS, resolve_impl, unavailable_reason
from model.devices import label
from model.generate import generate
from model.params import CheckpointError, from_pretrained
from model.report import (
    LEVELS,
    AttentionCheck,
    DeviceFacts,
    DeviceInfo,
    DeviceRun,
    GenerateCheck,
    ImplResult,
    LoadCheck,
    ModelReport,
    ParityCheck,
)

BUNDLED = Path(__file__).resolve().parent / "data" / "tiny-gpt2"
GOLDEN_FILE = "golden.npz"  # ids and logits HF computed for this checkpoint
# float32 with "highest" matmul precision lands near 1e-6 on CPU and GPU; TF32 would be ~1e-3.
PARITY_TOLERANCE = 1e-4
BF16_TOLERANCE = 3e-2  # bf16 logits of the tiny model (|logit| ≲ 1) differ by ~5e-3 between impls
TIMED_RUNS = 5


CUDA_DISTRIBUTIONS = ("jaxlib", "jax-cuda12-plugin", "jax-cuda12-pjrt", "jax-cuda13-plugin",
                      "jax-cuda13-pjrt", "nvidia-cudnn-cu12", "nvidia-cublas-cu12",
                      "nvidia-cuda-runtime-cu12", "nvidia-nccl-cu12")


def device_facts() -> DeviceFacts:
    return DeviceFacts(
        backend=jax.default_backend(), device_kind=jax.devices()[0].device_kind,
        device_count=jax.device_count(), jax=jax.__version__,
        python=platform.python_version(), machine=platform.machine(),
        packages=installed_versions(), cuda_libraries=loaded_cuda_versions(),
        mapped_libraries=mapped_libraries())


MAPPED_RE = re.compile(r"\s(/\S*/lib(?:cuda|cudart|cublas|cublasLt|cudnn\w*|cufft|cusolver|"
                       r"cusparse|nccl|nvJitLink|nvrtc|cupti|nvshmem_host)\.so[.0-9]*)$")


def mapped_libraries() -> list[str]:
    """The CUDA library files this process has mapped (/proc/self/maps), each once: what the
    loader really chose, for gpu-smoke to hold against its prediction. Empty off a GPU."""
    if jax.default_backend() != "gpu":
        return []
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    return sorted({m.group(1) for line in lines if (m := MAPPED_RE.search(line))})


def installed_versions() -> dict[str, str]:
    """jaxlib, the CUDA plugin and the NVIDIA wheels JAX runs on (those installed)."""
    found = {}
    for name in CUDA_DISTRIBUTIONS:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def loaded_cuda_versions() -> dict[str, int]:
    """The CUDA runtime / driver / cuDNN / cuBLAS versions the loaded CUDA plugin reports
    (the same probes JAX's own version check uses); empty without a CUDA plugin."""
    from jax._src.lib import cuda_versions

    if cuda_versions is None or jax.default_backend() != "gpu":
        return {}
    found = {}
    for name in ("cuda_runtime", "cuda_driver", "cudnn", "cublas", "cufft", "cusparse"):
        try:
            found[name] = int(getattr(cuda_versions, f"{name}_get_version")())
        except Exception:  # noqa: BLE001 — a probe that is missing in this plugin version
            continue
    return found


def timed(fn, *args) -> tuple[object, float]:
    start_s = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - start_s


def check_parity(gpt2, golden, impl: str, timings_s: dict) -> ParityCheck:
    """The documented call, `gpt2(ids_BT)`, against HF's golden logits."""
    forward = lambda m, ids: m(ids, impl=impl)  # noqa: E731
    logits_BTV, timings_s["forward_first_call"] = timed(forward, gpt2, golden["ids_BT"])
    runs_s = [timed(forward, gpt2, golden["ids_BT"])[1] for _ in range(TIMED_RUNS)]
    timings_s["forward"] = statistics.median(runs_s)
    diff = float(np.max(np.abs(np.asarray(logits_BTV, np.float32) - golden["logits_BTV"])))
    ok = diff <= PARITY_TOLERANCE  # NaN compares False: a NaN forward fails
    return ParityCheck(
        status="pass" if ok else "fail",
        summary=f"logits vs HF golden: max |Δ| {diff:.2e} (tolerance {PARITY_TOLERANCE:.0e})",
        max_abs_diff=diff, tolerance=PARITY_TOLERANCE,
        fix=None if ok else "the device computes wrong numbers: check the driver/CUDA stack "
        "(and XLA flags such as TF32 overrides), then rerun")


def implementation_results(gpt2, ids_BT, tolerance: float,
                           timings_s: dict) -> list[ImplResult]:
    """One model dtype: each implementation's logits against `reference`'s (max |Δ|), or why it
    cannot run here ("unavailable: ...")."""
    dtype = jnp.dtype(gpt2.dtype).name
    reference_BTV = np.asarray(gpt2(ids_BT, impl="reference"), np.float32)
    results = []
    for name in IMPLEMENTATIONS:
        reason = unavailable_reason(name, gpt2.dtype)
        if reason:
            results.append(ImplResult(impl=name, dtype=dtype, status="unavailable",
                                      reason=reason))
            continue
        if name == "reference":
            continue
        forward = lambda m, ids, name=name: m(ids, impl=name)  # noqa: E731
        logits_BTV, _ = timed(forward, gpt2, ids_BT)
        _, timings_s[f"forward_{name}_{dtype}"] = timed(forward, gpt2, ids_BT)
        diff = float(np.max(np.abs(np.asarray(logits_BTV, np.float32) - reference_BTV)))
        results.append(ImplResult(impl=name, dtype=dtype, max_abs_diff=diff,
                                  tolerance=tolerance,
                                  status="pass" if diff <= tolerance else "fail"))
    return results


def check_implementations(gpt2, bf16, golden, timings_s: dict) -> AttentionCheck:
    """Every attention implementation on the model's logits, in float32 and bfloat16 (where
    cuDNN runs), against the reference implementation in the same dtype."""
    results = (implementation_results(gpt2, golden["ids_BT"], PARITY_TOLERANCE, timings_s)
               + implementation_results(bf16, golden["ids_BT"], BF16_TOLERANCE, timings_s))
    failed = sorted({f"{r.impl} ({r.dtype})" for r in results if r.status == "fail"})
    ran = ", ".join(f"{r.impl} {r.max_abs_diff:.1e}" for r in results
                    if r.status != "unavailable" and r.dtype == "float32")
    skipped = sorted({f"{r.impl} unavailable: {r.reason}" for r in results
                      if r.status == "unavailable"})
    return AttentionCheck(
        status="fail" if failed else "pass",
        summary="; ".join([f"float32 logits vs reference attention: {ran}", *skipped]),
        implementations=results,
        fix=None if not failed else f"{', '.join(failed)} give wrong logits on this device: "
        "run with --impl reference and report the kernel bug")


def check_generate(gpt2, golden, impl: str, timings_s: dict) -> GenerateCheck:
    prompt_BT, expected_BS = golden["ids_BT"], golden["greedy_BS"]
    new_tokens = expected_BS.shape[1] - prompt_BT.shape[1]
    run = lambda: generate(gpt2, prompt_BT, new_tokens, greedy=True, impl=impl)  # noqa: E731
    ids_BS, timings_s["generate_first_call"] = timed(run)
    ids_BS, timings_s["generate"] = timed(run)
    mismatch = np.argwhere(ids_BS != expected_BS)
    ok = mismatch.size == 0
    summary = (f"greedy {new_tokens} tokens × {prompt_BT.shape[0]} rows equal HF generate" if ok
               else f"greedy tokens differ from HF generate first at row/position "
                    f"{tuple(int(i) for i in mismatch[0])}")
    return GenerateCheck(
        status="pass" if ok else "fail", summary=summary,
        tokens_per_s=round(new_tokens * prompt_BT.shape[0] / timings_s["generate"], 1),
        fix=None if ok else "KV-cache decoding disagrees with HF: rerun with --impl reference")


def place(gpt2, device, perturb: bool = False):
    """A copy of `gpt2` whose weights live on `device` (the fault seam: perturbed there)."""
    graphdef, state = nnx.split(gpt2)
    state = jax.device_put(state, device)
    if perturb:
        state = jax.tree.map(lambda w: w * (1 + 1e-3), state)
    return nnx.merge(graphdef, state)


def run_on_device(info: DeviceInfo, models: tuple, golden, impl: str, fault) -> DeviceRun:
    """The model checks with the weights and ids placed on one device."""
    device = jax.devices()[info.index]
    perturb = faults.perturbs(fault, info.index)
    gpt2, bf16 = (place(m, device, perturb) for m in models)
    placed = {**golden, "ids_BT": jax.device_put(golden["ids_BT"], device)}
    timings_s: dict[str, float] = {}
    checks = [check_parity(gpt2, placed, impl, timings_s),
              check_generate(gpt2, golden, impl, timings_s),
              check_implementations(gpt2, bf16, placed, timings_s)]
    return DeviceRun(device=info, ok=all(c.status == "pass" for c in checks), checks=checks,
                     timings_s={k: round(v, 6) for k, v in timings_s.items()})


def overall(kind: type, runs: list[DeviceRun]):
    """One model check over every device: the worst device's, naming each that failed."""
    mine = [(run.device, next(c for c in run.checks if isinstance(c, kind))) for run in runs]
    failed = [(info, check) for info, check in mine if check.status == "fail"]
    first = (failed or mine)[0][1]
    fields = {}
    if kind is ParityCheck:
        diffs = [c.max_abs_diff for _, c in mine]
        fields["max_abs_diff"] = next((d for d in diffs if d != d), max(diffs))  # NaN first
    if kind is GenerateCheck:
        fields["tokens_per_s"] = min(c.tokens_per_s for _, c in mine)
    if failed:
        summary = "; ".join(f"{label(info)}: {c.summary}" for info, c in failed)
    else:
        summary = (f"{first.summary} on every one of {len(mine)} devices" if len(mine) > 1
                   else first.summary)
    if kind is ParityCheck and not failed and len(mine) > 1:
        summary = (f"logits vs HF golden on {len(mine)} devices: max |Δ| "
                   f"{fields['max_abs_diff']:.2e} (tolerance {PARITY_TOLERANCE:.0e})")
    return msgspec.structs.replace(first, summary=summary, **fields)


def run_smoke(checkpoint: Path, impl: str, level: str = "quick", duration_s: float = 600.0,
              in_container: bool = False) -> ModelReport:
    # Parity is judged at full float32: TF32 (the GPU default) would blur a 1e-4 check.
    jax.config.update("jax_default_matmul_precision", "highest")
    fault = faults.configured()
    start_s = time.perf_counter()
    try:
        gpt2 = from_pretrained(checkpoint)
        bf16 = from_pretrained(checkpoint, dtype=jnp.bfloat16)
        with np.load(checkpoint / GOLDEN_FILE) as data:
            golden = {key: data[key] for key in data.files}
    except (CheckpointError, OSError, ValueError) as error:
        return unloaded_report(checkpoint, impl, level, error)
    stages = {"load": time.perf_counter() - start_s}
    cfg = gpt2.config
    load = LoadCheck(status="pass", summary=f"{checkpoint.name}: {cfg.n_layer} layers, "
                                            f"{cfg.n_head} heads, d={cfg.n_embd}, vocab "
                                            f"{cfg.vocab_size}")
    infos = devices.visible()
    runs, stages["model"] = timed_stage(
        lambda: [_cli.checkpoint() or run_on_device(info, (gpt2, bf16), golden, impl, fault)
                 for info in infos])
    checks = [load, *(overall(kind, runs) for kind in (ParityCheck, GenerateCheck,
                                                        AttentionCheck))]
    checks += level_checks(infos, level, duration_s, fault, stages)
    if in_container:
        checks.append(nccl.container_check())
    timings = {**runs[0].timings_s, **{f"stage_{k}": v for k, v in stages.items()}}
    return ModelReport(
        ok=all(c.status != "fail" for c in checks),
        level=level, impl=impl,
        impl_used=resolve_impl(impl, gpt2.dtype, golden["ids_BT"].shape[1]),
        checkpoint=str(checkpoint), device=device_facts(), devices=runs, checks=checks,
        timings_s={k: round(v, 6) for k, v in timings.items()})


def level_checks(infos: list[DeviceInfo], level: str, duration_s: float, fault,
                 stages: dict) -> list:
    """perf.*, interconnect.allreduce and (long) perf.burn-in, each stage timed."""
    _cli.checkpoint()
    checks, stages["perf"] = timed_stage(lambda: perf.perf_checks(infos, level, fault))
    _cli.checkpoint()
    reduce, stages["interconnect"] = timed_stage(
        lambda: collective.allreduce_check(infos, level))
    checks.append(reduce)
    if level == "long":
        _cli.checkpoint()
        burn, stages["burn_in"] = timed_stage(lambda: burnin.burn_in(infos, duration_s, fault))
        checks.append(burn)
    return checks


def timed_stage(run):
    start_s = time.perf_counter()
    result = run()
    return result, round(time.perf_counter() - start_s, 6)


def unloaded_report(checkpoint: Path, impl: str, level: str, error: Exception) -> ModelReport:
    """The report of a checkpoint that did not load: a failed model.load whose summary is the
    loader's error, and the checks that need the model skipped."""
    if isinstance(error, OSError) and not isinstance(error, CheckpointError):
        error = f"{checkpoint / GOLDEN_FILE}: {error.strerror or error}"
    why = "the checkpoint did not load (model.load)"
    return ModelReport(
        ok=False, level=level, impl=impl, impl_used=resolve_impl(impl, jnp.float32, 1),
        checkpoint=str(checkpoint), device=device_facts(),
        checks=[LoadCheck(status="fail", summary=str(error),
                          fix="point --checkpoint at a directory with config.json, "
                              "model.safetensors and golden.npz (scripts/make_tiny_checkpoint.py "
                              "makes one), or rebuild the image if the bundled one is broken"),
                ParityCheck(status="skip", summary=why, max_abs_diff=None,
                            tolerance=PARITY_TOLERANCE),
                GenerateCheck(status="skip", summary=why, tokens_per_s=None),
                AttentionCheck(status="skip", summary=why, implementations=[])],
        timings_s={})


def render_text(report: ModelReport) -> str:
    device = report.device
    lines = [f"model smoke ({report.level}) on {device.device_count}× {device.backend} "
             f"({device.device_kind}), jax {device.jax}, attention impl {report.impl} → "
             f"{report.impl_used}"]
    for check in report.checks:
        lines.append(f"  {check.status.upper():<5} {check.id:<22} {check.summary}")
        if check.fix:
            lines.append(f"        fix: {check.fix}")
    for run in report.devices if len(report.devices) > 1 else []:
        bad = [c.id for c in run.checks if c.status != "pass"]
        lines.append(f"  {label(run.device)}: {'FAILED ' + ', '.join(bad) if bad else 'ok'}")
    timings = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in report.timings_s.items()) or "none"
    lines.append(f"  timings: {timings}")
    lines.append("OK" if report.ok else "FAILED")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.smoke", description=__doc__)
    parser.add_argument("--json", action="store_true", help="one JSON report on stdout")
    add_impl_option(parser)
    parser.add_argument("--checkpoint", type=Path, default=BUNDLED,
                        help="a directory with config.json, model.safetensors and golden.npz")
    parser.add_argument("--level", choices=LEVELS, default="quick",
                        help="quick (seconds), medium (+ bandwidths, all-reduce sweep, "
                             "siblings), long (+ burn-in)")
    parser.add_argument("--duration", type=float, default=600.0, metavar="SECONDS",
                        help="the burn-in's length at --level long (default 600)")
    parser.add_argument("--in-container", action="store_true",
                        help="also check NCCL's prerequisites in this container (/dev/shm, "
                             "memlock)")
    args = parser.parse_args(argv)
    if args.duration <= 0:
        raise ValueError(f"--duration {args.duration:g}: give a positive number of seconds")
    report = run_smoke(args.checkpoint, args.impl, args.level, args.duration, args.in_container)
    _cli.checkpoint()  # a stop signal a library swallowed: no report
    print(json.dumps(contract.to_json(report)) if args.json else render_text(report))
    return EXIT_OK if report.ok else EXIT_FAILED


if __name__ == "__main__":
    run_main(main)
