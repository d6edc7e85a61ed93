"""Benchmark (not a test): `envcheck inspect-image` on an image with a ≥ 1 GB compressed layer,
side by side with the tools people use, in one run.

Builds the CUDA-like image plus one big gzip layer (level 6, gzip's and BuildKit's default)
and pushes it to a local docker-registry with skopeo. The layer holds, by --content:
  cuda  the image's own cuBLAS 12.8.3.14 and cuDNN 9.7.0.66 libraries, from their PyPI wheels
        (pip download, once, into --wheel-cache): real GPU code, about 1.5:1, as in the image
  host  1 MiB pieces of this machine's shared libraries (x86 code, about 2.6:1): offline
Then it times, each as its own process with the OS's peak RSS (wait4):
  floor       the fastest download + verify of the blob on this machine, in the same run: the
              fastest of curl BLOB | sha256sum (coreutils), | openssl dgst -sha256 and | a
              python hashlib reader (each is its own row; which one wins varies by machine:
              coreutils' sha256sum hashed 4x slower than OpenSSL on one VM here)
  gzip|tar    curl BLOB | gzip -dc | tar -t
  inflate     python ISA-L inflate of the blob file (page cache), output dropped, one core, with
              envcheck's inflater (IgzipDecompressor) and allocator tuning: the least wall time
              of anything that inflates the layer on one core, however fast its download (no
              hashing, no tar walk)
  inflate+hash  the same inflate while a second process hashes as many bytes as envcheck must
              (blob + uncompressed): the machine's bound for envcheck's work on two cores, with
              no GIL, no queues, no tar walk and no registry to share the cores with
  docker save docker save IMAGE > /dev/null                (after docker pull from the registry)
  skopeo copy skopeo copy docker://… oci:DIR
  envcheck    envcheck inspect-image REF --json            (every layer: digests, diff_ids, files)
  … -j1       the same, one layer at a time (--jobs 1)
  2 big       the image with the big layer twice, --jobs 1 and --jobs 2
Each row runs --repeat times (default 5); the fastest run is kept. The floor rows, envcheck,
inflate and inflate+hash take turns, one run each per round, so they see the same state of the
machine (on this VM the floor alone drifts by 30% within minutes); envcheck / floor is given
both as fastest over fastest and as the median of the rounds' own ratios (each round's floor
the fastest floor row of that round). Besides wall time and peak
RSS, each row has its CPU seconds: the pipeline's own (user + sys) plus what the registry spent
serving it. CPU / cores is the least wall time that work can take on this machine, so the
table shows whether a ratio is bounded by the code or by the machine.
Goals: envcheck ≤ 1.1× the floor, ≥ 2.5× faster than gzip|tar, peak RSS ≤ 150 MB.

Run: .venv/bin/python -m scripts.bench_inspect [--gigabytes 1.0] [--repeat 5] [--workdir DIR]
     [--content cuda|host] [--wheel-cache DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gzip
import hashlib
import io
import itertools
import json
import os
import posixpath
import shlex
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from envcheck.image.sources import REF_NAME, ref_name
from scripts import cuda_image
from scripts.benchlib import dockerd_pid, failure, print_goals, timed, timed_rounds

FILE_BYTES = 1 << 20


class _HashingWriter(io.RawIOBase):
    def __init__(self, sink):
        self.sink, self.hash, self.count = sink, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.hash.update(data)
        self.count += len(data)
        return self.sink.write(data)


CUDA_WHEELS = ("nvidia-cublas-cu12==12.8.3.14", "nvidia-cudnn-cu12==9.7.0.66")
WHEEL_DIRS = {"nvidia/cublas/lib/": "usr/local/cuda-12.8/targets/x86_64-linux/lib/",
              "nvidia/cublas/include/": "usr/local/cuda-12.8/targets/x86_64-linux/include/",
              "nvidia/cudnn/lib/": "usr/lib/x86_64-linux-gnu/",
              "nvidia/cudnn/include/": "usr/include/x86_64-linux-gnu/"}
GZIP_LEVEL = 6  # gzip's and BuildKit's default level


def binary_pool(pool_bytes: int = 64 << 20) -> bytes:
    """This machine's shared libraries (x86 code), when the CUDA libraries cannot be had."""
    pool = bytearray()
    for path in sorted(Path("/usr/lib/x86_64-linux-gnu").glob("*.so*")):
        if path.is_file() and not path.is_symlink():
            pool += path.read_bytes()[: 8 << 20]
        if len(pool) >= pool_bytes:
            break
    if len(pool) < FILE_BYTES * 4:
        sys.exit("not enough shared libraries under /usr/lib/x86_64-linux-gnu to build the layer")
    return bytes(pool)


