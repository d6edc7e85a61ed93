"""Image references, NVIDIA_REQUIRE_CUDA decoding and verdicts, dpkg/library version facts, and
the streaming layer reader on hand-made tar streams."""

from __future__ import annotations

import gzip
import io
import re
import tarfile

import pytest

from envcheck.image import cuda as image_cuda
from envcheck.image import filetree, layers, reference
from envcheck.image.blobstream import zstd_module
from envcheck.image.errors import LayerError
from envcheck.image.render import declared_compression
from envcheck.nvidia import cuda
from scripts.cuda_image import REQUIRE


@pytest.mark.parametrize("text,expected", [
    ("nvidia/cuda:12.8.0-cudnn-devel-ubuntu24.04",
     ("docker", "registry-1.docker.io", "nvidia/cuda", "12.8.0-cudnn-devel-ubuntu24.04")),
    ("ubuntu", ("docker", "registry-1.docker.io", "library/ubuntu", "latest")),
    ("docker://docker.io/library/ubuntu:24.04",
     ("docker", "registry-1.docker.io", "library/ubuntu", "24.04")),
    ("nvcr.io/nvidia/cuda:12.8.0-base-ubuntu24.04",
     ("docker", "nvcr.io", "nvidia/cuda", "12.8.0-base-ubuntu24.04")),
    ("localhost:5000/x:tag", ("docker", "localhost:5000", "x", "tag")),
    ("docker-daemon:envcheck-dev", ("docker-daemon", "", "envcheck-dev", "latest")),
    ("docker-daemon:d7e602f7f925", ("docker-daemon", "", "d7e602f7f925", None)),  # an image ID
    ("docker-daemon:sha256:" + "ab" * 32, ("docker-daemon", "", "sha256:" + "ab" * 32, None)),
    ("docker-daemon:d7e602f7f9", ("docker-daemon", "", "d7e602f7f9", "latest")),  # a name
])
def test_references(text, expected):
    ref = reference.parse(text)
    assert (ref.transport, ref.registry, ref.repository, ref.tag) == expected


def test_digest_references_and_paths():
    digest = "sha256:" + "ab" * 32
    ref = reference.parse(f"127.0.0.1:5000/a/b@{digest}")
    assert ref.digest == digest and ref.tag is None and ref.reference == digest
    assert reference.parse("oci:/tmp/dir:v1").path == "/tmp/dir"
    assert reference.parse("oci:/tmp/dir:v1").tag == "v1"
    assert reference.parse("docker-archive:/tmp/x.tar").path == "/tmp/x.tar"
    assert (reference.parse("oci:/tmp/dir:").path, reference.parse("oci:/tmp/dir:").tag) == (
        "/tmp/dir", None)  # an empty tag is no tag, as skopeo reads it

    # skopeo's oci:DIR[:REF]: the path ends at the first colon; a ref name may hold colons
    for text, path, tag in [("oci:/tmp/a:b/c", "/tmp/a", "b/c"),
                            ("oci:dir:example.com/app:v1", "dir", "example.com/app:v1"),
                            ("oci:dir:a--b@c+d", "dir", "a--b@c+d"), ("oci:dir", "dir", None)]:
        assert (reference.parse(text).path, reference.parse(text).tag) == (path, tag)
    for text, said in [("oci:dir:bad name", "'bad name' is no OCI ref name"),
                       ("oci:dir:-v1", "'-v1' is no OCI ref name"),
                       ("oci:dir:a//b", "'a//b' is no OCI ref name"),
                       ("oci::v1", "oci: needs a path")]:
        with pytest.raises(reference.RefSyntaxError, match=re.escape(said)):
            reference.parse(text)


def test_a_bare_daemon_prefix_says_what_it_needs():
    with pytest.raises(reference.RefSyntaxError, match="docker-daemon: needs an image"):
        reference.parse("docker-daemon:")


@pytest.mark.parametrize(("text", "path", "chosen"), [
    ("docker-archive:/tmp/x.tar", "/tmp/x.tar", None),
    ("docker-archive:x.tar:cuda:test", "x.tar", "cuda:test"),
    ("docker-archive:x.tar:localhost:5000/a/b:c", "x.tar", "localhost:5000/a/b:c"),
    ("docker-archive:x.tar:@1", "x.tar", "@1"),
])
def test_the_image_chosen_in_a_docker_archive(text, path, chosen):
    """skopeo's docker-archive:PATH[:NAME[:TAG]|:@N]: the path ends at the first colon."""
    ref = reference.parse(text)
    assert (ref.path, ref.tag, str(ref)) == (path, chosen, text)


def test_names_as_docker_normalises_them():
    hub = "registry-1.docker.io"
    assert reference.normalized_name("busybox") == f"{hub}/library/busybox:latest"
    assert reference.normalized_name("docker.io/bench/saved:big") == \
        reference.normalized_name("bench/saved:big") == f"{hub}/bench/saved:big"
    assert reference.normalized_name("localhost:5000/x") == "localhost:5000/x:latest"


