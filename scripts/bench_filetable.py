"""Benchmark (not a test): `envcheck inspect-image` on an image with many files, as big ML images
are (a pip-installed stack has hundreds of thousands), side by side with GNU tar listing the same
layers, in one run.

The image, an OCI layout (gzip level 1), has three layers:
  1  --files files in a dist-packages-like tree (--file-bytes each)
  2  whiteouts for --whiteouts of them (every n-th file, as `pip uninstall` leaves) and one
     opaque directory
  3  10,000 more files
Rows, each its own process, taking turns per round (--repeat rounds, the fastest kept):
  gzip|tar    gzip -dc LAYER | tar -t, for the three layers one after another (a listing only:
              no digests, no merge)
  envcheck    envcheck inspect-image oci:DIR:many --json (digests, diff_ids, the merged view)
  one file    envcheck on an image whose one layer holds layer 1's bytes as one file: the same
              streaming buffers, no file table
The file table's cost is (envcheck RSS - one file RSS) / files.
Goals: peak RSS ≤ 150 MB (inspect-image's bound for the 1 GB layer, held here for 310,000
files); envcheck ≤ 4× gzip|tar (tar -t reads headers in C; envcheck also hashes every byte
twice and merges the layers, in Python at about 7 µs an entry).

Run: .venv/bin/python -m scripts.bench_filetable [--files 300000] [--whiteouts 5000]
     [--file-bytes 200] [--repeat 3] [--workdir DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tarfile
import tempfile
from pathlib import Path

from scripts import cuda_image
from scripts.benchlib import print_goals, timed_rounds

MORE_FILES = 10_000


def _path(i: int) -> str:
    return (f"usr/local/lib/python3.12/dist-packages/package_{i // 400:05d}/"
            f"submodule_{(i // 40) % 10}/module_{i:08d}.py")


def _tar(entries: list[tuple[str, bytes]]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, body in entries:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(body), 0o644
            tar.addfile(info, io.BytesIO(body))
    return raw.getvalue()


def build(workdir: Path, files: int, whiteouts: int, file_bytes: int) -> dict:
    layout = workdir / "layout"
    (layout / "blobs").mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    body = (b"# generated module\n" * (file_bytes // 19 + 1))[:file_bytes]
    step = max(1, files // max(whiteouts, 1))
    gone = [_path(i) for i in range(0, files, step)][:whiteouts]
    tars = [
        _tar([(_path(i), body) for i in range(files)]),
        _tar([(posixpath_whiteout(p), b"") for p in gone]
             + [(_path(files - 1).rsplit("/", 2)[0] + "/.wh..wh..opq", b"")]),
        _tar([(_path(files + i), body) for i in range(MORE_FILES)]),
    ]
    built = cuda_image.write_image(layout, "many", tars, ["pip install", "pip uninstall",
                                                          "pip install more"], "gzip", "amd64")
    cuda_image.write_image(layout, "one-file", [_tar([("data.tar", tars[0])])], ["ADD"],
                           "gzip", "amd64")
    built["entries"] = files + MORE_FILES
    return {"layout": layout, **built}


def posixpath_whiteout(path: str) -> str:
    directory, _, name = path.rpartition("/")
    return f"{directory}/.wh.{name}"


def run(workdir: Path, files: int, whiteouts: int, file_bytes: int, repeat: int) -> dict:
    print(f"building the image ({files:,} files)…", file=sys.stderr)
    image = build(workdir, files, whiteouts, file_bytes)
    layout, envcheck = image["layout"], Path(sys.executable).parent / "envcheck"
    blobs = " ".join(str(layout / "blobs/sha256" / layer["digest"].split(":")[1])
                     for layer in image["layers"])
    rows = timed_rounds([
        ("gzip|tar", f"for b in {blobs}; do gzip -dc $b | tar -t; done", None),
        ("envcheck", f"{envcheck} inspect-image oci:{layout}:many --json", None),
        ("one file", f"{envcheck} inspect-image oci:{layout}:one-file --json", None),
    ], workdir, repeat)
    by_name = {row["name"]: row for row in rows}
    table_bytes = (by_name["envcheck"]["peak_rss_bytes"]
                   - by_name["one file"]["peak_rss_bytes"])
    return {"files": files, "whiteouts": whiteouts, "file_bytes": file_bytes,
            "entries": image["entries"], "rows": rows,
            "envcheck_over_tar": by_name["envcheck"]["wall_s"] / by_name["gzip|tar"]["wall_s"],
            "median_round_ratio": statistics.median(
                e / t for e, t in zip(by_name["envcheck"]["runs_s"],
                                      by_name["gzip|tar"]["runs_s"], strict=False)),
            "table_bytes_per_file": table_bytes / image["entries"]}


def print_table(result: dict) -> None:
    print(f"{result['entries']:,} files in 3 layers, {result['whiteouts']:,} whiteouts and an "
          f"opaque directory, {result['file_bytes']} bytes a file")
    print(f"{'row':<10} {'wall s':>8} {'CPU s':>7} {'peak RSS MB':>12}")
    for row in result["rows"]:
        print(f"{row['name']:<10} {row['wall_s']:8.2f} {row['cpu_s']:7.2f} "
              f"{row['peak_rss_bytes'] / 1e6:12.0f}")
    print(f"envcheck / gzip|tar: {result['envcheck_over_tar']:.2f} fastest over fastest, "
          f"{result['median_round_ratio']:.2f} median of rounds")
    print(f"file table: {result['table_bytes_per_file']:.0f} bytes a file")
    envcheck = next(row for row in result["rows"] if row["name"] == "envcheck")
    print_goals({"peak RSS ≤ 150 MB": envcheck["peak_rss_bytes"] <= 150e6,
                 "envcheck ≤ 4× gzip|tar": result["envcheck_over_tar"] <= 4.0})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=300_000)
    parser.add_argument("--whiteouts", type=int, default=5_000)
    parser.add_argument("--file-bytes", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-filetable-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        result = run(workdir, args.files, args.whiteouts, args.file_bytes, args.repeat)
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