def host_library_files() -> Iterator[tuple[str, int, Callable[[], BinaryIO]]]:
    """Endless 1 MiB files cut from this machine's shared libraries (about 2.6:1 at level 6)."""
    pool = binary_pool()
    for index in itertools.count():
        start = (index * 7919 * 4096) % (len(pool) - FILE_BYTES)
        data = os.urandom(64) + pool[start + 64:start + FILE_BYTES]
        yield (f"opt/big/{index // 1000:03d}/lib-{index:06d}.so", len(data),
               functools.partial(io.BytesIO, data))


def cuda_wheels(cache: Path) -> list[Path] | None:
    """The cuBLAS and cuDNN wheels of the image's own versions (12.8.3.14, 9.7.0.66) from PyPI,
    kept in `cache`; None when pip cannot fetch them (no package index)."""
    cache.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d",
                           str(cache), *CUDA_WHEELS], capture_output=True, text=True)
    patterns = [pin.replace("-", "_").replace("==", "-") + "-*.whl" for pin in CUDA_WHEELS]
    wheels = [found for pattern in patterns for found in sorted(cache.glob(pattern))[:1]]
    if done.returncode != 0 or len(wheels) < len(CUDA_WHEELS):
        print(f"cannot fetch {', '.join(CUDA_WHEELS)} ({done.stderr.strip()[-200:]})",
              file=sys.stderr)
        return None
    return wheels


def cuda_library_files(wheels: list[Path]) -> Iterator[tuple[str, int, Callable[[], BinaryIO]]]:
    """The libraries and headers of the wheels at their paths in the CUDA image, over and over
    (…/copyN/ after the first pass): real GPU code, 1.5:1 like the image's own layers."""
    archives = [zipfile.ZipFile(wheel) for wheel in wheels]
    files = [(archive, member, WHEEL_DIRS[prefix] + member.filename[len(prefix):])
             for archive in archives for member in archive.infolist()
             for prefix in WHEEL_DIRS if member.filename.startswith(prefix)
             and not member.is_dir() and "/__" not in member.filename]
    if not files:
        sys.exit(f"no libraries under {', '.join(WHEEL_DIRS)} in {', '.join(map(str, wheels))}")
    for copy in itertools.count():
        for archive, member, name in files:
            if copy:
                name = posixpath.join(posixpath.dirname(name), f"copy{copy}",
                                      posixpath.basename(name))
            yield name, member.file_size, functools.partial(archive.open, member)


