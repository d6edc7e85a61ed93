"""Benchmark (not a test): our JAX GPT-2 vs HF transformers (torch, eager) on the 124M model, fp32.

One run measures, each part in its own process so thread pools do not fight:
- ceilings: fp32 matmul FLOP/s (a 4096² matmul, best of numpy / torch / JAX) and memory
  bandwidth, the best of STREAM-style probes over 1 GiB arrays in numpy, torch (all cores) and
  JAX: read (a sum), copy (b = a: 2 bytes moved per byte) and triad (a = b + 2c, numpy's add
  a = b + c: 3 per byte),
  counted as STREAM counts them; the best is the ceiling, so decode's share of it is a share of
  what this machine was seen to move, not of one weak probe;
- prefill at B=1, T=256 (full logits, compile time reported apart), tokens/s for both sides,
  ours through the documented call `gpt2(ids_BT)` (no jax.jit of the user's);
- greedy decode of 64 new tokens after a 16-token prompt, tokens/s for both sides;
and prints each figure also as a fraction of its floor: prefill model FLOPs / matmul ceiling, decode
weight bytes per token / bandwidth. Goals: prefill ≥ 2× HF and ≥ 70% of the matmul ceiling;
decode ≥ 1.5× HF and ≥ 70% of the bandwidth ceiling.

Run: .venv/bin/python -m scripts.bench_model [--repeats 5] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scripts.benchlib import best_time_s, print_goals

PREFILL_T, PROMPT_T, NEW_TOKENS = 256, 16, 64
MATMUL_N, BANDWIDTH_BYTES = 4096, 1 << 30
# GPT-2 124M [derived, ../shared/reference/gpt2-attention.md §4.3]: block matmul weights + lm_head.
BLOCK_MATMUL_PARAMS, LM_HEAD_PARAMS, N_LAYER, D_MODEL = 84_934_656, 38_597_376, 12, 768


def part_ceilings(repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    a = np.random.default_rng(0).standard_normal((MATMUL_N, MATMUL_N), np.float32)
    ja, ta = jnp.asarray(a), torch.from_numpy(a)
    jmm = jax.jit(lambda x: x @ x)
    matmul_s = {
        "numpy": best_time_s(lambda: a @ a, repeats),
        "torch": best_time_s(lambda: ta @ ta, repeats),
        "jax": best_time_s(lambda: jmm(ja).block_until_ready(), repeats),
    }
    flops = 2 * MATMUL_N**3
    return {"matmul_flops_per_s": {k: flops / v for k, v in matmul_s.items()},
            "bandwidth_bytes_per_s": bandwidth_probes(repeats)}


def bandwidth_probes(repeats: int) -> dict[str, float]:
    """Bytes moved per second by each STREAM-style probe (read 1, copy 2, triad 3 arrays)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    n = BANDWIDTH_BYTES // 4
    a, b, c = (np.full(n, value, np.float32) for value in (1.0, 2.0, 3.0))
    ta, tb, tc = (torch.from_numpy(x) for x in (a, b, c))
    ja, jb, jc = (jnp.asarray(x) for x in (a, b, c))
    jsum, jcopy = jax.jit(jnp.sum), jax.jit(lambda x: x + 0.0)
    jtriad = jax.jit(lambda x, y: x + 2.0 * y)
    probes = {  # name: (call, arrays of BANDWIDTH_BYTES it moves)
        "read numpy": (lambda: a.sum(), 1),
        "read torch": (lambda: ta.sum(), 1),
        "read jax": (lambda: jsum(ja).block_until_ready(), 1),
        "copy numpy": (lambda: np.copyto(b, a), 2),
        "copy torch": (lambda: tb.copy_(ta), 2),
        "copy jax": (lambda: jcopy(ja).block_until_ready(), 2),
        "add numpy": (lambda: np.add(b, c, out=a), 3),  # numpy has no fused triad
        "triad torch": (lambda: torch.add(tb, tc, alpha=2.0, out=ta), 3),
        "triad jax": (lambda: jtriad(jb, jc).block_until_ready(), 3),
    }
    return {name: arrays * BANDWIDTH_BYTES / best_time_s(call, repeats)
            for name, (call, arrays) in probes.items()}


