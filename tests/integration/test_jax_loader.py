"""image.jax-libraries against glibc's own loader inside the image: each case is a real image
(the Debian base plus the stand-in stack of scripts/jax_image.py, its ld.so.cache rebuilt by the
image's own ldconfig), inspected through the daemon as a user would, then run with
`LD_DEBUG=libs`: a small C program does what the plugin's `__init__.py` does (dlopen the wheels'
libraries by path, then the plugin, whose constructor dlopens what XLA dlopens). Every CUDA
library the image's loader initialised must be the file the report predicted — including the
steps a host-side oracle cannot show: the image's ld.so.cache and its default directories."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from envcheck.image import jaxstack
from scripts.jax_image import SITE, SYSTEM, build_tree
from tests.conftest import require_binary

DRIVER = r"""
#include <dlfcn.h>
#include <stdio.h>
int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++)
        if (!dlopen(argv[i], RTLD_NOW | RTLD_LOCAL)) fprintf(stderr, "dlopen: %s\n", dlerror());
    return 0;
}
"""
PLUGIN = f"/{SITE}/jax_plugins/xla_cuda12/xla_cuda_plugin.so"
CASES = {  # id: (build_tree options, image ENV, /etc/ld.so.conf.d entry)
    "clean pip stack": ({}, {}, None),
    "nvJitLink shadowed through LD_LIBRARY_PATH": (
        {"system": ("libnvJitLink.so.12",)}, {"LD_LIBRARY_PATH": f"/{SYSTEM}"}, None),
    "missing cuDNN wheel, system cuDNN in ld.so.cache": (
        {"missing": ("cudnn",), "system": ("libcudnn.so.9", "libcudnn_graph.so.9")}, {},
        f"/{SYSTEM}"),
    "the wheel's RUNPATH comes before ld.so.cache": (
        {"system": ("libcudnn_graph.so.9",)}, {"LD_LIBRARY_PATH": "/nonexistent"},
        f"/{SYSTEM}"),
}  # RPATH against RUNPATH and a library found nowhere: the host-side oracle's cases


@pytest.fixture(scope="module")
def driver(tmp_path_factory) -> Path:
    require_binary("gcc")
    out = tmp_path_factory.mktemp("driver") / "load-plugin"
    source = out.with_suffix(".c")
    source.write_text(DRIVER)
    subprocess.run(["gcc", "-O1", "-o", str(out), str(source), "-ldl"], check=True)
    return out


def case_image(client, base_image: str, root: Path, driver: Path, env: dict[str, str],
               conf: str | None, tag: str) -> str:
    """The base image plus `root` and the driver, its ld.so.cache rebuilt by its own ldconfig."""
    if conf:
        (root / "etc/ld.so.conf.d").mkdir(parents=True, exist_ok=True)
        (root / "etc/ld.so.conf.d/cuda.conf").write_text(conf + "\n")
    (root / "usr/local/bin").mkdir(parents=True, exist_ok=True)
    (root / "usr/local/bin/load-plugin").write_bytes(driver.read_bytes())
    (root / "usr/local/bin/load-plugin").chmod(0o755)
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        for child in sorted(root.iterdir()):
            tar.add(child, arcname=child.name)
    container = client.containers.create(base_image, ["/sbin/ldconfig"], network_mode="none")
    try:
        container.put_archive("/", layer.getvalue())
        container.start()
        assert container.wait(timeout=60)["StatusCode"] == 0, container.logs()
        changes = [f"ENV {name}={value}" for name, value in env.items()]
        repository, name = tag.split(":")
        container.commit(repository, name, changes=changes)
    finally:
        container.remove(force=True)
    return tag


def predicted(engine: str, tag: str) -> tuple[dict[str, str], dict]:
    """name -> first resolved path of each CUDA library in the report, and the check."""
    done = subprocess.run([sys.executable, "-m", "envcheck", "inspect-image",
                           f"docker-daemon:{tag}", "--json"], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "DOCKER_HOST": engine})
    assert done.returncode in (0, 1), done.stderr
    report = json.loads(done.stdout)
    found: dict[str, str] = {}
    for load in report["jax_libraries"]["loads"]:
        if load["path"] and load["name"] in jaxstack.WHEEL_MODULE:
            found.setdefault(load["name"], load["path"])
    check = next(c for c in report["checks"] if c["id"] == "image.jax-libraries")
    return found, check


def glibc_initialised(client, tag: str, preload: list[str]) -> dict[str, str]:
    """name -> path of every CUDA library the image's own loader initialised."""
    container = client.containers.create(tag, ["/usr/local/bin/load-plugin", *preload, PLUGIN],
                                         environment={"LD_DEBUG": "libs"}, network_mode="none")
    try:
        container.start()
        assert container.wait(timeout=60)["StatusCode"] == 0
        stderr = container.logs(stdout=False, stderr=True).decode()
    finally:
        container.remove(force=True)
    mapped = [os.path.normpath(p) for p in re.findall(r"calling init: (\S+)", stderr)]
    return {os.path.basename(p): p for p in mapped if os.path.basename(p) in jaxstack.WHEEL_MODULE}


@pytest.mark.parametrize("case", list(CASES))
def test_the_images_own_loader_maps_what_was_predicted(engine, base_image, driver, tmp_path,
                                                       case):
    import docker

    require_binary("gcc")
    options, env, conf = CASES[case]
    root = tmp_path / "root"
    build_tree(root, **options)
    client = docker.DockerClient(base_url=engine, timeout=120)
    tag = case_image(client, base_image, root, driver, env, conf,
                     f"envcheck-test/jax-loader:{list(CASES).index(case)}")
    try:
        prediction, check = predicted(engine, tag)
        preload = [f"/{SITE}/nvidia/{module}/lib/{name}" for module, name in jaxstack.PRELOAD
                   if (root / SITE / "nvidia" / module / "lib" / name).exists()]
        assert prediction == glibc_initialised(client, tag, preload)
        assert {"libcudart.so.12", "libcublasLt.so.12", "libnvJitLink.so.12"} <= set(prediction)
    finally:
        client.images.remove(tag, force=True)
    if "missing" in case:
        assert prediction["libcudnn.so.9"] == f"/{SYSTEM}/libcudnn.so.9"
        assert check["status"] == "pass", check
    elif "shadowed" in case:
        assert check["status"] == "fail" and "resolves to" in check["summary"]
    else:
        assert check["status"] == "pass", check