@pytest.mark.parametrize("text", ["", "UPPER/x", "x@sha256:zz", "http://h/x", "a:b:c", "oci:",
                                  "docker-archive:", "docker-archive::x", "docker-archive:x:",
                                  "docker-archive:x.tar:UPPER", "docker-archive:x.tar:@-1"])
def test_bad_references(text):
    with pytest.raises(reference.RefSyntaxError):
        reference.parse(text)


def test_the_real_12_8_requirement_string():
    alternatives = cuda.parse_requirement(REQUIRE)
    assert len(alternatives) == 61
    assert [str(c) for c in alternatives[0]] == ["cuda>=12.8"]
    assert [str(c) for c in alternatives[1]] == ["brand=unknown", "driver>=470", "driver<471"]
    assert cuda.minimum_driver(alternatives[0]) == "driver >= 570.26 (CUDA 12.8)"


@pytest.mark.parametrize("driver,starts,runs", [
    ("570.124.06", True, True), ("580.65.06", True, True), ("575.51.03", True, True),
    ("565.57.01", None, True), ("470.256.02", None, False), ("520.61.05", False, True),
    ("555.42.06", False, True),
])
def test_verdicts(driver, starts, runs):
    verdict = cuda.requirement_verdict(REQUIRE, "12.8.0", driver, compat_libcuda=None)
    assert verdict.toolkit_starts is starts
    if starts is not False:
        assert verdict.cuda_runs is runs


def test_forward_compat_makes_an_old_branch_run():
    verdict = cuda.requirement_verdict(REQUIRE, "12.8.0", "470.256.02", "570.124.06")
    assert verdict.cuda_runs is None and "forward compatibility" in verdict.how


def test_requirement_syntax_errors():
    with pytest.raises(cuda.RequirementError, match="'gpu>=1'"):
        cuda.parse_requirement("cuda>=12.8 gpu>=1")
    with pytest.raises(cuda.RequirementError, match="not a version"):
        cuda.parse_requirement("cuda>=twelve")


def test_dpkg_and_library_versions():
    status = ("Package: libcudnn9-cuda-12\nStatus: install ok installed\nVersion: 9.7.0.66-1\n\n"
              "Package: libnccl2\nStatus: deinstall ok config-files\nVersion: 2.0\n\n"
              "Package: cuda-cudart-12-8\nStatus: install ok installed\nVersion: 12.8.57-1\n")
    found = image_cuda.package_versions(image_cuda.parse_dpkg_status(status))
    assert found == {"cuda": {"package": "cuda-cudart-12-8", "version": "12.8.57-1"},
                     "cudnn": {"package": "libcudnn9-cuda-12", "version": "9.7.0.66-1"}}
    libs = image_cuda.library_versions(["usr/local/cuda/lib64/libcudart.so.12.8.57",
                                  "usr/lib/x86_64-linux-gnu/libcudnn.so.9",
                                  "usr/lib/x86_64-linux-gnu/libcudnn.so.9.7.0",
                                  "usr/local/cuda-12.8/compat/libcuda.so.570.124.06"])
    assert libs == {"cudart": "12.8.57", "cudnn": "9.7.0", "compat_libcuda": "570.124.06"}


def tar_of(entries) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_whiteouts_hide_only_lower_layers():
    lower = tar_of([("etc/a", b"1"), ("etc/b", b"2"), ("opt/d/x", b"3"), ("opt/d/y", b"4")])
    upper = tar_of([("etc/.wh.a", b""), ("opt/d/.wh..wh..opq", b""), ("opt/d/z", b"5"),
                    ("etc/b", b"22")])
    view = filetree.MergedView()
    for index, data in enumerate((lower, upper)):
        view.apply(layers.scan_layer(io.BytesIO(gzip.compress(data)), index))
    assert sorted(view.files) == ["etc/b", "opt/d/z"]
    assert view.files["etc/b"].layer == 1 and view.files["etc/b"].size == 2


@pytest.mark.parametrize("compress,name", [
    (lambda d: d, "none"), (lambda d: gzip.compress(d), "gzip"),
    (lambda d: gzip.compress(d[:700]) + gzip.compress(d[700:]), "gzip"),  # multi-member
    (lambda d: zstd_module().compress(d), "zstd"),
])
def test_compressions_give_the_same_diff_id(compress, name):
    import hashlib

    data = tar_of([("etc/ld.so.cache", b"x" * 3000), ("usr/bin/tool", b"y" * 5000)])
    blob = compress(data)
    scan = layers.scan_layer(io.BytesIO(blob), 0,
                             expected_digest="sha256:" + hashlib.sha256(blob).hexdigest(),
                             expected_size=len(blob))
    assert scan.compression == name
    assert scan.diff_id == "sha256:" + hashlib.sha256(data).hexdigest()
    assert scan.kept == {"etc/ld.so.cache": b"x" * 3000}


def test_digest_mismatch_is_an_error():
    blob = gzip.compress(tar_of([("a", b"1")]))
    with pytest.raises(LayerError, match="does not match"):
        layers.scan_layer(io.BytesIO(blob), 2, expected_digest="sha256:" + "0" * 64)


