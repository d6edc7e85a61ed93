"""The benchmark tables: a run that failed is never shown, or counted, as a time."""

from __future__ import annotations

import io

from scripts import bench_inspect
from scripts.benchlib import failure


def row(name: str, wall_s: float, rc: int = 0, error: str = "") -> dict:
    return {"name": name, "wall_s": wall_s, "runs_s": [wall_s], "cpu_s": wall_s,
            "server_cpu_s": 0.0, "peak_rss_bytes": 50e6, "rc": rc, "error": error}


def test_a_failed_row_says_so():
    assert failure(row("floor", 3.0)) is None
    assert failure(row("skopeo copy", 11.1, 1, "x\nlevel=fatal msg=\"invalid tar header\"\n")) \
        == 'FAILED (rc 1) level=fatal msg="invalid tar header"'
    assert failure({"name": "docker save", "error": "no engine"}) == "FAILED (rc ?) no engine"


def test_no_goal_is_met_on_a_failed_run():
    """envcheck failing fast (0.3 s) would otherwise meet every speed goal."""
    rows = [row("floor sha256sum", 3.0), row("envcheck", 0.3, 2, "Error: …"), row("inflate", 3.2),
            row("inflate+hash", 3.3), row("gzip|tar", 13.0), row("2 big, -j1", 7.0),
            row("2 big, -j2", 6.5)]
    goals = bench_inspect.summarize(rows, {})["goals"]
    assert goals and not any(goals.values())
    assert all("envcheck failed" in goal for goal in goals)
    rows[1] = row("envcheck", 3.2)
    assert all(bench_inspect.summarize(rows, {})["goals"].values())


def test_the_floor_is_the_fastest_download_and_verify_of_the_run():
    """Whichever hashing tool is fastest on the machine is the floor (coreutils' sha256sum ran
    4x slower than OpenSSL on one VM: a floor of it alone made the goal depend on the tool);
    each round's ratio is taken against that round's fastest floor."""
    floors = [dict(row("floor sha256sum", 5.0), runs_s=[5.0, 5.2]),
              dict(row("floor openssl", 3.1), runs_s=[3.1, 3.3]),
              dict(row("floor hashlib", 3.2), runs_s=[3.4, 3.2])]
    rows = floors + [dict(row("envcheck", 3.4), runs_s=[3.4, 3.52]), row("inflate", 3.0),
                     row("inflate+hash", 3.1), row("gzip|tar", 13.0), row("2 big, -j1", 7.0),
                     row("2 big, -j2", 6.5)]
    result = bench_inspect.summarize(rows, {})
    assert result["floor"] == "floor openssl"
    assert round(result["ratios"]["envcheck_over_floor"], 3) == round(3.4 / 3.1, 3)
    assert [round(x, 3) for x in result["ratios"]["envcheck_over_floor_rounds"]] == [
        round(3.4 / 3.1, 3), round(3.52 / 3.2, 3)]
    assert all(result["goals"].values())
    assert [name for name, *_ in bench_inspect.floor_rows("http://x/blob", 1)] == list(
        bench_inspect.FLOOR_ROWS)


def test_the_kept_layout_holds_both_bench_images(tmp_path):
    """bench_saved reads `--workdir DIR`'s layout, tag `bench`: it is kept, holds the big layer
    once (tag `bench2` twice), and a second run starts from a clean workdir."""
    from envcheck.image.inspect import inspect_image
    from scripts import cuda_image

    workdir = tmp_path / "work"
    bench_inspect.fresh_workdir(workdir)
    built = cuda_image.build_layout(workdir / "layout", tag="bench")
    files = ((f"opt/big/{n}", 3000, lambda n=n: io.BytesIO(bytes([n]) * 3000)) for n in range(8))
    big = bench_inspect.big_layer(workdir / "big.tar.gz", 1, files)
    blob = workdir / "layout/blobs/sha256" / big["digest"].split(":")[1]
    (workdir / "big.tar.gz").rename(blob)
    bench_inspect.extend_manifest(workdir / "layout", built, big)
    bench_inspect.add_big_layer_again(workdir / "layout", big)
    for tag, bigs in (("bench", 1), ("bench2", 2)):
        report = inspect_image(f"oci:{workdir / 'layout'}:{tag}", jobs=1)
        digests = [layer.digest for layer in report.layers]
        assert len(digests) == len(built["layers"]) + bigs and digests.count(big["digest"]) == bigs
        assert {c.id: c.status for c in report.checks}["image.diff-ids"] == "pass"
    (workdir / "registry-root").mkdir()
    bench_inspect.fresh_workdir(workdir)
    assert list(workdir.iterdir()) == []
