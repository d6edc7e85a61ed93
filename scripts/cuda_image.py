"""Build a CUDA-like image as an OCI image layout, without Docker: real ELF libraries (compiled
here with gcc, SONAMEs as in the real CUDA packages), an /etc/ld.so.cache made by the real
`ldconfig -r`, the dpkg package names and versions and the ENV lines of
nvidia/cuda:12.8.0-cudnn-devel-ubuntu24.04 (../shared/reference/images-registry-ldcache.md §1),
several layers with a whiteout and an opaque directory. Tests and benchmarks push, save and copy
it with the real registry, skopeo and dockerd.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

CUDA_LIB = "usr/local/cuda-12.8/targets/x86_64-linux/lib"
MULTIARCH = "usr/lib/x86_64-linux-gnu"
REQUIRE = "cuda>=12.8 " + " ".join(
    f"brand={brand},driver>={b},driver<{b + 1}" for b in (470, 535, 550, 560, 565)
    for brand in ("unknown", "grid", "tesla", "nvidia", "quadro", "quadrortx", "nvidiartx",
                  "vapps", "vpc", "vcs", "vws", "cloudgaming"))
ENV = [
    "PATH=/usr/local/nvidia/bin:/usr/local/cuda/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:"
    "/usr/bin:/sbin:/bin",
    "NVARCH=x86_64", f"NVIDIA_REQUIRE_CUDA={REQUIRE}", "NV_CUDA_CUDART_VERSION=12.8.57-1",
    "CUDA_VERSION=12.8.0", "LD_LIBRARY_PATH=/usr/local/nvidia/lib:/usr/local/nvidia/lib64",
    "NVIDIA_VISIBLE_DEVICES=all", "NVIDIA_DRIVER_CAPABILITIES=compute,utility",
    "NV_CUDA_LIB_VERSION=12.8.0-1", "NCCL_VERSION=2.25.1-1", "NVIDIA_PRODUCT_NAME=CUDA",
    "LIBRARY_PATH=/usr/local/cuda/lib64/stubs", "NV_CUDNN_VERSION=9.7.0.66-1",
    "NV_CUDNN_PACKAGE_NAME=libcudnn9-cuda-12",
]
PACKAGES = [  # (package, version) as installed in the 12.8.0 cudnn-devel image
    ("cuda-cudart-12-8", "12.8.57-1"), ("cuda-compat-12-8", "570.124.06-0ubuntu1"),
    ("libcublas-12-8", "12.8.3.14-1"), ("libnccl2", "2.25.1-1+cuda12.8"),
    ("libcudnn9-cuda-12", "9.7.0.66-1"), ("libcudnn9-dev-cuda-12", "9.7.0.66-1"),
]
# (relative path, SONAME) of the shared objects, and (link, target) symlinks, per layer.
LIBS = {
    1: [(f"{CUDA_LIB}/libcudart.so.12.8.57", "libcudart.so.12"),
        ("usr/local/cuda-12.8/compat/libcuda.so.570.124.06", "libcuda.so.1")],
    2: [(f"{CUDA_LIB}/stubs/libcuda.so", "libcuda.so.1"),
        (f"{CUDA_LIB}/stubs/libnvidia-ml.so", "libnvidia-ml.so.1"),
        (f"{CUDA_LIB}/libcublas.so.12.8.3.14", "libcublas.so.12"),
        (f"{MULTIARCH}/libnccl.so.2.25.1", "libnccl.so.2"),
        (f"{MULTIARCH}/libcudnn.so.9.7.0", "libcudnn.so.9")],
}
LINKS = {
    1: [("usr/local/cuda", "cuda-12.8"), (f"{CUDA_LIB}/libcudart.so.12", "libcudart.so.12.8.57"),
        ("usr/local/cuda-12.8/compat/libcuda.so.1", "libcuda.so.570.124.06"),
        ("usr/local/cuda-12.8/lib64", "targets/x86_64-linux/lib")],
    2: [(f"{MULTIARCH}/libcudnn.so.9", "libcudnn.so.9.7.0"),
        (f"{MULTIARCH}/libnccl.so.2", "libnccl.so.2.25.1"),
        (f"{CUDA_LIB}/libcublas.so.12", "libcublas.so.12.8.3.14")],
}
HISTORY = [
    "ADD file:ubuntu-like-rootfs in /",
    "RUN /bin/sh -c apt-get install -y cuda-cudart-12-8=12.8.57-1 cuda-compat-12-8 # buildkit",
    "RUN /bin/sh -c apt-get install -y libcudnn9-cuda-12 libcudnn9-dev-cuda-12 # buildkit",
]


def _compile(path: Path, soname: str, work: Path) -> None:
    source = work / "empty.c"
    source.write_text(f'const char *envcheck_fixture = "{soname}";\n')
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["gcc", "-shared", "-fPIC", f"-Wl,-soname,{soname}", "-o", str(path),
                    str(source)], check=True, capture_output=True)


def _dpkg_status(packages) -> str:
    return "".join(f"Package: {name}\nStatus: install ok installed\nArchitecture: amd64\n"
                   f"Version: {version}\n\n" for name, version in packages)


def _populate(layer: int, root: Path, merged: Path, work: Path) -> None:
    """Write layer `layer`'s own files under `root` and mirror them into `merged`."""
    for target in (root, merged):
        for path, soname in LIBS.get(layer, []):
            if not (target / path).exists():
                _compile(target / path, soname, work)
        for link, dest in LINKS.get(layer, []):
            (target / link).parent.mkdir(parents=True, exist_ok=True)
            if not (target / link).is_symlink():
                (target / link).symlink_to(dest)
    if layer == 0:
        for target in (root, merged):
            (target / "etc").mkdir(parents=True, exist_ok=True)
            (target / "etc/os-release").write_text('ID=ubuntu\nVERSION_ID="24.04"\n')
            (target / "etc/removed.conf").write_text("deleted by a whiteout in layer 2\n")
            (target / "opt/old").mkdir(parents=True, exist_ok=True)
            (target / "opt/old/hidden.txt").write_text("hidden by an opaque dir in layer 2\n")
            (target / MULTIARCH).mkdir(parents=True, exist_ok=True)
            shutil.copy("/lib/x86_64-linux-gnu/libz.so.1", target / MULTIARCH / "libz.so.1")
            (target / "var/lib/dpkg").mkdir(parents=True, exist_ok=True)
            (target / "var/lib/dpkg/status").write_text(_dpkg_status([("zlib1g", "1:1.3")]))
    if layer == 1:
        for target in (root, merged):
            conf = target / "etc/ld.so.conf.d"
            conf.mkdir(parents=True, exist_ok=True)
            (conf / "nvidia.conf").write_text("/usr/local/nvidia/lib\n/usr/local/nvidia/lib64\n")
            (conf / "000_cuda.conf").write_text(f"/{CUDA_LIB}\n")
            (target / "etc/ld.so.conf").write_text("include /etc/ld.so.conf.d/*.conf\n")
    if layer == 2:
        status = _dpkg_status([("zlib1g", "1:1.3"), *PACKAGES])
        for target in (root, merged):
            (target / "var/lib/dpkg").mkdir(parents=True, exist_ok=True)
            (target / "var/lib/dpkg/status").write_text(status)
        (merged / "etc/removed.conf").unlink()
        shutil.rmtree(merged / "opt/old")
        (root / "etc").mkdir(parents=True, exist_ok=True)
        (root / "etc/.wh.removed.conf").write_text("")
        (root / "opt/old").mkdir(parents=True, exist_ok=True)
        (root / "opt/old/.wh..wh..opq").write_text("")
        for target in (root, merged):
            (target / "opt/old").mkdir(parents=True, exist_ok=True)
            (target / "opt/old/new.txt").write_text("written by layer 2\n")
        subprocess.run(["ldconfig", "-r", str(merged)], check=True, capture_output=True)
        shutil.copy(merged / "etc/ld.so.cache", root / "etc/ld.so.cache")


