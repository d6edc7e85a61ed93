"""`python -m model.smoke [--json] [--impl NAME] [--checkpoint DIR]`: the bundled model test.

Loads the bundled tiny GPT-2 with the real loader, checks its logits against golden logits that
HF transformers computed (scripts/make_tiny_checkpoint.py), checks a greedy generation against
HF's, and times both on whatever device JAX picked. This is what `envcheck gpu-smoke` runs inside
the container; it imports nothing from envcheck. Exit 0 when every check passes, 1 otherwise,
2 when the checkpoint cannot be read.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import jax
import numpy as np

from model._cli import EXIT_FAILED, EXIT_OK, run_main
from model.attention import IMPLEMENTATIONS
from model.generate import generate
from model.params import from_pretrained

SCHEMA = "envcheck.model-smoke/v1"
BUNDLED = Path(__file__).resolve().parent / "data" / "tiny-gpt2"
# float32 with "highest" matmul precision lands near 1e-6 on CPU and GPU; TF32 would be ~1e-3.
PARITY_TOLERANCE = 1e-4
TIMED_RUNS = 5


def device_facts() -> dict:
    device = jax.devices()[0]
    return {
        "backend": jax.default_backend(), "device_kind": device.device_kind,
        "device_count": jax.device_count(), "jax": jax.__version__,
        "python": platform.python_version(), "machine": platform.machine(),
    }


def timed(fn, *args) -> tuple[object, float]:
    start_s = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - start_s


def check_parity(gpt2, golden, impl: str, timings_s: dict) -> dict:
    forward = jax.jit(lambda m, ids: m(ids, impl=impl))
    logits_BTV, timings_s["forward_first_call"] = timed(forward, gpt2, golden["ids_BT"])
    runs_s = [timed(forward, gpt2, golden["ids_BT"])[1] for _ in range(TIMED_RUNS)]
    timings_s["forward"] = statistics.median(runs_s)
    diff = float(np.max(np.abs(np.asarray(logits_BTV, np.float32) - golden["logits_BTV"])))
    ok = diff <= PARITY_TOLERANCE  # NaN compares False: a NaN forward fails
    return {
        "id": "model.parity", "status": "pass" if ok else "fail",
        "summary": f"logits vs HF golden: max |Δ| {diff:.2e} (tolerance {PARITY_TOLERANCE:.0e})",
        "max_abs_diff": diff, "tolerance": PARITY_TOLERANCE,
        "fix": None if ok else "the device computes wrong numbers: check the driver/CUDA stack "
        "(and XLA flags such as TF32 overrides), then rerun",
    }


def check_generate(gpt2, golden, impl: str, timings_s: dict) -> dict:
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
    return {
        "id": "model.generate", "status": "pass" if ok else "fail", "summary": summary,
        "tokens_per_s": round(new_tokens * prompt_BT.shape[0] / timings_s["generate"], 1),
        "fix": None if ok else "KV-cache decoding disagrees with HF: rerun with --impl reference",
    }


def run_smoke(checkpoint: Path, impl: str) -> dict:
    # Parity is judged at full float32: TF32 (the GPU default) would blur a 1e-4 check.
    jax.config.update("jax_default_matmul_precision", "highest")
    timings_s: dict[str, float] = {}
    start_s = time.perf_counter()
    gpt2 = from_pretrained(checkpoint)
    timings_s["load"] = time.perf_counter() - start_s
    with np.load(checkpoint / "golden.npz") as data:
        golden = {key: data[key] for key in data.files}
    cfg = gpt2.config
    load = {
        "id": "model.load", "status": "pass",
        "summary": f"{checkpoint.name}: {cfg.n_layer} layers, {cfg.n_head} heads, "
                   f"d={cfg.n_embd}, vocab {cfg.vocab_size}",
    }
    checks = [load, check_parity(gpt2, golden, impl, timings_s),
              check_generate(gpt2, golden, impl, timings_s)]
    return {
        "schema": SCHEMA, "ok": all(c["status"] == "pass" for c in checks),
        "impl": impl, "checkpoint": str(checkpoint), "device": device_facts(),
        "checks": checks, "timings_s": {k: round(v, 6) for k, v in timings_s.items()},
    }


def render_text(report: dict) -> str:
    device = report["device"]
    lines = [f"model smoke on {device['backend']} ({device['device_kind']}), "
             f"jax {device['jax']}, attention impl {report['impl']}"]
    for check in report["checks"]:
        lines.append(f"  {check['status'].upper():<5} {check['id']:<15} {check['summary']}")
        if check.get("fix"):
            lines.append(f"        fix: {check['fix']}")
    timings = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in report["timings_s"].items())
    lines.append(f"  timings: {timings}")
    lines.append("OK" if report["ok"] else "FAILED")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.smoke", description=__doc__)
    parser.add_argument("--json", action="store_true", help="one JSON report on stdout")
    parser.add_argument("--impl", default="reference", choices=sorted(IMPLEMENTATIONS))
    parser.add_argument("--checkpoint", type=Path, default=BUNDLED,
                        help="a directory with config.json, model.safetensors and golden.npz")
    args = parser.parse_args(argv)
    if not (args.checkpoint / "golden.npz").is_file():
        raise ValueError(f"{args.checkpoint}: no golden.npz; make one with "
                         "scripts/make_tiny_checkpoint.py --out DIR")
    report = run_smoke(args.checkpoint, args.impl)
    print(json.dumps(report) if args.json else render_text(report))
    return EXIT_OK if report["ok"] else EXIT_FAILED


if __name__ == "__main__":
    run_main(main)