def big_layer(path: Path, compressed_bytes_min: int, files) -> dict:
    """Stream a tar of `files` through gzip (level 6) into `path` until the compressed size
    reaches the target (whole files only). Never holds the layer in memory."""
    with path.open("wb") as raw:
        compressed = _HashingWriter(raw)
        with gzip.GzipFile(fileobj=compressed, mode="wb", compresslevel=GZIP_LEVEL,
                           mtime=0) as gz:
            plain = _HashingWriter(gz)
            with tarfile.open(fileobj=plain, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                count = 0
                for name, size, opener in files:
                    if compressed.count >= compressed_bytes_min:
                        break
                    info = tarfile.TarInfo(name)
                    info.size, info.mode = size, 0o644
                    with opener() as body:
                        tar.addfile(info, body)
                    count += 1
    return {"digest": "sha256:" + compressed.hash.hexdigest(), "size": compressed.count,
            "diff_id": "sha256:" + plain.hash.hexdigest(), "files": count,
            "uncompressed": plain.count}


def build_image(workdir: Path, gigabytes: float, content: str,
                wheel_cache: Path) -> tuple[Path, dict]:
    layout = workdir / "layout"
    blob_path = workdir / "big.tar.gz"
    wheels = cuda_wheels(wheel_cache) if content == "cuda" else None
    if content == "cuda" and wheels is None:
        print("falling back to --content host", file=sys.stderr)
    files = cuda_library_files(wheels) if wheels else host_library_files()
    big = big_layer(blob_path, int(gigabytes * 1e9), files)
    big["content"] = "cuda" if wheels else "host"
    built = cuda_image.build_layout(layout, tag="bench")
    (layout / "blobs/sha256" / big["digest"].split(":")[1]).unlink(missing_ok=True)
    shutil.move(blob_path, layout / "blobs/sha256" / big["digest"].split(":")[1])
    extend_manifest(layout, built, big)
    return layout, big


def add_big_layer_again(layout: Path, big: dict) -> None:
    """Tag `bench2`: the image with the big layer twice (same blob, stored once), two big
    layers to stream, to time --jobs. Tag `bench` stays the one-big-layer image."""
    index = json.loads((layout / "index.json").read_text())
    digest = _tagged(index, "bench")["digest"]
    manifest = json.loads((layout / "blobs/sha256" / digest.split(":")[1]).read_text())
    extend_manifest(layout, {"manifest_digest": digest,
                             "config_digest": manifest["config"]["digest"]}, big, tag="bench2")


def _tagged(index: dict, tag: str) -> dict:
    return next(m for m in index["manifests"] if ref_name(m) == tag)


def extend_manifest(layout: Path, built: dict, big: dict, tag: str = "bench") -> None:
    """Append the big layer to the image's manifest and config (new digests), tagged `tag` in
    the index (replacing that tag's entry, or added beside the others)."""
    blobs = layout / "blobs/sha256"
    manifest = json.loads((blobs / built["manifest_digest"].split(":")[1]).read_text())
    config = json.loads((blobs / built["config_digest"].split(":")[1]).read_text())
    config["rootfs"]["diff_ids"].append(big["diff_id"])
    config["history"].append({"created_by": "COPY big /opt/big # buildkit"})
    config_bytes = json.dumps(config).encode()
    config_digest = "sha256:" + hashlib.sha256(config_bytes).hexdigest()
    (blobs / config_digest.split(":")[1]).write_bytes(config_bytes)
    manifest["config"].update(digest=config_digest, size=len(config_bytes))
    manifest["layers"].append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                               "digest": big["digest"], "size": big["size"]})
    manifest_bytes = json.dumps(manifest).encode()
    manifest_digest = "sha256:" + hashlib.sha256(manifest_bytes).hexdigest()
    (blobs / manifest_digest.split(":")[1]).write_bytes(manifest_bytes)
    index = json.loads((layout / "index.json").read_text())
    entry = dict(_tagged(index, "bench"), digest=manifest_digest, size=len(manifest_bytes),
                 annotations={REF_NAME: tag})
    index["manifests"] = [m for m in index["manifests"] if ref_name(m) != tag] + [entry]
    (layout / "index.json").write_text(json.dumps(index))


INFLATE_ONLY = ("import collections, ctypes, sys; from isal import igzip_lib; "
                "libc = ctypes.CDLL(None); libc.mallopt(-3, 64 << 20); "
                "libc.mallopt(-1, 256 << 20); "
                "d = igzip_lib.IgzipDecompressor(igzip_lib.DECOMP_GZIP); "
                "r = sys.stdin.buffer; collections.deque(map(d.decompress, "
                "iter(lambda: r.read(1 << 18), b\"\")), maxlen=0)")
