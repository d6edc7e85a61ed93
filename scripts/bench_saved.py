"""Benchmark (not a test): `envcheck inspect-image` on saved images — a `docker save` archive as a
tar, gzipped and zstd'd whole, and the daemon's own save — side by side with the tools people
use on them, in one run.

Takes the bench image's OCI layout (bench_inspect builds it: --workdir DIR/layout, tag
`bench`), writes it as a docker-archive with skopeo, compresses that (gzip -6 via pigz when
installed, zstd -3) and loads it into a docker engine (test_engine: the one that answers, else
its own). Then it times, rows taking turns, each its fastest of --repeat runs:
  envcheck .tar / .tar.gz / .tar.zst / daemon   inspect-image … --json (every layer, digests,
                                                  diff_ids, files)
  gzip -dc, zstd -dc    decompressing alone, output dropped (skopeo 1.9.3 refuses a compressed
                        docker-archive: "loading tar component manifest.json: invalid tar
                        header"; docker load unpacks into its store, no like-for-like row)
  docker save           docker save IMAGE > /dev/null (the stream envcheck reads for daemon)
--envcheck runs another build (e.g. an older checkout: "env PYTHONPATH=OLD python -m envcheck").

Run: .venv/bin/python -m scripts.bench_saved --layout DIR [--repeat 3] [--envcheck CMD]
     [--workdir DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from scripts.benchlib import dockerd_pid, failure, timed_rounds

IMAGE = "bench/saved:big"


def save(layout: Path, workdir: Path) -> dict[str, Path]:
    """The image as a docker-archive tar, .tar.gz and .tar.zst (made once, kept in workdir)."""
    paths = {kind: workdir / f"saved.{kind}" for kind in ("tar", "tar.gz", "tar.zst")}
    if not paths["tar"].exists():
        subprocess.run(["skopeo", "copy", "-q", f"oci:{layout}:bench",
                        f"docker-archive:{paths['tar']}:{IMAGE}"], check=True)
    gzip = f"pigz -6 -c {paths['tar']}" if shutil.which("pigz") else f"gzip -6 -c {paths['tar']}"
    for kind, command in (("tar.gz", gzip), ("tar.zst", f"zstd -3 -q -c {paths['tar']}")):
        if not paths[kind].exists():
            subprocess.run(f"{command} > {paths[kind]}.part && mv {paths[kind]}.part "
                           f"{paths[kind]}", shell=True, check=True)
    return paths


def run(layout: Path, workdir: Path, repeat: int, envcheck: str) -> dict:
    from scripts import test_engine

    workdir.mkdir(parents=True, exist_ok=True)
    paths = save(layout, workdir)
    host, started = test_engine.start()
    env = f"DOCKER_HOST={host}"
    try:
        subprocess.run(f"{env} docker load -q -i {paths['tar']}", shell=True, check=True,
                       capture_output=True)
        daemon = started or dockerd_pid()
        rows = timed_rounds([
            ("envcheck .tar", f"{envcheck} inspect-image docker-archive:{paths['tar']} --json",
             None),
            ("envcheck .tar.gz", f"{envcheck} inspect-image docker-archive:{paths['tar.gz']} "
                                 "--json", None),
            ("envcheck .tar.zst", f"{envcheck} inspect-image docker-archive:{paths['tar.zst']} "
                                  "--json", None),
            ("envcheck daemon", f"{env} {envcheck} inspect-image docker-daemon:{IMAGE} --json",
             daemon),
            ("gzip -dc", f"gzip -dc {paths['tar.gz']} > /dev/null", None),
            ("zstd -dc", f"zstd -dc {paths['tar.zst']} > /dev/null", None),
            ("docker save", f"{env} docker save {IMAGE} > /dev/null", daemon),
        ], workdir, repeat)
    finally:
        subprocess.run(f"{env} docker rmi -f {IMAGE}", shell=True, capture_output=True)
        if started:
            test_engine.stop(started)
    by = {row["name"]: row for row in rows}
    sizes = {kind: path.stat().st_size for kind, path in paths.items()}
    pairs = (("gzip -dc", "envcheck .tar.gz"), ("zstd -dc", "envcheck .tar.zst"),
             ("envcheck daemon", "docker save"))
    ratios = {f"{top} / {bottom}": by[top]["wall_s"] / by[bottom]["wall_s"]
              for top, bottom in pairs if not failure(by[top]) and not failure(by[bottom])}
    return {"sizes": sizes, "rows": rows, "ratios": ratios, "envcheck": envcheck}


def print_table(result: dict) -> None:
    sizes = result["sizes"]
    print(f"saved image: {sizes['tar'] / 1e9:.3f} GB tar, {sizes['tar.gz'] / 1e9:.3f} GB .tar.gz, "
          f"{sizes['tar.zst'] / 1e9:.3f} GB .tar.zst; envcheck: {result['envcheck']}")
    print(f"{'':22}{'wall s':>8}{'CPU s':>8}{'peak RSS MB':>13}")
    for row in result["rows"]:
        if failure(row):
            print(f"{row['name']:<22}{failure(row)}")
            continue
        print(f"{row['name']:<22}{row['wall_s']:8.2f}{row['cpu_s'] + row['server_cpu_s']:8.2f}"
              f"{row['peak_rss_bytes'] / 1e6:13.0f}")
    for name, value in result["ratios"].items():
        print(f"{name} = {value:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", type=Path, required=True,
                        help="the bench image's OCI layout (bench_inspect's WORKDIR/layout)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/envcheck-bench-saved"))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--envcheck", default=str(Path(sys.executable).parent / "envcheck"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not (args.layout / "index.json").is_file():
        sys.exit(f"{args.layout}: no OCI layout; build one with `python -m scripts.bench_inspect "
                 "--workdir DIR` (DIR/layout)")
    result = run(args.layout, args.workdir, args.repeat, args.envcheck)
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
