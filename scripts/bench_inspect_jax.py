"""Benchmark (not a test): bench_inspect's JAX case — what the JAX facts (the Python packages,
the ELF facts of the CUDA and JAX libraries, the loader simulation, JAX's version rules) cost on
top of inspecting an image, measured against the same image without them, in one run.

The image: the CUDA-like test image plus one gzip -6 layer holding the real jax, jaxlib,
jax-cuda12-plugin and jax-cuda12-pjrt 0.10.2 wheels and the nvidia-cublas-cu12 12.8.3.14 and
nvidia-cudnn-cu12 9.7.0.66 wheels (≥ 1 GB of NVIDIA libraries), unpacked into site-packages as
pip installs them (without the other nvidia wheels: the report fails image.jax-libraries). The peer
is the same image with the same bytes under a path no fact reads (usr/local/share/blobs/…):
the same layer size, file count, inflating and hashing, none of the JAX work. The wheels are
downloaded once (~/.cache/envcheck/wheels, bench-wheels). Rows take turns for --repeat rounds.
Goals: JAX facts ≤ 5% on top (fastest against fastest, and median of the rounds), peak RSS ≤ 150 MB.

Run: .venv/bin/python -m scripts.bench_inspect_jax [--repeat 5] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from scripts import cuda_image
from scripts.bench_inspect import big_layer, cuda_wheels, extend_manifest
from scripts.benchlib import print_goals, timed_rounds

SITE = "usr/local/lib/python3.12/site-packages"
ELSEWHERE = "usr/local/share/blobs"
JAX_WHEELS = ("jax==0.10.2", "jaxlib==0.10.2", "jax-cuda12-plugin==0.10.2",
              "jax-cuda12-pjrt==0.10.2")
WHEEL_CACHE = Path.home() / ".cache/envcheck/wheels"


def jax_wheels(cache: Path) -> list[Path]:
    cache.mkdir(parents=True, exist_ok=True)
    if len(list(cache.glob("jax*-0.10.2-*.whl"))) < len(JAX_WHEELS):
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d",
                        str(cache), *JAX_WHEELS], check=True)
    return sorted(cache.glob("jax*-0.10.2-*.whl"))


def wheel_files(wheels: list[Path], prefix: str):
    """Every file of the wheels, unpacked under `prefix` as pip lays them out."""
    for wheel in wheels:
        archive = zipfile.ZipFile(wheel)
        for member in archive.infolist():
            if not member.is_dir():
                yield (f"{prefix}/{member.filename}", member.file_size,
                       lambda m=member, a=archive: a.open(m))


def build(workdir: Path, wheels: list[Path]) -> tuple[Path, dict]:
    layout = workdir / "layout"
    built = cuda_image.build_layout(layout, tag="bench")
    layers = {}
    for tag, prefix in (("jax", SITE), ("jax-off", ELSEWHERE)):
        blob = workdir / f"{tag}.tar.gz"
        layers[tag] = big_layer(blob, 1 << 62, wheel_files(wheels, prefix))
        blob.rename(layout / "blobs/sha256" / layers[tag]["digest"].split(":")[1])
        extend_manifest(layout, built, layers[tag], tag=tag)
    return layout, layers


def facts(layout: Path) -> dict:
    done = subprocess.run([str(Path(sys.executable).parent / "envcheck"), "inspect-image",
                           f"oci:{layout}:jax", "--json"], capture_output=True, text=True)
    report = json.loads(done.stdout)
    return {"packages": len(report["python"]["packages"]),
            "shared_objects": len(report["shared_objects"]),
            "loads": len((report.get("jax_libraries") or {}).get("loads", [])),
            "checks": {c["id"]: c["status"] for c in report["checks"]
                       if c["id"] in ("image.python", "image.jax-stack", "image.jax-libraries")}}


def run(workdir: Path, repeat: int) -> dict:
    wheels = jax_wheels(WHEEL_CACHE) + (cuda_wheels(Path.home() / ".cache/envcheck/bench-wheels")
                                        or [])
    print(f"building the JAX image from {len(wheels)} wheels…", file=sys.stderr)
    layout, layers = build(workdir, wheels)
    envcheck = Path(sys.executable).parent / "envcheck"
    # exit 1 is a report with a failed check (this image lacks most nvidia wheels): a result
    rows = timed_rounds([(name, f"{envcheck} inspect-image oci:{layout}:{tag} --json "
                                "|| [ $? -eq 1 ]", None)
                         for name, tag in (("envcheck jax", "jax"),
                                           ("envcheck jax-off", "jax-off"))], workdir, repeat)
    on, off = rows
    rounds = [a / b for a, b in zip(on["runs_s"], off["runs_s"], strict=False)]
    ratio = on["wall_s"] / off["wall_s"]
    goals = {"JAX facts ≤ 5% on top (fastest runs)": ratio <= 1.05,
             "JAX facts ≤ 5% on top (median of rounds)": statistics.median(rounds) <= 1.05,
             "peak RSS ≤ 150 MB": on["peak_rss_bytes"] <= 150e6}
    return {"layer": layers["jax"], "rows": rows, "ratio": ratio, "rounds": rounds,
            "facts": facts(layout), "goals": goals}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="bench-jax-")))
        workdir.mkdir(parents=True, exist_ok=True)
        result = run(workdir, max(1, args.repeat))
    layer = result["layer"]
    print(f"JAX layer: {layer['size'] / 1e9:.3f} GB gzip, {layer['uncompressed'] / 1e9:.3f} GB "
          f"uncompressed, {layer['files']} files (plugin, pjrt, cuBLAS, cuDNN wheels)")
    print(f"{'':<18}{'wall s':>8}{'CPU s':>8}{'peak RSS MB':>13}")
    for row in result["rows"]:
        print(f"{row['name']:<18}{row['wall_s']:>8.2f}{row['cpu_s']:>8.2f}"
              f"{row['peak_rss_bytes'] / 1e6:>13.0f}")
    print(f"jax / jax-off: {result['ratio']:.3f} fastest over fastest, "
          f"{statistics.median(result['rounds']):.3f} median of rounds "
          f"({', '.join(f'{r:.3f}' for r in result['rounds'])})")
    print(f"facts: {json.dumps(result['facts'])}")
    print_goals(result["goals"])


if __name__ == "__main__":
    main()