HASH_ONLY = ("import hashlib, sys\nh = hashlib.sha256()\n"
             "f = open(sys.argv[1], \"rb\", buffering=0)\n"
             "b = bytearray(1 << 18)\nleft = int(sys.argv[2])\nwhile left > 0:\n"
             "    n = f.readinto(b) or (f.seek(0) or f.readinto(b))\n"
             "    h.update(memoryview(b)[:min(n, left)])\n    left -= n\n")


# A download verified in Python: the blob from stdin through hashlib's (OpenSSL's) sha256.
HASHLIB_SHA256 = ("import hashlib, sys\nh = hashlib.sha256()\nb = bytearray(1 << 20)\n"
                  "r = sys.stdin.buffer.raw\nwhile n := r.readinto(b):\n"
                  "    h.update(memoryview(b)[:n])\nprint(h.hexdigest())\n")
FLOOR_ROWS = ("floor sha256sum", "floor openssl", "floor hashlib")


def floor_rows(blob_url: str, served: int) -> list[tuple[str, str, int]]:
    """Download + verify, three ways: whichever is fastest here is the floor."""
    fetch = f"curl -sf {blob_url}"
    return [("floor sha256sum", f"{fetch} | sha256sum", served),
            ("floor openssl", f"{fetch} | openssl dgst -sha256", served),
            ("floor hashlib", f"{fetch} | {shlex.quote(sys.executable)} -c "
                              f"{shlex.quote(HASHLIB_SHA256)}", served)]


def bound_command(blob_file: Path, hashed_bytes: int) -> str:
    """The machine's bound for envcheck's work, in two processes (no GIL, no tar walk): one
    inflates the blob on one core while the other reads and hashes as many bytes as envcheck
    must hash (the blob, then its uncompressed bytes)."""
    python = shlex.quote(sys.executable)
    return (f"{python} -c {shlex.quote(HASH_ONLY)} {blob_file} {hashed_bytes} & hashing=$!; "
            f"{python} -c {shlex.quote(INFLATE_ONLY)} < {blob_file} && wait $hashing")


def run(workdir: Path, gigabytes: float, repeat: int, content: str, wheel_cache: Path) -> dict:
    from scripts import test_engine
    from scripts.local_registry import Registry

    print(f"building the image (≥ {gigabytes} GB compressed layer)…", file=sys.stderr)
    layout, big = build_image(workdir, gigabytes, content, wheel_cache)
    registry = Registry(workdir / "registry-root")
    engine, started = None, None
    try:
        ref, ref2 = f"{registry.host}/bench/cuda:big", f"{registry.host}/bench/cuda:big2"
        subprocess.run(["skopeo", "copy", "--dest-tls-verify=false", f"oci:{layout}:bench",
                        f"docker://{ref}"], check=True, capture_output=True)
        add_big_layer_again(layout, big)
        subprocess.run(["skopeo", "copy", "--dest-tls-verify=false", f"oci:{layout}:bench2",
                        f"docker://{ref2}"], check=True, capture_output=True)
        blob_url = f"http://{registry.host}/v2/bench/cuda/blobs/{big['digest']}"
        blob_file = layout / "blobs/sha256" / big["digest"].split(":")[1]
        venv = Path(sys.executable).parent
        served = registry.process.pid
        hashed_bytes = big["size"] + big["uncompressed"]
        rows = timed_rounds([
            *floor_rows(blob_url, served),
            ("envcheck", f"{venv / 'envcheck'} inspect-image {ref} --json", served),
            ("inflate", f"{sys.executable} -c '{INFLATE_ONLY}' < {blob_file}", None),
            ("inflate+hash", bound_command(blob_file, hashed_bytes), None),
        ], workdir, repeat)
        rows += [
            timed("gzip|tar", f"curl -sf {blob_url} | gzip -dc | tar -t", workdir, served,
                  repeat),
            timed("skopeo copy", f"rm -rf {workdir / 'skopeo-out'}; skopeo copy "
                                 f"--src-tls-verify=false docker://{ref} "
                                 f"oci:{workdir / 'skopeo-out'}:x", workdir, served, repeat),
            timed("envcheck -j1", f"{venv / 'envcheck'} inspect-image {ref} --json --jobs 1",
                  workdir, served, repeat),
            timed("2 big, -j1", f"{venv / 'envcheck'} inspect-image {ref2} --json --jobs 1",
                  workdir, served, repeat),
            timed("2 big, -j2", f"{venv / 'envcheck'} inspect-image {ref2} --json --jobs 2",
                  workdir, served, repeat),
        ]
        try:
            engine, started = test_engine.start()
            env = f"DOCKER_HOST={engine}"
            subprocess.run(f"{env} docker pull -q {ref}", shell=True, check=True,
                           capture_output=True)
            rows.append(timed("docker save", f"{env} docker save {ref}", workdir,
                              started or dockerd_pid(), repeat))
            subprocess.run(f"{env} docker rmi -f {ref}", shell=True, capture_output=True)
        except (RuntimeError, subprocess.CalledProcessError) as error:
            rows.append({"name": "docker save", "error": str(error)[:300]})
    finally:
        registry.stop()
        if started:
            test_engine.stop(started)
    return summarize(rows, big)