def _tar_bytes(root: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(root.rglob("*")):
            info = tar.gettarinfo(str(path), arcname=str(path.relative_to(root)))
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            info.mtime = 0
            if info.isreg():
                with path.open("rb") as handle:
                    tar.addfile(info, handle)
            else:
                tar.addfile(info)
    return buffer.getvalue()


def _write_blob(layout: Path, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs/sha256").mkdir(parents=True, exist_ok=True)
    (layout / "blobs/sha256" / digest).write_bytes(data)
    return f"sha256:{digest}"


def build_layout(layout: Path, tag: str = "12.8.0-cudnn-devel", compression: str = "gzip",
                 extra_layer: bytes | None = None) -> dict:
    """Write the OCI layout; returns {manifest_digest, config_digest, diff_ids, layers}.
    `extra_layer`: an uncompressed tar appended as a top layer (e.g. a big one for benchmarks)."""
    layout.mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    with tempfile.TemporaryDirectory(prefix="cuda-image-") as tmp:
        work, merged = Path(tmp), Path(tmp) / "merged"
        merged.mkdir()
        tars = []
        for layer in range(3):
            root = work / f"layer{layer}"
            root.mkdir()
            _populate(layer, root, merged, work)
            tars.append(_tar_bytes(root))
    history = list(HISTORY)
    if extra_layer is not None:
        tars.append(extra_layer)
        history.append("COPY big.bin /opt/big/ # buildkit")
    return write_image(layout, tag, tars, history, compression, "amd64")


def _compress(data: bytes, compression: str) -> tuple[bytes, str]:
    base = "application/vnd.oci.image.layer.v1.tar"
    if compression == "gzip":
        return gzip.compress(data, compresslevel=1, mtime=0), base + "+gzip"
    if compression == "zstd":
        from envcheck.image.blobstream import zstd_module

        return zstd_module().compress(data, level=3), base + "+zstd"
    return data, base


def write_image(layout: Path, tag: str, tars: list[bytes], history: list[str],
                compression: str, arch: str, annotate: bool = True,
                env: list[str] | None = None) -> dict:
    layers, diff_ids = [], []
    for data in tars:
        diff_ids.append("sha256:" + hashlib.sha256(data).hexdigest())
        blob, media_type = _compress(data, compression)
        layers.append({"mediaType": media_type, "digest": _write_blob(layout, blob),
                       "size": len(blob)})
    config = {
        "created": "2025-01-27T00:00:00Z", "architecture": arch, "os": "linux",
        "config": {"Env": ENV if env is None else env,
                   "Entrypoint": ["/opt/nvidia/nvidia_entrypoint.sh"],
                   "Labels": {"maintainer": "NVIDIA CORPORATION <cudatools@nvidia.com>",
                              "com.nvidia.cudnn.version": "9.7.0.66-1"}},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": "2025-01-27T00:00:00Z", "created_by": line} for line in history],
    }
    config_bytes = json.dumps(config, indent=1).encode()
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": _write_blob(layout, config_bytes),
                           "size": len(config_bytes)},
                "layers": layers}
    manifest_bytes = json.dumps(manifest, indent=1).encode()
    manifest_digest = _write_blob(layout, manifest_bytes)
    descriptor = {"mediaType": manifest["mediaType"], "digest": manifest_digest,
                  "size": len(manifest_bytes), "platform": {"architecture": arch, "os": "linux"}}
    if annotate:
        descriptor["annotations"] = {"org.opencontainers.image.ref.name": tag}
        _add_to_index(layout, descriptor)
    return {"manifest_digest": manifest_digest, "config_digest": manifest["config"]["digest"],
            "diff_ids": diff_ids, "layers": layers, "descriptor": descriptor}


