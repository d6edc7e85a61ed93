"""`python -m model.smoke [--json] [--impl NAME] [--checkpoint DIR]`: the bundled model test.

Loads the bundled tiny GPT-2 with the real loader, checks its logits against golden logits that
HF transformers computed (scripts/make_tiny_checkpoint.py), checks a greedy generation against
HF's, and times both on whatever device JAX picked. This is what `envcheck gpu-smoke` runs inside
the container; it imports nothing from envcheck. The report is model/report.py's. Exit 0 when
every check passes, 1 otherwise (a checkpoint that does not load is a failed `model.load`),
128 + N when signal N (Ctrl-C, SIGTERM) stopped it.
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
import numpy as np

from model import report as contract
from model._cli import EXIT_FAILED, EXIT_OK, add_impl_option, run_main
from model.attention import IMPLEMENTATIONS, resolve_impl, unavailable_reason
from model.generate import generate
from model.params import CheckpointError, from_pretrained
from model.report import (
    AttentionCheck,
    DeviceFacts,
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
    forward = jax.jit(lambda m, ids: m(ids, impl=impl))
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
    reference_BTV = np.asarray(jax.jit(lambda m, ids: m(ids, impl="reference"))(gpt2, ids_BT),
                               np.float32)
    results = []
    for name in IMPLEMENTATIONS:
        reason = unavailable_reason(name, gpt2.dtype)
        if reason:
            results.append(ImplResult(impl=name, dtype=dtype, status="unavailable",
                                      reason=reason))
            continue
        if name == "reference":
            continue
        forward = jax.jit(lambda m, ids, name=name: m(ids, impl=name))
        logits_BTV, _ = timed(forward, gpt2, ids_BT)
        _, timings_s[f"forward_{name}_{dtype}"] = timed(forward, gpt2, ids_BT)
        diff = float(np.max(np.abs(np.asarray(logits_BTV, np.float32) - reference_BTV)))
        results.append(ImplResult(impl=name, dtype=dtype, max_abs_diff=diff,
                                  tolerance=tolerance,
                                  status="pass" if diff <= tolerance else "fail"))
    return results


def check_implementations(checkpoint: Path, gpt2, golden, timings_s: dict) -> AttentionCheck:
    """Every attention implementation on the model's logits, in float32 and bfloat16 (where
    cuDNN runs), against the reference implementation in the same dtype."""
    bf16 = from_pretrained(checkpoint, dtype=jnp.bfloat16)
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


def run_smoke(checkpoint: Path, impl: str) -> ModelReport:
    # Parity is judged at full float32: TF32 (the GPU default) would blur a 1e-4 check.
    jax.config.update("jax_default_matmul_precision", "highest")
    timings_s: dict[str, float] = {}
    start_s = time.perf_counter()
    try:
        gpt2 = from_pretrained(checkpoint)
        with np.load(checkpoint / GOLDEN_FILE) as data:
            golden = {key: data[key] for key in data.files}
    except (CheckpointError, OSError, ValueError) as error:
        return unloaded_report(checkpoint, impl, error)
    timings_s["load"] = time.perf_counter() - start_s
    cfg = gpt2.config
    load = LoadCheck(status="pass", summary=f"{checkpoint.name}: {cfg.n_layer} layers, "
                                            f"{cfg.n_head} heads, d={cfg.n_embd}, vocab "
                                            f"{cfg.vocab_size}")
    checks = [load, check_parity(gpt2, golden, impl, timings_s),
              check_generate(gpt2, golden, impl, timings_s),
              check_implementations(checkpoint, gpt2, golden, timings_s)]
    return ModelReport(
        ok=all(c.status == "pass" for c in checks), impl=impl,
        impl_used=resolve_impl(impl, gpt2.dtype, golden["ids_BT"].shape[1]),
        checkpoint=str(checkpoint), device=device_facts(), checks=checks,
        timings_s={k: round(v, 6) for k, v in timings_s.items()})


def unloaded_report(checkpoint: Path, impl: str, error: Exception) -> ModelReport:
    """The report of a checkpoint that did not load: a failed model.load whose summary is the
    loader's error, and the checks that need the model skipped."""
    if isinstance(error, OSError) and not isinstance(error, CheckpointError):
        error = f"{checkpoint / GOLDEN_FILE}: {error.strerror or error}"
    why = "the checkpoint did not load (model.load)"
    return ModelReport(
        ok=False, impl=impl, impl_used=resolve_impl(impl, jnp.float32, 1),
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
    lines = [f"model smoke on {device.backend} ({device.device_kind}), "
             f"jax {device.jax}, attention impl {report.impl} → {report.impl_used}"]
    for check in report.checks:
        lines.append(f"  {check.status.upper():<5} {check.id:<16} {check.summary}")
        if check.fix:
            lines.append(f"        fix: {check.fix}")
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
    args = parser.parse_args(argv)
    report = run_smoke(args.checkpoint, args.impl)
    print(json.dumps(contract.to_json(report)) if args.json else render_text(report))
    return EXIT_OK if report.ok else EXIT_FAILED


if __name__ == "__main__":
    run_main(main)
