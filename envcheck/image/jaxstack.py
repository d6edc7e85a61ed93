"""What JAX's CUDA plugin will really load in this image, predicted before it runs: the
libraries its Python entry point preloads from the nvidia-* wheels, the ones XLA dlopens by
name, what those need in turn, each resolved as glibc's loader would (linker.py) — and the
`image.jax-libraries` check: a library not found, or found somewhere else than the wheel's copy
the plugin was built to use (an older system cuDNN or nvJitLink ahead of it on LD_LIBRARY_PATH).

Sources, read from jax-cuda12-pjrt / jax-cuda12-plugin 0.10.2:
- `jax_plugins/xla_cuda12/__init__.py`, `_load_nvidia_libraries()`: PRELOAD below, in order,
  each by absolute path from `nvidia/<module>/lib/` when the wheel is installed (ctypes), a
  missing wheel skipped silently (the library is then found by the ordinary search);
- XLA's `tsl/platform/default/dso_loader.{h,cc}`: DLOPENED below, by name, from the plugin;
- libcudnn.so.9 dlopens its sub-libraries by name (cuDNN 9's split into engines, graph, ops…);
- xla_cuda_plugin.so's DT_RPATH (not RUNPATH) points at the wheels: `$ORIGIN/../../nvidia/X/lib`.
"""

from __future__ import annotations

import posixpath
import re

from envcheck.image.elf import ElfFacts
from envcheck.image.filetree import MergedView
from envcheck.image.ldcache import LdCache
from envcheck.image.linker import Load, Loader
from envcheck.image.python import PythonFacts, normalized
from envcheck.report import Check

PLUGIN_RE = re.compile(r"^(.*)/jax_plugins/xla_cuda(\d+)/xla_cuda_plugin\.so$")
PRELOAD = (("cuda_runtime", "libcudart.so.12"), ("cuda_nvrtc", "libnvrtc.so.12"),
           ("cublas", "libcublas.so.12"), ("cublas", "libcublasLt.so.12"),
           ("nccl", "libnccl.so.2"), ("cuda_cupti", "libcupti.so.12"),
           ("cusparse", "libcusparse.so.12"), ("cusolver", "libcusolver.so.11"),
           ("cufft", "libcufft.so.11"), ("nvshmem", "libnvshmem_host.so.3"),
           ("cudnn", "libcudnn.so.9"))
DLOPENED = ("libcudart.so.12", "libcublas.so.12", "libcublasLt.so.12", "libcufft.so.11",
            "libcusolver.so.11", "libcusparse.so.12", "libcupti.so.12", "libcudnn.so.9",
            "libnccl.so.2")
CUDNN_PARTS = ("libcudnn_graph.so.9", "libcudnn_engines_precompiled.so.9",
               "libcudnn_engines_runtime_compiled.so.9", "libcudnn_heuristic.so.9",
               "libcudnn_ops.so.9", "libcudnn_cnn.so.9", "libcudnn_adv.so.9")
# The wheel module (nvidia/<module>/lib) each CUDA library comes in.
WHEEL_MODULE = {name: module for module, name in PRELOAD} | {
    "libnvJitLink.so.12": "nvjitlink", **{part: "cudnn" for part in CUDNN_PARTS}}