def test_uncompressed_size_limit_stops_a_tar_bomb(monkeypatch):
    monkeypatch.setattr(layers, "UNCOMPRESSED_BYTES_MAX", 100_000)
    bomb = gzip.compress(tar_of([("zeros", b"\0" * 1_000_000)]))
    assert len(bomb) < 5000
    with pytest.raises(LayerError, match="more than 100000 bytes"):
        layers.scan_layer(io.BytesIO(bomb), 0)


def test_symlinks_resolve_inside_the_image():
    view = filetree.MergedView()
    data = tar_of([("usr/local/cuda-12.8/lib/libx.so.1", b"elf")])
    view.apply(layers.scan_layer(io.BytesIO(data), 0))
    link = tarfile.TarInfo("usr/local/cuda")
    link.type, link.linkname = tarfile.SYMTYPE, "cuda-12.8"
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.addfile(link)
    view.apply(layers.scan_layer(io.BytesIO(buffer.getvalue()), 1))
    assert view.resolve("/usr/local/cuda/lib/libx.so.1") == "usr/local/cuda-12.8/lib/libx.so.1"
    assert view.resolve("/usr/local/cuda/lib/missing") is None


@pytest.mark.parametrize("fmt", ["gnu", "posix", "ustar"])
def test_file_list_equals_gnu_tar(tmp_path, fmt):
    """Long names (GNU 'L' records, PAX path records), symlinks, hard links, sparse files (old
    GNU with extension headers, PAX GNU.sparse.*): the streamed listing equals `tar -t` on the
    same archive."""
    import shutil
    import subprocess

    if shutil.which("tar") is None:
        pytest.skip("GNU tar is the oracle here")
    root = tmp_path / "root"
    deep = root / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    (deep / "file-with-a-long-name.txt").write_text("x" * 700)
    (root / "link").symlink_to("plain")
    (root / "plain").write_text("p")
    (root / "hard").hardlink_to(root / "plain")
    with (root / "sparse").open("wb") as handle:  # 6 data runs: GNU needs extension headers
        for run in range(6):
            handle.seek(run << 20)
            handle.write(b"data")
        handle.truncate(8 << 20)
    archive = tmp_path / "t.tar"
    names = ["plain", "hard", "link", "d" * 60] if fmt == "ustar" else ["."]
    sparse = [] if fmt == "ustar" else ["--sparse"]
    subprocess.run(["tar", f"--format={fmt}", *sparse, "-cf", str(archive), "-C", str(root),
                    *names], check=True, capture_output=True)
    listed = subprocess.run(["tar", "-tf", str(archive)], check=True, capture_output=True,
                            text=True).stdout.split()
    scan = layers.scan_layer(io.BytesIO(archive.read_bytes()), 0)
    expected = {p.rstrip("/").removeprefix("./") for p in listed} - {"", "."}
    assert set(scan.files) == expected
    assert scan.files["link"].kind == "symlink"
    if fmt != "ustar":  # a sparse file's size counts its holes
        assert scan.files["sparse"].size == 8 << 20 and scan.files["sparse"].kind == "file"
    kinds = {scan.files["hard"].kind, scan.files["plain"].kind}
    assert kinds == {"file", "hardlink"}  # whichever tar stored second links to the first


@pytest.mark.parametrize("fixture,version", [
    ("proc-driver-nvidia-version_580-proprietary.txt", "580.173.02"),
    ("proc-driver-nvidia-version_565-open.txt", "565.57.01"),
    ("proc-driver-nvidia-version_525-open-archlinux.txt", "525.60.11"),
])
def test_host_driver_version_from_real_proc_files(tmp_path, fixture, version):
    """Fixture roots built from real /proc/driver/nvidia/version texts (tests/fixtures/real)."""
    from envcheck.nvidia.driver import host_driver_version
    from tests.conftest import REPO

    proc = tmp_path / "proc/driver/nvidia"
    proc.mkdir(parents=True)
    (proc / "version").write_bytes((REPO / "tests/fixtures/real" / fixture).read_bytes())
    assert host_driver_version(tmp_path) == version
    assert host_driver_version(tmp_path / "no-gpu") is None


@pytest.mark.parametrize("media_type,compression", [
    ("application/vnd.oci.image.layer.v1.tar+gzip", "gzip"),
    ("application/vnd.oci.image.layer.v1.tar+zstd", "zstd"),
    ("application/vnd.oci.image.layer.v1.tar", "none"),
    ("application/vnd.oci.image.layer.nondistributable.v1.tar+gzip", "gzip"),
    ("application/vnd.docker.image.rootfs.diff.tar.gzip", "gzip"),
    ("application/vnd.docker.image.rootfs.foreign.diff.tar.gzip", "gzip"),
    ("application/vnd.docker.image.rootfs.diff.tar", "none"),
    ("application/octet-stream", ""), (None, ""),
])
def test_the_compression_a_media_type_declares(media_type, compression):
    """What `--no-layers` shows for a layer it does not read (a read one shows what it found)."""
    assert declared_compression(media_type) == compression
