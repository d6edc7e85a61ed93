"""`envcheck inspect-image` against real components: a CUDA-like image (real ELF libraries, an
ld.so.cache made by the real ldconfig) in an OCI layout, pushed to a real docker-registry by
skopeo, saved as a docker archive by skopeo. Oracles: skopeo inspect (digests, config), the
layers' uncompressed sha256 computed by gzip -dc | sha256sum."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import posixpath
import pty
import shutil
import subprocess
import sys

import pytest

from envcheck.image.sources import REF_NAME
from scripts import cuda_image
from tests.integration.conftest import require_binary, run_as_nobody, skopeo, start_registry


def envcheck(*args: str, env=None, no_files: bool = False):
    """`envcheck inspect-image ARGS`; no_files: it may write no file at all (RLIMIT_FSIZE 0: a
    write fails with EFBIG), so a report proves nothing went to disk."""
    limit = ["bash", "-c", 'ulimit -f 0 && exec "$@"', "bash"] if no_files else []
    done = subprocess.run([*limit, sys.executable, "-m", "envcheck", "inspect-image", *args],
                          capture_output=True, text=True, timeout=300, check=False, env=env)
    assert "Traceback" not in done.stderr, done.stderr
    return done


def inspect_json(*args: str) -> dict:
    done = envcheck(*args, "--json")
    assert done.returncode in (0, 1), done.stderr
    return json.loads(done.stdout)


def one_line_error(done, code: int, *fragments: str) -> None:
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), done.stderr
    assert done.stdout == ""
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def sha256_of_gunzip(path) -> str:
    """The oracle for a diff_id: `gzip -dc BLOB | sha256sum`."""
    done = subprocess.run(["bash", "-o", "pipefail", "-c", f"gzip -dc {path} | sha256sum"],
                          capture_output=True, text=True, check=True)
    return "sha256:" + done.stdout.split()[0]


def test_oci_layout_digests_equal_skopeo_and_sha256sum(cuda_layout):
    layout, built = cuda_layout
    ref = f"oci:{layout}:12.8.0-cudnn-devel"
    report = inspect_json(ref)
    raw_manifest = skopeo("inspect", "--raw", ref).encode()
    raw_config = skopeo("inspect", "--config", "--raw", ref).encode()
    assert report["manifest"]["digest"] == "sha256:" + hashlib.sha256(raw_manifest).hexdigest()
    assert report["config"]["digest"] == "sha256:" + hashlib.sha256(raw_config).hexdigest()
    diff_ids = [layer["diff_id"] for layer in report["layers"]]
    assert diff_ids == json.loads(raw_config)["rootfs"]["diff_ids"] == built["diff_ids"]
    for layer in report["layers"]:
        blob = layout / "blobs" / "sha256" / layer["digest"].split(":")[1]
        assert sha256_of_gunzip(blob) == layer["diff_id"]
    assert report["verdict"] == "ok"


def test_registry_image_matches_skopeo(pushed):
    report = inspect_json(pushed, "--driver-version", "570.124.06")
    seen = json.loads(skopeo("inspect", "--tls-verify=false", f"docker://{pushed}"))
    assert report["manifest"]["digest"] == seen["Digest"]
    assert [layer["digest"] for layer in report["layers"]] == seen["Layers"]
    assert report["env"]["LD_LIBRARY_PATH"] == "/usr/local/nvidia/lib:/usr/local/nvidia/lib64"
    assert report["env"]["CUDA_VERSION"] == "12.8.0"
    assert report["labels"]["com.nvidia.cudnn.version"] == "9.7.0.66-1"
    assert report["entrypoint"] == ["/opt/nvidia/nvidia_entrypoint.sh"]
    checks = {c["id"]: c for c in report["checks"]}
    assert checks["image.diff-ids"]["status"] == "pass"
    assert checks["image.requirement"]["status"] == "pass"
    assert report["cuda"]["packages"]["cudnn"] == {"package": "libcudnn9-cuda-12",
                                                   "version": "9.7.0.66-1"}
    assert report["cuda"]["libraries"]["cudart"] == "12.8.57"
    assert report["cuda"]["libraries"]["compat_libcuda"] == "570.124.06"
    libraries = {lib["soname"]: lib for lib in report["libraries"]}
    assert libraries["libcuda.so.1"]["resolves_to"] is None
    assert libraries["libcudart.so.12"]["via"] == "ld.so.cache"
    assert libraries["libcudnn.so.9"]["resolves_to"] == "/usr/lib/x86_64-linux-gnu/libcudnn.so.9"
    assert report["cuda"]["stubs"] == [f"/{cuda_image.CUDA_LIB}/stubs/libcuda.so"]
    # one compat libcuda, by its real path, not once more through the /usr/local/cuda symlink
    assert report["cuda"]["compat"] == ["/usr/local/cuda-12.8/compat/libcuda.so.570.124.06"]


def test_layers_several_at_a_time_give_the_same_report(pushed, cuda_layout, tmp_path):
    """--jobs 3 (layers streamed concurrently, one registry session) and --jobs 1 agree, from
    the registry, the OCI layout and a docker save archive (a file handle per layer)."""
    layout, _ = cuda_layout
    archive = tmp_path / "cuda.tar"
    skopeo("copy", f"oci:{layout}:12.8.0-cudnn-devel", f"docker-archive:{archive}:cuda:test")
    for ref in (pushed, f"oci:{layout}", f"docker-archive:{archive}"):
        one = inspect_json(ref, "--driver-version", "570.124.06", "--jobs", "1")
        many = inspect_json(ref, "--driver-version", "570.124.06", "--jobs", "3")
        assert many == one


def test_requirement_verdicts_for_old_drivers(pushed):
    refused = inspect_json(pushed, "--no-layers", "--driver-version", "520.61.05")
    check = next(c for c in refused["checks"] if c["id"] == "image.requirement")
    assert check["status"] == "fail" and "unsatisfied condition: cuda>=12.8" in check["summary"]
    assert refused["requirement"]["cases"][0] == {
        "constraints": "cuda>=12.8", "needs": "driver >= 570.26 (CUDA 12.8)"}
    assert len(refused["requirement"]["cases"]) == 61
    branch = inspect_json(pushed, "--driver-version", "550.54.15")
    assert branch["requirement"]["toolkit_starts"] is None
    assert "tesla" in branch["requirement"]["brands"]
    assert "minor-version compatibility" in branch["requirement"]["how"]


def test_merged_view_applies_whiteouts_and_opaque_dirs(cuda_layout):
    layout, _ = cuda_layout
    globs = ("--files", "etc/removed.conf", "--files", "opt/old/*", "--files", "usr/local/cuda",
             "--files", "/opt/old/new.txt")
    report = inspect_json(f"oci:{layout}", *globs)
    rows = {row["path"]: row for row in report["files"]}
    assert len(rows) == len(report["files"])  # a path two globs match is listed once
    assert "/etc/removed.conf" not in rows and "/opt/old/hidden.txt" not in rows
    assert report["files_unmatched"] == ["etc/removed.conf"]
    text = envcheck(f"oci:{layout}", *globs).stdout
    assert "file      etc/removed.conf: no match in the merged filesystem\n" in text
    assert rows["/opt/old/new.txt"]["layer"] == 2
    assert rows["/usr/local/cuda"]["kind"] == "symlink" and rows["/usr/local/cuda"]["link"] == \
        "cuda-12.8"


def test_docker_archive_from_skopeo(cuda_layout, tmp_path):
    layout, built = cuda_layout
    archive = tmp_path / "cuda.tar"
    skopeo("copy", f"oci:{layout}:12.8.0-cudnn-devel", f"docker-archive:{archive}:cuda:test")
    report = inspect_json(f"docker-archive:{archive}")
    assert report["config"]["digest"] == built["config_digest"]
    assert [layer["diff_id"] for layer in report["layers"]] == built["diff_ids"]
    assert {c["id"]: c["status"] for c in report["checks"]}["image.diff-ids"] == "pass"


def test_docker_archive_cut_inside_a_layer(cuda_layout, tmp_path):
    """A `docker save` copied only in part (tarfile finds the member that runs past the end
    while it reads the index): one line, exit 2."""
    import tarfile

    layout, _ = cuda_layout
    archive = tmp_path / "cut.tar"
    skopeo("copy", f"oci:{layout}:12.8.0-cudnn-devel", f"docker-archive:{archive}:cuda:test")
    with tarfile.open(archive) as tar:
        biggest = max(tar.getmembers(), key=lambda m: m.size)
        cut_at = biggest.offset_data + biggest.size // 2
    with archive.open("r+b") as handle:
        handle.truncate(cut_at)
    one_line_error(envcheck(f"docker-archive:{archive}", "--jobs", "2"), 2,
                   "cut short? save it again")


def test_zstd_layers_through_the_registry(registry, tmp_path):
    layout = tmp_path / "zstd"
    built = cuda_image.build_layout(layout, tag="zstd", compression="zstd")
    ref = f"{registry.host}/cuda-zstd:latest"
    skopeo("copy", "--dest-tls-verify=false", f"oci:{layout}:zstd", f"docker://{ref}")
    report = inspect_json(ref)
    assert {layer["compression"] for layer in report["layers"]} == {"zstd"}
    assert [layer["diff_id"] for layer in report["layers"]] == built["diff_ids"]


def test_zstd_chunked_layers_whose_diff_ids_do_not_match(tmp_path):
    """skopeo's zstd:chunked writer re-writes each layer's tar but keeps the config's diff_ids
    (containers/storage#1771): envcheck reports the digests `zstd -dc | sha256sum` gives, fails
    the diff-ids check, and names zstd:chunked as the cause."""
    require_binary("zstd")
    source, chunked = tmp_path / "source", tmp_path / "chunked"
    cuda_image.build_layout(source, tag="t")
    skopeo("copy", "--dest-compress", "--dest-compress-format", "zstd:chunked",
           f"oci:{source}:t", f"oci:{chunked}:t")
    done = envcheck(f"oci:{chunked}:t", "--json")
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    for layer in report["layers"]:
        blob = chunked / "blobs" / "sha256" / layer["digest"].split(":")[1]
        oracle = subprocess.run(["bash", "-o", "pipefail", "-c", f"zstd -dc {blob} | sha256sum"],
                                capture_output=True, text=True, check=True).stdout.split()[0]
        assert layer["compression"] == "zstd" and layer["diff_id"] == f"sha256:{oracle}"
    check = next(c for c in report["checks"] if c["id"] == "image.diff-ids")
    assert check["status"] == "fail" and "zstd:chunked" in check["fix"]


def test_multi_arch_index_and_platform_choice(registry, tmp_path):
    layout = tmp_path / "multi"
    built = cuda_image.build_multiarch(layout)
    ref = f"{registry.host}/cuda-multi:latest"
    skopeo("copy", "--all", "--dest-tls-verify=false", f"oci:{layout}:multi", f"docker://{ref}")
    amd64 = inspect_json(ref, "--platform", "linux/amd64", "--no-layers")
    arm64 = inspect_json(ref, "--platform", "linux/arm64")
    raw_index = skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{ref}").encode()
    assert amd64["index_digest"] == arm64["index_digest"] == \
        "sha256:" + hashlib.sha256(raw_index).hexdigest() == built["index_digest"]
    assert amd64["manifest"]["digest"] == built["amd64"]["manifest_digest"]
    assert arm64["manifest"]["digest"] == built["arm64"]["manifest_digest"]
    assert arm64["config"]["platform"] == "linux/arm64"
    missing = envcheck(ref, "--platform", "linux/s390x")
    one_line_error(missing, 1, "no manifest for platform linux/s390x",
                   "linux/amd64, linux/arm64")


def test_platform_of_a_single_platform_image(cuda_layout):
    """No index to choose from: the one image must be the platform asked for (docker run's
    rule), or the report would describe another platform than the one asked about. Layers
    not read say so (they read "-, None files")."""
    layout, built = cuda_layout
    ref = f"oci:{layout}:12.8.0-cudnn-devel"
    own = inspect_json(ref, "--no-layers")["config"]["platform"]
    other = "linux/s390x" if own != "linux/s390x" else "linux/amd64"
    assert inspect_json(ref, "--platform", own.upper(), "--no-layers")["manifest"]["digest"] \
        == built["manifest_digest"]
    one_line_error(envcheck(ref, "--platform", other, "--no-layers"), 1,
                   f"the image is {own} only (one manifest, no index), not {other}")
    text = envcheck(ref, "--platform", own, "--no-layers").stdout
    assert text.count(" gzip  → not read (--no-layers)") == len(built["layers"])  # media type's
    assert "None" not in text
    for args, fragment in ((("--platform", "bogus"), "'bogus' is not OS/ARCH"),
                           (("--no-layers", "--files", "etc/*"), "--files lists the layers'")):
        done = envcheck(ref, *args)
        assert done.returncode == 2 and done.stdout == "" and fragment in done.stderr


def test_oci_layout_holding_several_images(cuda_layout, tmp_path):
    """Several tagged images need a tag (as in skopeo), and a tag not there is an error; an
    untagged image is named by no tag (a tag used to take it, whatever the tag); untagged
    entries, one per platform, are an index to choose the platform from."""
    layout, built = cuda_layout
    copy = tmp_path / "two-tags"
    shutil.copytree(layout, copy)
    index = json.loads((copy / "index.json").read_text())
    index["manifests"].append(dict(index["manifests"][0], annotations={
        "org.opencontainers.image.ref.name": "second"}))
    (copy / "index.json").write_text(json.dumps(index))
    one_line_error(envcheck(f"oci:{copy}", "--no-layers"), 1, "the layout holds 2 images (tags: "
                   f"12.8.0-cudnn-devel, second): name one, as oci:{copy}:12.8.0-cudnn-devel")
    assert inspect_json(f"oci:{copy}:second", "--no-layers")["manifest"]["digest"] == \
        built["manifest_digest"]
    one_line_error(envcheck(f"oci:{layout}:v2", "--no-layers"), 1,
                   "no manifest tagged 'v2' (tags: 12.8.0-cudnn-devel)")  # it took that one
    index["manifests"] = [{k: v for k, v in index["manifests"][0].items() if k != "annotations"}]
    (copy / "index.json").write_text(json.dumps(index))
    one_line_error(envcheck(f"oci:{copy}:v2", "--no-layers"), 1, "no manifest tagged 'v2' "
                   f"(tags: none; 1 untagged, named by no tag: oci:{copy})")
    assert inspect_json(f"oci:{copy}", "--no-layers")["manifest"]["digest"] == \
        built["manifest_digest"]
    index["manifests"][0]["annotations"] = {REF_NAME: 7}  # no string: no tag (was a TypeError)
    (copy / "index.json").write_text(json.dumps(index))
    one_line_error(envcheck(f"oci:{copy}:v2", "--no-layers"), 1, "(tags: none; 1 untagged")
    multi = tmp_path / "per-platform"
    arches = cuda_image.build_multiarch(multi)
    # index.json lists the platforms' manifests itself (no nested index, no tags)
    shutil.copy(multi / "blobs/sha256" / arches["index_digest"][7:], multi / "index.json")
    for arch in ("amd64", "arm64"):
        report = inspect_json(f"oci:{multi}", "--platform", f"linux/{arch}", "--no-layers")
        assert report["manifest"]["digest"] == arches[arch]["manifest_digest"]
        assert report["index_digest"] is None
    one_line_error(envcheck(f"oci:{multi}", "--platform", "linux/s390x"), 1,
                   "no manifest for platform linux/s390x (available: linux/amd64, linux/arm64)")


def test_oci_references_end_the_path_at_the_first_colon(cuda_layout, tmp_path):
    """As skopeo reads oci:DIR[:REF]: a ref name may hold colons and slashes; a layout whose
    path holds a colon cannot be named (it used to be, as far as the last colon), and the error
    says so. skopeo is the oracle for the digest."""
    layout, built = cuda_layout
    named = tmp_path / "named"
    shutil.copytree(layout, named)
    index = json.loads((named / "index.json").read_text())
    index["manifests"][0]["annotations"] = {REF_NAME: "example.com/cuda:12.8.0-cudnn-devel"}
    (named / "index.json").write_text(json.dumps(index))
    ref = f"oci:{named}:example.com/cuda:12.8.0-cudnn-devel"
    raw = skopeo("inspect", "--raw", ref)
    assert inspect_json(ref, "--no-layers")["manifest"]["digest"] == \
        "sha256:" + hashlib.sha256(raw.encode()).hexdigest() == built["manifest_digest"]
    colon = tmp_path / "a:b"
    shutil.copytree(layout, colon / "layout")
    one_line_error(envcheck(f"oci:{colon}/layout:12.8.0-cudnn-devel"), 2,
                   f"{colon}/layout: the path of an oci: reference ends at its first colon (as "
                   "in skopeo); name the layout by a path without one")
    one_line_error(envcheck(f"oci:{named}:no such"), 2, "'no such' is no OCI ref name")


def test_unknown_reference_syntax_is_a_usage_error():
    one_line_error(envcheck("ftp://example/x"), 2, "unknown transport")
    one_line_error(envcheck("Not/A/Valid:Ref"), 2, "not an image reference")


def test_missing_image_in_the_registry(registry):
    one_line_error(envcheck(f"{registry.host}/nothing/here:1"), 1, "404 not found",
                   f"{registry.host}/nothing/here:1")


def test_missing_local_inputs(tmp_path):
    one_line_error(envcheck(f"oci:{tmp_path}"), 2, "not an OCI image layout")
    one_line_error(envcheck(f"docker-archive:{tmp_path}/none.tar"), 2, "no such file")


@pytest.fixture
def saved(cuda_layout, tmp_path):
    """A `docker save` archive of the CUDA-like image (skopeo writes it) and its report."""
    layout, _ = cuda_layout
    archive = tmp_path / "cuda.tar"
    skopeo("copy", f"oci:{layout}:12.8.0-cudnn-devel", f"docker-archive:{archive}:cuda:test")
    return archive, inspect_json(f"docker-archive:{archive}", "--driver-version", "570.124.06")


def with_tmpdir(tmp_path):
    temp = tmp_path / "tmpdir"
    temp.mkdir(exist_ok=True)
    return temp, {**os.environ, "TMPDIR": str(temp)}


@pytest.mark.parametrize("tool, suffix", [("gzip", "gz"), ("zstd", "zst")])
def test_compressed_docker_archive(saved, tmp_path, tool, suffix):
    """`docker save IMAGE | gzip` (or zstd), as CI pipelines keep images: read in one pass
    as it decompresses, writing no file (docker load and skopeo need a temp copy; envcheck
    did too): the plain archive's report, also with --no-layers."""
    archive, plain = saved
    packed = tmp_path / f"cuda.tar.{suffix}"
    subprocess.run(f"{tool} -c {archive} > {packed}", shell=True, check=True)
    done = envcheck(f"docker-archive:{packed}", "--json", "--driver-version", "570.124.06",
                    no_files=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.replace(str(packed), str(archive))) == plain
    brief = [envcheck(f"docker-archive:{path}", "--no-layers", no_files=True).stdout
             for path in (archive, packed)]
    assert brief[1].replace(str(packed), str(archive)) == brief[0] and "layers    " in brief[0]


def test_compressed_docker_archive_that_is_cut_short_or_no_archive(saved, tmp_path):
    """A .tar.gz copied only in part, and a gzip of something that is no tar: one line, exit
    2, and nothing left in TMPDIR."""
    archive, _ = saved
    packed = tmp_path / "cut.tar.gz"
    whole = gzip.compress(archive.read_bytes(), compresslevel=1)
    packed.write_bytes(whole[: len(whole) // 2])
    temp, env = with_tmpdir(tmp_path)
    one_line_error(envcheck(f"docker-archive:{packed}", env=env), 2,
                   f"{packed}: truncated gzip stream", "save it again")
    other = tmp_path / "notes.txt.gz"
    other.write_bytes(gzip.compress(b"not a tar at all\n" * 1000))
    one_line_error(envcheck(f"docker-archive:{other}", env=env), 2,
                   f"{other}: not a docker save archive")
    assert list(temp.iterdir()) == []


def test_compressed_oci_style_archive_with_a_corrupted_layer(cuda_layout, tmp_path):
    """Docker ≥ 25's archive (blobs/sha256/…), gzipped: each layer's digest, promised by its
    name, is checked as it streams past; the report equals the plain archive's, and a
    corrupted layer is one line naming that blob, exit 1, never a report."""
    import tarfile

    layout, built = cuda_layout
    layers = ["blobs/sha256/" + layer["digest"].split(":")[1] for layer in built["layers"]]
    manifest = json.dumps([{"Config": "blobs/sha256/" + built["config_digest"].split(":")[1],
                            "RepoTags": ["cuda:oci-style"], "Layers": layers}]).encode()

    def saved_as(name: str, spoil: str | None = None):
        plain = tmp_path / f"{name}.tar"
        with tarfile.open(plain, "w") as tar:
            for blob in sorted((layout / "blobs" / "sha256").iterdir()):
                data = bytearray(blob.read_bytes())
                if f"blobs/sha256/{blob.name}" == spoil:
                    data[4] ^= 0xFF  # the gzip header's mtime: it still inflates, to other bytes
                info = tarfile.TarInfo(f"blobs/sha256/{blob.name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(bytes(data)))
            info = tarfile.TarInfo("manifest.json")
            info.size = len(manifest)
            tar.addfile(info, io.BytesIO(manifest))
        packed = tmp_path / f"{name}.tar.gz"
        packed.write_bytes(gzip.compress(plain.read_bytes(), compresslevel=1))
        return plain, packed

    plain, packed = saved_as("oci-style")
    report = inspect_json(f"docker-archive:{packed}")
    assert report == json.loads(json.dumps(inspect_json(f"docker-archive:{plain}")).replace(
        str(plain), str(packed)))
    assert [layer["digest"] for layer in report["layers"]] == [
        layer["digest"] for layer in built["layers"]]
    _, spoilt = saved_as("spoilt", spoil=layers[2])
    one_line_error(envcheck(f"docker-archive:{spoilt}"), 1, f"{layers[2]} (sha256:",
                   "does not match")


def test_progress_on_a_terminal(saved, tmp_path):
    """On a terminal (stderr a pty) the pass through a compressed archive gets a progress bar;
    the report itself (stdout) is the same as without one."""
    archive, _ = saved
    packed = tmp_path / "cuda.tar.gz"
    packed.write_bytes(gzip.compress(archive.read_bytes(), compresslevel=1))
    master, slave = pty.openpty()
    with subprocess.Popen([sys.executable, "-m", "envcheck", "inspect-image",
                           f"docker-archive:{packed}"], stdout=subprocess.DEVNULL,
                          stderr=slave, env={**os.environ, "TERM": "xterm"}) as child:
        os.close(slave)
        shown = b""
        while True:
            try:
                piece = os.read(master, 1 << 16)
            except OSError:  # EIO: the child closed its end
                break
            if not piece:
                break
            shown += piece
        os.close(master)
    text = shown.decode(errors="replace")
    assert child.returncode == 0, text
    assert "reading cuda.tar.gz" in text, text


def test_corrupted_blob_is_never_reported(cuda_layout, tmp_path):
    layout, built = cuda_layout
    copy = tmp_path / "corrupt"
    shutil.copytree(layout, copy)
    blob = copy / "blobs" / "sha256" / built["layers"][1]["digest"].split(":")[1]
    data = bytearray(blob.read_bytes())
    data[-20] ^= 0xFF  # inside the gzip trailer region: decompression or the digest must catch it
    blob.write_bytes(bytes(data))
    done = envcheck(f"oci:{copy}")
    one_line_error(done, 1, "layer 1")


def test_truncated_gzip_layer(cuda_layout, tmp_path):
    layout, built = cuda_layout
    copy = tmp_path / "truncated"
    shutil.copytree(layout, copy)
    blob = copy / "blobs" / "sha256" / built["layers"][0]["digest"].split(":")[1]
    blob.write_bytes(blob.read_bytes()[: blob.stat().st_size // 2])
    one_line_error(envcheck(f"oci:{copy}"), 1, "layer 0")


def test_layer_with_parent_paths_is_refused(tmp_path):
    import io
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("../../etc/evil")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    cuda_image.write_image(tmp_path / "evil", "x", [buffer.getvalue()], ["ADD evil /"], "gzip",
                           "amd64")
    one_line_error(envcheck(f"oci:{tmp_path / 'evil'}:x"), 1, "escapes the image root")


def test_malformed_ld_so_cache_is_a_failed_check(tmp_path):
    import io
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        data = b"glibc-ld.so.cache1.1" + b"\xff" * 40
        info = tarfile.TarInfo("etc/ld.so.cache")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    cuda_image.write_image(tmp_path / "badcache", "x", [buffer.getvalue()], ["ADD x /"], "gzip",
                           "amd64")
    done = envcheck(f"oci:{tmp_path / 'badcache'}:x")
    assert done.returncode == 1
    assert "FAIL image.ldcache" in done.stdout and "malformed" in done.stdout


@pytest.fixture
def auth_registry(tmp_path):
    """A second registry behind htpasswd (Basic) auth, user envcheck / a planted secret."""
    secrets = tmp_path / "htpasswd"
    subprocess.run([require_binary("htpasswd"), "-Bbc", str(secrets), "envcheck",
                    "s3cret-planted"], check=True, capture_output=True)
    server = start_registry(tmp_path, htpasswd=secrets)
    yield server
    server.stop()


def isolated_env(home) -> dict:
    return {"PATH": "/usr/bin:/bin", "HOME": str(home), "DOCKER_CONFIG": str(home)}


def test_registry_401_without_credentials(auth_registry, tmp_path):
    done = envcheck(f"{auth_registry.host}/private/cuda:1", env=isolated_env(tmp_path))
    one_line_error(done, 1, "401 unauthorized", "docker login")


def test_registry_basic_auth_with_docker_config(auth_registry, tmp_path, cuda_layout):
    import base64

    layout, _ = cuda_layout
    ref = f"{auth_registry.host}/private/cuda:1"
    skopeo("copy", "--dest-tls-verify=false", "--dest-creds", "envcheck:s3cret-planted",
           f"oci:{layout}:12.8.0-cudnn-devel", f"docker://{ref}")
    auth = base64.b64encode(b"envcheck:s3cret-planted").decode()
    (tmp_path / "config.json").write_text(json.dumps({"auths": {auth_registry.host:
                                                                {"auth": auth}}}))
    done = envcheck(ref, "--json", env=isolated_env(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "s3cret-planted" not in done.stdout + done.stderr
    assert json.loads(done.stdout)["verdict"] == "ok"


def test_docker_daemon_source(engine, cuda_layout, monkeypatch, tmp_path):
    """Digests equal the daemon's, read in one pass from `docker save` without writing a file
    (it went to a temp file before); a missing image is one line."""
    import os

    import docker


    layout, built = cuda_layout
    skopeo("copy", "--dest-daemon-host", engine, f"oci:{layout}:12.8.0-cudnn-devel",
           "docker-daemon:envcheck-test/cuda:daemon")
    try:
        done = envcheck("docker-daemon:envcheck-test/cuda:daemon", "--json",
                        env={**os.environ, "DOCKER_HOST": engine}, no_files=True)
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        image = docker.DockerClient(base_url=engine).images.get("envcheck-test/cuda:daemon")
        assert report["config"]["digest"] == image.id == built["config_digest"]
        assert [layer["diff_id"] for layer in report["layers"]] == built["diff_ids"]
        for image_id in (image.id, image.id[7:19]):  # whole, and as `docker images` shows it
            done = envcheck(f"docker-daemon:{image_id}", "--json", "--no-layers",
                            env={**os.environ, "DOCKER_HOST": engine})
            assert json.loads(done.stdout)["config"]["digest"] == built["config_digest"]
        missing = envcheck("docker-daemon:envcheck-test/none:x",
                           env={**os.environ, "DOCKER_HOST": engine})
        one_line_error(missing, 1, "no such image in the daemon")
    finally:
        docker.DockerClient(base_url=engine).images.remove("envcheck-test/cuda:daemon",
                                                           force=True)


def test_docker_archive_of_two_images(engine, cuda_layout, tmp_path):
    """`docker save A B` (the real engine's): one image is chosen by a RepoTag, as written or
    as Docker normalises it, or by @N, in place and compressed; none chosen is one line
    naming both, as in skopeo."""
    import os

    import docker

    layout, built = cuda_layout
    arches = cuda_image.build_multiarch(tmp_path / "multi")
    skopeo("copy", "--dest-daemon-host", engine, f"oci:{layout}:12.8.0-cudnn-devel",
           "docker-daemon:envcheck-test/cuda:one")
    skopeo("copy", "--dest-daemon-host", engine, "--override-arch", "arm64",
           f"oci:{tmp_path / 'multi'}:multi", "docker-daemon:envcheck-test/small:arm64")
    archive = tmp_path / "two.tar"
    try:
        subprocess.run(["docker", "save", "-o", str(archive), "envcheck-test/cuda:one",
                        "envcheck-test/small:arm64"], check=True, capture_output=True,
                       env={**os.environ, "DOCKER_HOST": engine})
    finally:
        client = docker.DockerClient(base_url=engine)
        for name in ("envcheck-test/cuda:one", "envcheck-test/small:arm64"):
            client.images.remove(name, force=True)
    (tmp_path / "two.tar.gz").write_bytes(gzip.compress(archive.read_bytes(), 1))
    ref = f"docker-archive:{archive}"
    one_line_error(envcheck(ref), 1, "the archive holds 2 images (", "envcheck-test/cuda:one",
                   "envcheck-test/small:arm64", "name one, adding :NAME[:TAG] or :@N")
    for path in (archive, tmp_path / "two.tar.gz"):
        for chosen, image in (("envcheck-test/small:arm64", arches["arm64"]),
                              ("docker.io/envcheck-test/cuda:one", built)):
            report = inspect_json(f"docker-archive:{path}:{chosen}")
            assert report["config"]["digest"] == image["config_digest"]
            assert [layer["diff_id"] for layer in report["layers"]] == image["diff_ids"]
        assert {inspect_json(f"docker-archive:{path}:@{n}", "--no-layers")["config"]["digest"]
                for n in (0, 1)} == {built["config_digest"], arches["arm64"]["config_digest"]}
    one_line_error(envcheck(f"{ref}:@2"), 1, "no image @2: the archive holds 2", "@0 to @1")
    one_line_error(envcheck(f"{ref}:envcheck-test/cuda:two"), 1,
                   "no image tagged envcheck-test/cuda:two in the archive")


def test_daemon_not_running(tmp_path):
    import os

    done = envcheck("docker-daemon:x:y", env={**os.environ,
                                              "DOCKER_HOST": f"unix://{tmp_path}/none.sock"})
    one_line_error(done, 1, "the Docker daemon is not running at unix://")
    assert "DOCKER_HOST" in done.stderr


def test_daemon_socket_without_permission(engine):
    """inspect-image docker-daemon: as nobody against root's 0660 socket: the same words (and
    fix) as gpu-smoke's docker.reachable."""
    done = run_as_nobody(engine, "inspect-image", "docker-daemon:x:y")
    one_line_error(done, 1, "permission denied on the Docker socket")
    assert "docker group" in done.stderr


def test_oci_style_docker_archive(cuda_layout, tmp_path):
    """Docker ≥ 25 saves blobs/sha256/… plus index.json and manifest.json naming blob paths."""
    import tarfile

    layout, built = cuda_layout
    archive = tmp_path / "oci-style.tar"
    manifest = [{"Config": "blobs/sha256/" + built["config_digest"].split(":")[1],
                 "RepoTags": ["cuda:oci-style"],
                 "Layers": ["blobs/sha256/" + layer["digest"].split(":")[1]
                            for layer in built["layers"]]}]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with tarfile.open(archive, "w") as tar:
        for name in ("blobs", "index.json", "oci-layout"):
            tar.add(layout / name, arcname=name)
        tar.add(tmp_path / "manifest.json", arcname="manifest.json")
    report = inspect_json(f"docker-archive:{archive}")
    assert [layer["digest"] for layer in report["layers"]] == [
        layer["digest"] for layer in built["layers"]]
    assert [layer["diff_id"] for layer in report["layers"]] == built["diff_ids"]
    assert report["verdict"] == "ok"


def test_missing_blob_in_the_registry(registry, cuda_layout):
    """Push, then delete one layer blob through the registry API: the 404 on the blob is one
    line naming the blob, not a report."""
    import requests

    layout, built = cuda_layout
    ref = f"{registry.host}/broken/cuda:1"
    skopeo("copy", "--dest-tls-verify=false", f"oci:{layout}:12.8.0-cudnn-devel", f"docker://{ref}")
    digest = built["layers"][2]["digest"]
    deleted = requests.delete(f"http://{registry.host}/v2/broken/cuda/blobs/{digest}", timeout=10)
    assert deleted.status_code == 202
    one_line_error(envcheck(ref), 1, "404 not found", digest)


@pytest.mark.parametrize("mangle,fragment", [
    (lambda m: m.pop("layers"), "no layers list"),
    (lambda m: m["layers"].__setitem__(0, "not a descriptor"), "layer 0 is not a descriptor"),
    (lambda m: m.__setitem__("config", []), "no config descriptor"),
])
def test_malformed_manifest_is_one_error(cuda_layout, tmp_path, mangle, fragment):
    import hashlib as hashing

    layout, built = cuda_layout
    copy = tmp_path / "mangled"
    shutil.copytree(layout, copy)
    blobs = copy / "blobs" / "sha256"
    manifest = json.loads((blobs / built["manifest_digest"].split(":")[1]).read_text())
    mangle(manifest)
    data = json.dumps(manifest).encode()
    digest = hashing.sha256(data).hexdigest()
    (blobs / digest).write_bytes(data)
    index = json.loads((copy / "index.json").read_text())
    index["manifests"][0]["digest"] = f"sha256:{digest}"
    (copy / "index.json").write_text(json.dumps(index))
    one_line_error(envcheck(f"oci:{copy}"), 1, "malformed manifest", fragment)


def test_registry_credentials_from_a_credential_helper(auth_registry, tmp_path, cuda_layout):
    """credHelpers in the Docker config: envcheck runs `docker-credential-<name> get` with the
    registry on stdin (a real helper program on PATH) and never prints the secret."""
    layout, _ = cuda_layout
    ref = f"{auth_registry.host}/private/helper:1"
    skopeo("copy", "--dest-tls-verify=false", "--dest-creds", "envcheck:s3cret-planted",
           f"oci:{layout}:12.8.0-cudnn-devel", f"docker://{ref}")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    helper = bin_dir / "docker-credential-envchecktest"
    helper.write_text("#!/bin/sh\nread server\n"
                      f'[ "$server" = "{auth_registry.host}" ] || exit 1\n'
                      'echo \'{"Username": "envcheck", "Secret": "s3cret-planted"}\'\n')
    helper.chmod(0o755)
    (tmp_path / "config.json").write_text(json.dumps(
        {"credHelpers": {auth_registry.host: "envchecktest"}}))
    env = isolated_env(tmp_path) | {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    done = envcheck(ref, "--json", env=env)
    assert done.returncode == 0, done.stderr
    assert "s3cret-planted" not in done.stdout + done.stderr


def test_oci_layout_with_a_missing_blob(cuda_layout, tmp_path):
    layout, built = cuda_layout
    copy = tmp_path / "missing-blob"
    shutil.copytree(layout, copy)
    (copy / "blobs" / "sha256" / built["layers"][2]["digest"].split(":")[1]).unlink()
    one_line_error(envcheck(f"oci:{copy}"), 1, built["layers"][2]["digest"][:19])


def test_oci_index_entry_pointing_nowhere(cuda_layout, tmp_path):
    layout, _ = cuda_layout
    copy = tmp_path / "dangling-index"
    shutil.copytree(layout, copy)
    index = json.loads((copy / "index.json").read_text())
    nowhere = "sha256:" + "0" * 64
    for entry in index["manifests"]:
        entry["digest"] = nowhere
    (copy / "index.json").write_text(json.dumps(index))
    done = envcheck(f"oci:{copy}")
    assert done.returncode in (1, 2)
    one_line_error(done, done.returncode, nowhere[:19])


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_docker_archive_whose_layers_are_links(saved, tmp_path, link):
    """docker < 25 names every layer `<id>/layer.tar` in manifest.json and saves a layer it has
    already written as a symlink to the first copy. skopeo's archive has such symlinks
    (`<id>/layer.tar -> ../<digest>.tar`): naming them gives the report of the layers
    themselves; it read an empty layer from the link before (a false diff-id FAIL)."""
    import tarfile

    archive, plain = saved
    relinked = tmp_path / f"{link}.tar"
    with tarfile.open(archive) as source, tarfile.open(relinked, "w") as tar:
        links = {m.name: m for m in source.getmembers() if m.issym()}
        manifest = json.loads(source.extractfile("manifest.json").read())
        by_target = {posixpath.basename(m.linkname): name for name, m in links.items()}
        manifest[0]["Layers"] = [by_target[name] for name in manifest[0]["Layers"]]
        assert len(manifest[0]["Layers"]) == len(plain["layers"]) > 1
        for member in source.getmembers():
            if member.name == "manifest.json":
                body = json.dumps(manifest).encode()
                member.size = len(body)
                tar.addfile(member, io.BytesIO(body))
            elif member.issym() and link == "hardlink":
                member.type, member.linkname = tarfile.LNKTYPE, posixpath.basename(
                    member.linkname)
                tar.addfile(member)
            else:
                tar.addfile(member, source.extractfile(member) if member.isfile() else None)
    report = inspect_json(f"docker-archive:{relinked}", "--driver-version", "570.124.06")
    assert json.loads(json.dumps(report).replace(str(relinked), str(archive))) == plain
    assert report["verdict"] == "ok"


def test_docker_archive_with_a_missing_layer(cuda_layout, tmp_path):
    import tarfile

    layout, built = cuda_layout
    archive = tmp_path / "missing-layer.tar"
    layers = ["blobs/sha256/" + layer["digest"].split(":")[1] for layer in built["layers"]]
    manifest = [{"Config": "blobs/sha256/" + built["config_digest"].split(":")[1],
                 "RepoTags": ["cuda:broken"], "Layers": layers}]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with tarfile.open(archive, "w") as tar:
        tar.add(tmp_path / "manifest.json", arcname="manifest.json")
        for path in sorted((layout / "blobs" / "sha256").iterdir()):
            if f"blobs/sha256/{path.name}" != layers[1]:  # the second layer is left out
                tar.add(path, arcname=f"blobs/sha256/{path.name}")
    done = envcheck(f"docker-archive:{archive}")
    assert done.returncode in (1, 2)
    one_line_error(done, done.returncode, layers[1].split("/")[-1][:12])


def test_secret_env_and_history_are_redacted(tmp_path):
    import io
    import tarfile

    planted = "hf_pl4nted-s3cret"
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("etc/hostname")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"vm\n"))
    cuda_image.write_image(tmp_path / "secret", "x", [buffer.getvalue()],
                           [f"ENV HF_TOKEN={planted}"], "gzip", "amd64",
                           env=[f"HF_TOKEN={planted}", "PATH=/usr/bin", "CUDA_VERSION=12.8.0"])
    for args in ((), ("--json",)):
        done = envcheck(f"oci:{tmp_path / 'secret'}:x", *args)
        assert done.returncode in (0, 1), done.stderr
        assert planted not in done.stdout + done.stderr
        assert "<redacted>" in done.stdout


def test_wrong_password_is_never_echoed(auth_registry, tmp_path):
    import base64

    wrong = "wr0ng-pl4nted"
    auth = base64.b64encode(f"envcheck:{wrong}".encode()).decode()
    (tmp_path / "config.json").write_text(json.dumps({"auths": {auth_registry.host:
                                                                {"auth": auth}}}))
    done = envcheck(f"{auth_registry.host}/private/cuda:1", env=isolated_env(tmp_path))
    one_line_error(done, 1, "401 unauthorized")
    assert wrong not in done.stderr and auth not in done.stderr