def summarize(rows: list[dict], big: dict) -> dict:
    by = {row["name"]: row for row in rows}
    floors = [by[name] for name in FLOOR_ROWS if name in by and not failure(by[name])]
    floor = min(floors, key=lambda row: row["wall_s"]) if floors else by[FLOOR_ROWS[0]]
    mine, gz = by["envcheck"], by["gzip|tar"]
    # each round's floor: the fastest floor row of that round
    round_floors = [min(times) for times in zip(*(row["runs_s"] for row in floors),
                                                strict=False)] if floors else []
    rounds = [m / f for m, f in zip(mine["runs_s"], round_floors, strict=False)]
    ratios = {"envcheck_over_floor": mine["wall_s"] / floor["wall_s"],
              "envcheck_over_floor_rounds": rounds,
              "envcheck_over_floor_paired_median": statistics.median(rounds),
              "bound_over_floor": by["inflate+hash"]["wall_s"] / floor["wall_s"],
              "envcheck_over_bound": mine["wall_s"] / by["inflate+hash"]["wall_s"],
              "gzip_tar_over_envcheck": gz["wall_s"] / mine["wall_s"],
              "inflate_over_floor": by["inflate"]["wall_s"] / floor["wall_s"],
              "envcheck_over_inflate": mine["wall_s"] / by["inflate"]["wall_s"],
              "two_layers_j1_over_j2": by["2 big, -j1"]["wall_s"] / by["2 big, -j2"]["wall_s"]}
    cores = os.cpu_count() or 1
    bounds = {"cores": cores,
              "envcheck_cpu_s": mine["cpu_s"] + mine["server_cpu_s"],
              "envcheck_least_wall_s": (mine["cpu_s"] + mine["server_cpu_s"]) / cores}
    bounds["least_over_floor"] = bounds["envcheck_least_wall_s"] / floor["wall_s"]
    goals = {"envcheck ≤ 1.1× floor (fastest runs)": ratios["envcheck_over_floor"] <= 1.1,
             "envcheck ≤ 1.1× floor (median of rounds)":
                 ratios["envcheck_over_floor_paired_median"] <= 1.1,
             "envcheck ≥ 2.5× faster than gzip|tar": ratios["gzip_tar_over_envcheck"] >= 2.5,
             "envcheck peak RSS ≤ 150 MB": mine["peak_rss_bytes"] <= 150e6}
    broken = [row["name"] for row in (mine, floor, gz, by["inflate"], by["inflate+hash"])
              if failure(row)]
    if broken:  # a failed run's time is no result: no goal is met on it
        goals = {f"{goal} ({', '.join(broken)} failed)": False for goal in goals}
    return {"layer": big, "rows": rows, "floor": floor["name"], "ratios": ratios,
            "bounds": bounds, "goals": goals}