def part_jax(checkpoint: Path, repeats: int) -> dict:
    import jax
    import numpy as np

    import model

    gpt2 = model.from_pretrained(checkpoint)
    ids_BT = np.random.default_rng(0).integers(0, 50257, (1, PREFILL_T)).astype(np.int32)
    # the documented call, `gpt2(ids_BT)`: it compiles its forward once per shape and reuses it
    start_s = time.perf_counter()
    gpt2(ids_BT).block_until_ready()
    first_s = time.perf_counter() - start_s
    prefill_s = best_time_s(lambda: gpt2(ids_BT).block_until_ready(), repeats)
    prompt_BT = ids_BT[:, :PROMPT_T]
    decode_s = best_time_s(lambda: model.generate(gpt2, prompt_BT, NEW_TOKENS, greedy=True),
                           max(1, repeats // 2))
    return {"prefill_s": prefill_s, "compile_s": first_s - prefill_s, "decode_s": decode_s,
            "version": f"jax {jax.__version__}"}


def part_hf(checkpoint: Path, repeats: int) -> dict:
    import numpy as np
    import torch
    import transformers

    hf = transformers.GPT2LMHeadModel.from_pretrained(checkpoint, attn_implementation="eager")
    hf = hf.eval()
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, 50257, (1, PREFILL_T)))
    prompt = ids[:, :PROMPT_T]
    settings = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                    eos_token_id=None, pad_token_id=0,
                    attention_mask=torch.ones(prompt.shape, dtype=torch.long))
    with torch.no_grad():
        prefill_s = best_time_s(lambda: hf(ids), repeats)
        decode_s = best_time_s(lambda: hf.generate(prompt, **settings), max(1, repeats // 2))
    return {"prefill_s": prefill_s, "decode_s": decode_s,
            "version": f"transformers {transformers.__version__}, torch {torch.__version__}"}


def run_part(name: str, checkpoint: Path, repeats: int) -> dict:
    argv = [sys.executable, "-m", "scripts.bench_model", "--part", name,
            "--checkpoint", str(checkpoint), "--repeats", str(repeats)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=1800, check=False,
                          cwd=Path(__file__).resolve().parent.parent)
    if done.returncode != 0:
        sys.exit(f"bench part {name} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarize(ceilings: dict, ours: dict, hf: dict) -> dict:
    matmul_peak = max(ceilings["matmul_flops_per_s"].values())
    bandwidth = max(ceilings["bandwidth_bytes_per_s"].values())
    prefill_flops = (2 * PREFILL_T * (BLOCK_MATMUL_PARAMS + LM_HEAD_PARAMS)
                     + 2 * N_LAYER * D_MODEL * PREFILL_T**2)  # causal QK^T and AV: half of 4LDT²
    decode_bytes_per_token = 4 * (BLOCK_MATMUL_PARAMS + LM_HEAD_PARAMS)
    floor_decode_s = decode_bytes_per_token / bandwidth
    rows = {}
    for name, side in (("envcheck (JAX)", ours), ("HF (torch eager)", hf)):
        rows[name] = {
            "prefill_tok_per_s": PREFILL_T / side["prefill_s"],
            "prefill_ms": side["prefill_s"] * 1e3,
            "prefill_frac_matmul_ceiling": prefill_flops / side["prefill_s"] / matmul_peak,
            "decode_tok_per_s": NEW_TOKENS / side["decode_s"],
            "decode_frac_bandwidth_ceiling": floor_decode_s / (side["decode_s"] / NEW_TOKENS),
        }
    mine, peer = rows["envcheck (JAX)"], rows["HF (torch eager)"]
    ratios = {"prefill_x_hf": mine["prefill_tok_per_s"] / peer["prefill_tok_per_s"],
              "decode_x_hf": mine["decode_tok_per_s"] / peer["decode_tok_per_s"]}
    goals = {
        "prefill ≥ 2× HF": ratios["prefill_x_hf"] >= 2.0,
        "prefill ≥ 70% matmul ceiling": mine["prefill_frac_matmul_ceiling"] >= 0.7,
        "decode ≥ 1.5× HF": ratios["decode_x_hf"] >= 1.5,
        "decode ≥ 70% bandwidth ceiling": mine["decode_frac_bandwidth_ceiling"] >= 0.7,
    }
    return {"ceilings": ceilings, "matmul_ceiling_flops_per_s": matmul_peak,
            "bandwidth_bytes_per_s": bandwidth, "prefill_model_flops": prefill_flops,
            "decode_weight_bytes_per_token": decode_bytes_per_token, "rows": rows,
            "ratios": ratios, "goals": goals, "compile_s": ours["compile_s"],
            "versions": {"ours": ours["version"], "hf": hf["version"]}}


def print_table(result: dict) -> None:
    c = result["ceilings"]
    print("ceilings: matmul fp32 " + ", ".join(
        f"{k} {v / 1e9:.0f}" for k, v in c["matmul_flops_per_s"].items()) + " GFLOP/s")
    print("bandwidth probes: " + ", ".join(
        f"{k} {v / 1e9:.1f}" for k, v in c["bandwidth_bytes_per_s"].items()) + " GB/s; "
        f"ceiling {result['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s")
    print(f"prefill B=1 T={PREFILL_T}: {result['prefill_model_flops'] / 1e9:.1f} GFLOP; decode: "
          f"{result['decode_weight_bytes_per_token'] / 1e6:.0f} MB of weights per token")
    print(f"{'':<18}{'prefill tok/s':>14}{'prefill ms':>12}{'% matmul':>10}"
          f"{'decode tok/s':>14}{'% bw ceil':>12}")
    for name, row in result["rows"].items():
        print(f"{name:<18}{row['prefill_tok_per_s']:>14.0f}{row['prefill_ms']:>12.1f}"
              f"{row['prefill_frac_matmul_ceiling']:>10.0%}{row['decode_tok_per_s']:>14.1f}"
              f"{row['decode_frac_bandwidth_ceiling']:>12.0%}")
    r = result["ratios"]
    print(f"ratios: prefill {r['prefill_x_hf']:.2f}× HF, decode {r['decode_x_hf']:.2f}× HF; "
          f"JAX compile (prefill) {result['compile_s']:.2f} s, reported apart")
    print_goals(result["goals"])
    print(f"versions: {result['versions']['ours']}; {result['versions']['hf']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--part", choices=["ceilings", "jax", "hf"], help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part:
        parts = {"ceilings": lambda: part_ceilings(args.repeats),
                 "jax": lambda: part_jax(args.checkpoint, args.repeats),
                 "hf": lambda: part_hf(args.checkpoint, args.repeats)}
        print(json.dumps(parts[args.part]()))
        return
    from scripts.hf_oracle import save_random_gpt2

    with tempfile.TemporaryDirectory(prefix="bench-gpt2-") as tmp:
        save_random_gpt2(Path(tmp), seed=0)
        ceilings = run_part("ceilings", Path(tmp), args.repeats)
        ours = run_part("jax", Path(tmp), args.repeats)
        hf = run_part("hf", Path(tmp), args.repeats)
    result = summarize(ceilings, ours, hf)
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