def _add_to_index(layout: Path, descriptor: dict) -> None:
    path = layout / "index.json"
    index = json.loads(path.read_text()) if path.exists() else {
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": []}
    index["manifests"].append(descriptor)
    path.write_text(json.dumps(index, indent=1))


def build_multiarch(layout: Path, tag: str = "multi") -> dict:
    """An index with linux/amd64 (the CUDA-like image), linux/arm64 (one small layer) and an
    `unknown/unknown` attestation manifest, as Docker Hub serves them."""
    amd64 = build_layout(layout / "amd64-tmp")
    shutil.copytree(layout / "amd64-tmp" / "blobs", layout / "blobs", dirs_exist_ok=True)
    shutil.rmtree(layout / "amd64-tmp")
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "root"
        (root / "etc").mkdir(parents=True)
        (root / "etc/arch").write_text("arm64\n")
        arm64 = write_image(layout, tag, [_tar_bytes(root)], ["ADD arm64 /"], "gzip", "arm64",
                            annotate=False)
    attestation = {"mediaType": "application/vnd.oci.image.manifest.v1+json",
                   "digest": arm64["manifest_digest"], "size": arm64["descriptor"]["size"],
                   "platform": {"architecture": "unknown", "os": "unknown"},
                   "annotations": {"vnd.docker.reference.type": "attestation-manifest"}}
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": [attestation, amd64["descriptor"] | {"annotations": {}},
                           arm64["descriptor"]]}
    index_bytes = json.dumps(index, indent=1).encode()
    index_digest = _write_blob(layout, index_bytes)
    (layout / "index.json").write_text(json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": index["mediaType"], "digest": index_digest,
                       "size": len(index_bytes),
                       "annotations": {"org.opencontainers.image.ref.name": tag}}]}))
    return {"index_digest": index_digest, "amd64": amd64, "arm64": arm64}


if __name__ == "__main__":
    import sys

    print(json.dumps(build_layout(Path(sys.argv[1])), indent=1))