def print_table(result: dict) -> None:
    layer = result["layer"]
    what = {"cuda": "cuBLAS 12.8.3.14 + cuDNN 9.7.0.66 libraries",
            "host": "1 MiB pieces of this machine's x86 libraries"}[layer["content"]]
    print(f"big layer: {layer['size'] / 1e9:.3f} GB gzip -{GZIP_LEVEL}, "
          f"{layer['uncompressed'] / 1e9:.3f} GB uncompressed "
          f"({layer['uncompressed'] / layer['size']:.2f}:1), {layer['files']} files of {what} "
          "(+ 3 small CUDA-like layers)")
    print(f"{'':<13}{'wall s':>9}{'CPU s':>8}{'+ server':>10}{'peak RSS MB':>13}"
          f"{'× envcheck':>12}")
    mine = next(r for r in result["rows"] if r["name"] == "envcheck")
    for row in result["rows"]:
        if failure(row):
            print(f"{row['name']:<13}  {failure(row)}")
            continue
        print(f"{row['name']:<13}{row['wall_s']:>9.2f}{row['cpu_s']:>8.2f}"
              f"{row['server_cpu_s']:>10.2f}{row['peak_rss_bytes'] / 1e6:>13.0f}"
              f"{row['wall_s'] / mine['wall_s']:>12.2f}")
    r = result["ratios"]
    print(f"floor: {result['floor']}, the fastest download + verify of the blob in this run")
    print(f"envcheck / floor: fastest / fastest = {r['envcheck_over_floor']:.2f}; median of the "
          f"{len(mine['runs_s'])} rounds' ratios = {r['envcheck_over_floor_paired_median']:.2f} "
          f"(rounds: {', '.join(f'{x:.2f}' for x in r['envcheck_over_floor_rounds'])})")
    print(f"machine bound: inflate+hash / floor = {r['bound_over_floor']:.2f}; envcheck / "
          f"inflate+hash = {r['envcheck_over_bound']:.2f}")
    print(f"ratios: gzip|tar / envcheck = "
          f"{r['gzip_tar_over_envcheck']:.2f}; inflate on one core / floor = "
          f"{r['inflate_over_floor']:.2f}; envcheck / inflate on one core = "
          f"{r['envcheck_over_inflate']:.2f}; two big layers, --jobs 1 / --jobs 2 = "
          f"{r['two_layers_j1_over_j2']:.2f}")
    b = result["bounds"]
    print(f"CPU bound: envcheck's work is {b['envcheck_cpu_s']:.2f} CPU s with the registry's; on "
          f"{b['cores']} cores it cannot take less than {b['envcheck_least_wall_s']:.2f} s = "
          f"{b['least_over_floor']:.2f}× the floor")
    print_goals(result["goals"])


def fresh_workdir(workdir: Path) -> None:
    """`workdir`, made if missing, without what an earlier run left (its layout, registry and
    copies); what the run makes stays there (bench_saved reads `layout`, tag `bench`)."""
    workdir.mkdir(parents=True, exist_ok=True)
    for stale in ("layout", "registry-root", "skopeo-out", "big.tar.gz"):
        path = workdir / stale
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gigabytes", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=5, help="runs per row; the fastest is kept")
    parser.add_argument("--workdir", type=Path,
                        help="make the image here and keep it (default: a temp dir, removed)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--content", choices=("cuda", "host"), default="cuda",
                        help="what the big layer holds: the image's own cuBLAS and cuDNN "
                             "libraries (pip-downloaded once; the default) or pieces of this "
                             "machine's shared libraries (offline)")
    parser.add_argument("--wheel-cache", type=Path,
                        default=Path.home() / ".cache/envcheck/bench-wheels")
    args = parser.parse_args()
    for tool in ("curl", "skopeo", "docker-registry", "gzip", "tar", "time"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed: scripts/install_system_packages.sh {tool}")
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="bench-inspect-")))
        fresh_workdir(workdir)
        result = run(workdir, args.gigabytes, max(1, args.repeat), args.content,
                     args.wheel_cache)
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