def simulate(view: MergedView, cache: LdCache | None, env: dict[str, str], arch: str,
             shared_objects: list[ElfFacts],
             python: PythonFacts | None = None) -> tuple[str, list[Load]] | None:
    """(the plugin's path, every load in order) as the plugin's initialisation would do them;
    None where the image has no JAX CUDA plugin."""
    plugin = next((f.path for f in shared_objects if PLUGIN_RE.match(f.path)), None)
    if plugin is None:
        return None
    site = PLUGIN_RE.match(plugin).group(1)
    loader = Loader(view=view, cache=cache, arch=arch,
                    ld_library_path=[d for d in env.get("LD_LIBRARY_PATH", "").split(":") if d],
                    elf={f.path: f for f in shared_objects})
    loader.open_path(plugin, chain=[])
    for module, name in PRELOAD:
        if loader.exists(f"{site}/nvidia/{module}/lib/{name}"):
            loader.open_path(f"{site}/nvidia/{module}/lib/{name}", chain=[])
    for name in DLOPENED:
        cudnn = loader.open_name(name, plugin, chain=[])
        if name == "libcudnn.so.9" and cudnn.path:  # the parts this cuDNN ships, as it asks
            for part in CUDNN_PARTS:
                if loader.exists(posixpath.join(posixpath.dirname(cudnn.path), part)):
                    loader.open_name(part, cudnn.path, chain=[plugin])
    for load in loader.loads:
        load.version = library_version(load.path, python) if load.path else None
    return plugin, loader.loads


def wheel_copy(view: MergedView, site: str, name: str) -> str | None:
    """The nvidia-* wheel's copy of library `name`, where that wheel is installed."""
    module = WHEEL_MODULE.get(name)
    path = f"{site}/nvidia/{module}/lib/{name}" if module else None
    found = view.resolve(path.lstrip("/")) if path else None
    return "/" + found if found else None


def library_version(path: str, python: PythonFacts | None) -> str | None:
    """A resolved library's version: its owning nvidia-* wheel's, else its file name's."""
    match = re.match(r"^(.*)/nvidia/(\w+)/lib/", path)
    if match and python:
        site, module = match.groups()
        for package in python.packages:
            if package.location == site and re.fullmatch(
                    rf"nvidia-{normalized(module)}-cu\d+", package.name):
                return f"{package.name} {package.version}"
    suffix = posixpath.basename(path).partition(".so.")[2]
    return suffix or None


def libraries_check(view: MergedView, plugin: str | None, loads: list[Load]) -> Check:
    """image.jax-libraries: every library the plugin loads is found, and is the wheel's copy
    wherever that wheel is installed."""
    if plugin is None:
        return Check("image.jax-libraries", "skip", "no JAX CUDA plugin in the image "
                                                    "(jax_plugins/xla_cudaNN/xla_cuda_plugin.so)")
    site = PLUGIN_RE.match(plugin).group(1)
    missing = [load for load in loads if load.path is None and load.name in WHEEL_MODULE]
    shadowed = [(load, copy) for load in loads if load.path and load.via != "loaded"
                and (copy := wheel_copy(view, site, load.name)) and copy != load.path]
    if shadowed:
        load, copy = shadowed[0]
        return Check(
            "image.jax-libraries", "fail",
            f"{load.name} resolves to {load.path} (via {load.via}), not the {copy} of its "
            f"nvidia wheel the plugin was built with; loaded by {_chain(load)}",
            detail="; ".join(f"{d.name} → {d.path} ({d.via})" for d, _ in shadowed),
            fix="remove the directory from LD_LIBRARY_PATH (`ENV LD_LIBRARY_PATH=` in the "
                "Dockerfile), or `unset LD_LIBRARY_PATH` before starting Python")
    if missing:
        first = missing[0]
        return Check("image.jax-libraries", "fail",
                     f"{first.name} is not found (asked for by {_chain(first)}): JAX will say "
                     f"\"Unable to load {first.name}. Is it installed?\"",
                     detail="; ".join(f"{m.name} ({_chain(m)})" for m in missing),
                     fix="install `jax[cuda12]` (its nvidia-* wheels), or the system CUDA "
                         "libraries and `ldconfig`")
    found = {load.name for load in loads if load.path and load.name in WHEEL_MODULE}
    return Check("image.jax-libraries", "pass",
                 f"the {len(found)} CUDA libraries the JAX plugin loads all resolve, each to "
                 "its nvidia wheel's copy where that wheel is installed")


def _chain(load: Load) -> str:
    return " ← ".join(posixpath.basename(step) for step in reversed(load.chain)) or "Python"
