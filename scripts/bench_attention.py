"""Benchmark (not a test): our flash attention against the full-matrix reference and XLA.

CPU (default): causal self-attention, B=1, N=12, H=64, float32, T ∈ {1024, 2048, 4096, 8192};
each (implementation, T) runs in its own process and its peak memory is the OS's figure for that
whole process (ru_maxrss from wait4: runtime included). Goals at T=8192: flash peak memory ≤ 1/16
of reference, flash time ≤ 1.0× xla.

GPU (--gpu): bf16, H=64, N=12, B = 16384 / T, causal and not, T ∈ {1k, 2k, 4k, 8k, 16k}:
TFLOP/s (4·B·T²·N·H, halved for causal) for cudnn, our pallas, JAX's own Pallas mha (the peer),
xla and flash, plus the bf16 matmul ceiling measured on the same GPU. Goal: pallas ≥ 0.9× cudnn.

Run: .venv/bin/python -m scripts.bench_attention [--gpu] [--repeats 3] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from scripts.benchlib import best_time_s, print_goals

CPU_LENGTHS = (1024, 2048, 4096, 8192)
CPU_IMPLS = ("reference", "xla", "flash")
GPU_LENGTHS = (1024, 2048, 4096, 8192, 16384)
GPU_IMPLS = ("cudnn", "pallas", "jax-pallas-mha", "xla", "flash")
N_HEADS, HEAD_DIM = 12, 64
REPO = Path(__file__).resolve().parent.parent


def inputs(B: int, T: int, dtype):
    """Random q, k, v made on the device (no host copies to inflate the process's memory)."""
    import jax

    keys = jax.random.split(jax.random.key(T), 3)
    return [jax.random.normal(key, (B, T, N_HEADS, HEAD_DIM), dtype) for key in keys]


def attention_fn(impl: str, causal: bool):
    import jax

    from model.attention import attend

    if impl == "jax-pallas-mha":
        from jax.experimental.pallas.ops.gpu.attention import mha

        return jax.jit(lambda q, k, v: mha(q, k, v, segment_ids=None,
                                           sm_scale=HEAD_DIM**-0.5, causal=causal))
    return jax.jit(lambda q, k, v: attend(q, k, v, causal=causal, impl=impl))


def time_attention(fn, qkv, repeats: int) -> float:
    return best_time_s(lambda: fn(*qkv).block_until_ready(), repeats)


def cpu_case(impl: str, T: int, repeats: int) -> dict:
    """One child process: time one implementation at one length (its memory is read by the
    parent from the OS when the child exits)."""
    import jax.numpy as jnp

    q, k, v = inputs(1, T, jnp.float32)
    return {"time_s": time_attention(attention_fn(impl, causal=True), (q, k, v), repeats)}


def run_cpu_case(impl: str, T: int, repeats: int, limit_s: float = 1800) -> dict:
    """Run one case in a child process; its peak memory is the OS's ru_maxrss from wait4."""
    argv = [sys.executable, "-m", "scripts.bench_attention", "--case", impl, str(T),
            "--repeats", str(repeats)]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen(argv, cwd=REPO, stdout=out, stderr=err, text=True)
        killer = threading.Timer(limit_s, child.kill)
        killer.start()
        _, status, usage = os.wait4(child.pid, 0)
        killer.cancel()
        child.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        out.seek(0), err.seek(0)
        if child.returncode != 0:
            sys.exit(f"case {impl} T={T} failed (exit {child.returncode}):\n{err.read()[-2000:]}")
        result = json.loads(out.read().strip().splitlines()[-1])
    return {**result, "peak_bytes": usage.ru_maxrss * 1024}  # Linux reports KiB


def cpu_benchmark(repeats: int) -> dict:
    rows = {}
    for T in CPU_LENGTHS:
        for impl in CPU_IMPLS:
            rows[f"{impl}@{T}"] = {"impl": impl, "T": T, **run_cpu_case(impl, T, repeats)}
            row = rows[f"{impl}@{T}"]
            print(f"  T={T:<5} {impl:<10} {row['time_s'] * 1e3:9.1f} ms "
                  f"{row['peak_bytes'] / 2**20:8.0f} MiB peak", file=sys.stderr)
    last = CPU_LENGTHS[-1]
    flash, reference, xla = (rows[f"{i}@{last}"] for i in ("flash", "reference", "xla"))
    memory_ratio = flash["peak_bytes"] / reference["peak_bytes"]
    time_ratio = flash["time_s"] / xla["time_s"]
    goals = {f"flash peak memory ≤ 1/16 of reference at T={last}": memory_ratio <= 1 / 16,
             f"flash time ≤ 1.0× xla at T={last}": time_ratio <= 1.0}
    return {"rows": rows, "flash_memory_over_reference": memory_ratio,
            "flash_time_over_xla": time_ratio, "goals": goals}


def print_cpu(result: dict) -> None:
    print(f"causal self-attention, B=1, N={N_HEADS}, H={HEAD_DIM}, float32, CPU; "
          "peak = whole-process RSS (OS)")
    print(f"{'T':>6}" + "".join(f"{impl + ' ms':>14}{impl + ' MiB':>15}" for impl in CPU_IMPLS)
          + f"{'flash/xla t':>13}{'flash/ref mem':>15}")
    for T in CPU_LENGTHS:
        cells = [result["rows"][f"{impl}@{T}"] for impl in CPU_IMPLS]
        line = "".join(f"{c['time_s'] * 1e3:>14.1f}{c['peak_bytes'] / 2**20:>15.0f}" for c in cells)
        flash, reference, xla = cells[2], cells[0], cells[1]
        print(f"{T:>6}{line}{flash['time_s'] / xla['time_s']:>13.2f}"
              f"{flash['peak_bytes'] / reference['peak_bytes']:>15.3f}")
    print_goals(result["goals"])


def attention_flops(B: int, T: int, causal: bool) -> float:
    flops = 4 * B * T * T * N_HEADS * HEAD_DIM
    return flops / 2 if causal else flops


def gpu_benchmark(repeats: int) -> dict:
    """All GPU cases in this process: TFLOP/s per implementation, plus the bf16 matmul ceiling."""
    import jax
    import jax.numpy as jnp

    if jax.default_backend() != "gpu":
        sys.exit(f"--gpu needs a GPU; JAX's backend here is {jax.default_backend()}")
    a = jax.random.normal(jax.random.key(0), (8192, 8192), jnp.bfloat16)
    matmul = jax.jit(lambda x: x @ x)
    ceiling = 2 * 8192**3 / best_time_s(lambda: matmul(a).block_until_ready(), repeats)
    rows = {}
    for T in GPU_LENGTHS:
        B = max(1, 16384 // T)
        q, k, v = inputs(B, T, jnp.bfloat16)
        for causal in (True, False):
            for impl in GPU_IMPLS:
                key = f"{impl}@{T}{'-causal' if causal else ''}"
                try:
                    seconds = time_attention(attention_fn(impl, causal), (q, k, v), repeats)
                    rows[key] = {"tflops": attention_flops(B, T, causal) / seconds / 1e12}
                except Exception as error:  # a kernel that cannot run here is a row, not a crash
                    rows[key] = {"error": f"{type(error).__name__}: {str(error)[:200]}"}
    return {"device": jax.devices()[0].device_kind, "bf16_matmul_tflops": ceiling / 1e12,
            "rows": rows}


def print_gpu(result: dict) -> None:
    print(f"{result['device']}: bf16 matmul ceiling {result['bf16_matmul_tflops']:.0f} TFLOP/s; "
          f"attention TFLOP/s (bf16, H={HEAD_DIM}, N={N_HEADS}, B=16384/T)")
    for causal in (True, False):
        print(("causal" if causal else "non-causal").ljust(8)
              + "".join(f"{impl:>16}" for impl in GPU_IMPLS) + f"{'pallas/cudnn':>14}")
        for T in GPU_LENGTHS:
            cells = [result["rows"][f"{impl}@{T}{'-causal' if causal else ''}"]
                     for impl in GPU_IMPLS]
            text = "".join(f"{c['tflops']:>16.1f}" if "tflops" in c else f"{'error':>16}"
                           for c in cells)
            ratio = (cells[1]["tflops"] / cells[0]["tflops"]
                     if "tflops" in cells[0] and "tflops" in cells[1] else float("nan"))
            print(f"{T:<8}{text}{ratio:>14.2f}")
    errors = {k: v["error"] for k, v in result["rows"].items() if "error" in v}
    for key, error in sorted(errors.items()):
        print(f"  {key}: {error}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="the GPU benchmark (needs a GPU)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--case", nargs=2, metavar=("IMPL", "T"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(cpu_case(args.case[0], int(args.case[1]), args.repeats)))
        return
    result = gpu_benchmark(args.repeats) if args.gpu else cpu_benchmark(args.repeats)
    (print_gpu if args.gpu else print_cpu)(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
