"""image.jax-stack: JAX's version rules on the real METADATA of the JAX stack's wheels
(tests/fixtures/python; where a case needs another version, the Version line is the one edit,
named), each case a failure users meet (../shared/reference/jax-stack-and-gpu-judgement.md §3)."""

from __future__ import annotations

import io
import tarfile

import pytest

from envcheck.image import jaxstack, python
from envcheck.image.filetree import MergedView
from envcheck.image.layers import scan_layer
from envcheck.image.linker import Load
from tests.conftest import REPO

FIXTURES = REPO / "tests/fixtures/python"
SITE = "usr/local/lib/python3.12/site-packages"
REAL = {"jax": "jax-0.10.2.dist-info", "jaxlib": "jaxlib-0.10.2.dist-info",
        "plugin": "jax_cuda12_plugin-0.10.2.dist-info", "pjrt": "jax_cuda12_pjrt-0.10.2.dist-info",
        "cublas": "nvidia_cublas_cu12-12.8.3.14.dist-info",
        "cudnn": "nvidia_cudnn_cu12-9.7.0.66.dist-info"}


def package(key: str, version: str | None = None) -> python.PythonPackage:
    text = (FIXTURES / REAL[key] / "METADATA").read_text()
    if version:  # the edit: another Version line
        text = "\n".join(f"Version: {version}" if line.startswith("Version: ") else line
                         for line in text.splitlines())
    return python.read_package(f"{SITE}/{REAL[key]}/METADATA",
                               python.headers_only(text.encode()))


def extra(name: str, version: str) -> python.PythonPackage:
    """A wheel with no fixture: its name and version are all the rules read."""
    return python.PythonPackage(name=name, version=version, location=f"/{SITE}", metadata="x")


def check(*packages, env=None, driver=None, loads=(), files=()):
    view = MergedView()
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name in files:
            tar.addfile(tarfile.TarInfo(name))
    view.apply(scan_layer(io.BytesIO(raw.getvalue()), 0))
    facts = python.PythonFacts(packages=list(packages))
    return jaxstack.stack_check(facts, list(loads), env or {}, driver, view)


def gpu_stack(cudnn: str | None = "9.8.0.87") -> list:
    stack = [package("jax"), package("jaxlib"), package("plugin"), package("pjrt"),
             package("cublas")]
    return stack + ([package("cudnn", cudnn)] if cudnn else [])


def test_a_matching_stack_passes():
    result = check(*gpu_stack(), driver="590.48.01")
    assert result.status == "pass" and result.summary == (
        "jax 0.10.2, jaxlib 0.10.2, jax-cuda12-plugin 0.10.2, jax-cuda12-pjrt 0.10.2 agree")


def test_the_real_cudnn_wheel_is_older_than_the_plugin_needs():
    """nvidia-cudnn-cu12 9.7.0.66 (the real METADATA) under jax-cuda12-plugin 0.10.2, which
    requires >=9.8 with its with-cuda extra: JAX's check would say "Outdated cuDNN"."""
    result = check(*gpu_stack(cudnn=None), package("cudnn"))
    assert result.status == "fail"
    assert result.summary.endswith("nvidia-cudnn-cu12 9.7.0.66 is outside <10.0,>=9.8 that "
                                   "jax-cuda12-plugin 0.10.2 needs")


def test_a_system_cudnn_standing_in_for_the_wheel_is_judged_too():
    """jax[cuda12-local] on the CUDA 12.8 cuDNN base: no wheel, the system's cuDNN 9.7.0."""
    load = Load(name="libcudnn.so.9", path="/usr/lib/x86_64-linux-gnu/libcudnn.so.9.7.0",
                via="ld.so.cache", chain=[], version="9.7.0")
    result = check(*gpu_stack(cudnn=None), loads=[load])
    assert result.status == "fail" and "nvidia-cudnn-cu12 9.7.0 (the system's, no wheel) is " \
                                       "outside <10.0,>=9.8" in result.summary


def test_a_plugin_of_another_version_than_jaxlib():
    stack = [package("jax"), package("jaxlib"), package("plugin", "0.9.2"), package("pjrt")]
    result = check(*stack)
    assert result.status == "fail"
    assert ("JAX plugin jax-cuda12-plugin version 0.9.2 is installed, but it is not compatible "
            "with the installed jaxlib version 0.10.2") in result.summary + result.detail
    stack = [package("jax"), package("jaxlib"), package("plugin"), package("pjrt", "0.10.1")]
    assert "jax-cuda12-plugin 0.10.2 needs jax-cuda12-pjrt==0.10.2, found 0.10.1" in (
        check(*stack).summary)


@pytest.mark.parametrize("stack, said", [
    ([package("jax")], "jax is installed without jaxlib"),
    ([package("jax"), package("jaxlib", "0.9.0")],
     "jax 0.10.2 needs jaxlib<=0.10.2,>=0.10.1, not 0.9.0"),
])
def test_jax_against_jaxlib(stack, said):
    result = check(*stack)
    assert result.status == "fail" and said in result.summary


def test_a_cpu_only_jaxlib_in_an_image_built_for_the_gpu():
    result = check(package("jax"), package("jaxlib"), env={"CUDA_VERSION": "12.8.0"})
    assert result.status == "fail" and "Falling back to cpu" in result.summary
    assert check(package("jax"), package("jaxlib")).status == "pass"  # a CPU image


@pytest.mark.parametrize("driver, status, said", [
    ("470.256.02", "fail", "nvidia-cuda-runtime-cu12 12.8.90 needs a newer driver than "
                           "470.256.02"),
    ("550.54.15", "warn", "the NVIDIA driver's CUDA version is 12.4 which is older than the "
                          "ptxas CUDA version (12.8.93)"),
    ("590.48.01", "pass", "agree"),
])
def test_the_plugins_cuda_against_the_driver(driver, status, said):
    stack = gpu_stack() + [extra("nvidia-cuda-runtime-cu12", "12.8.90"),
                           extra("nvidia-cuda-nvcc-cu12", "12.8.93")]
    result = check(*stack, driver=driver)
    assert result.status == status and said in result.summary, result


def test_a_ptxas_on_path_besides_the_nvcc_wheels():
    stack = gpu_stack() + [extra("nvidia-cuda-nvcc-cu12", "12.8.93")]
    result = check(*stack, env={"PATH": "/usr/local/cuda/bin:/usr/bin"},
                   files=["usr/local/cuda/bin/ptxas"])
    assert result.status == "warn" and "a ptxas on PATH (/usr/local/cuda/bin/ptxas)" in (
        result.summary)


def test_an_image_without_jax_is_skipped():
    assert check(extra("numpy", "2.0")).status == "skip"
