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

from packaging.requirements import InvalidRequirement, Requirement
from packaging.version import InvalidVersion, Version

from envcheck.image.elf import ElfFacts
from envcheck.image.filetree import MergedView
from envcheck.image.ldcache import LdCache
from envcheck.image.linker import Load, Loader
from envcheck.image.python import PythonFacts, family, normalized
from envcheck.nvidia.cuda import cuda_for_driver, cuda_runs, version_text, version_tuple
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


# JAX's version rules, statically. Sources: jax/_src/xla_bridge.py (a plugin whose version is not
# jaxlib's is not used: "JAX plugin jax_cuda12_plugin version … is installed, but it is not
# compatible with the installed jaxlib version …"), the packages' own Requires-Dist (jax's on
# jaxlib, the plugin's on its pjrt and, with its with-cuda extra, on the nvidia-* wheels: below
# those minima the plugin's version check raises "Outdated … installation found"), and
# ../shared/reference/jax-stack-and-gpu-judgement.md §1 and §3.
WITH_CUDA = {"extra": "with-cuda", "sys_platform": "linux", "platform_system": "Linux"}
NVCC_WHEEL_RE = re.compile(r"^nvidia-cuda-nvcc-cu(\d+)$")


def stack_check(python: PythonFacts | None, loads: list[Load], env: dict[str, str],
                driver: str | None, view: MergedView) -> Check:
    """image.jax-stack: the JAX packages agree with each other, the CUDA libraries with the
    plugin's requirements, and the plugin's CUDA with the driver."""
    packages = {p.name: p for p in (python.packages if python else [])}
    if "jax" not in packages:
        return Check("image.jax-stack", "skip", "no JAX in the image (no jax package)")
    problems = (version_problems(packages) + library_problems(packages, loads)
                + cpu_only_problems(packages, env))
    warnings = driver_problems(packages, driver) + ptxas_problems(packages, env, view)
    failed = [text for severe, text in warnings if severe] + problems
    stack = ", ".join(f"{p.name} {p.version}" for p in packages.values() if family(p.name) == "jax")
    if failed:
        return Check("image.jax-stack", "fail", f"{stack}: {failed[0]}",
                     detail="; ".join(failed[1:] + [t for s, t in warnings if not s]),
                     fix="install one matching set: `pip install -U \"jax[cuda12]\"` in a fresh "
                         "environment (jax, jaxlib, the plugin and the nvidia wheels together)")
    if warnings:
        return Check("image.jax-stack", "warn", f"{stack}: {warnings[0][1]}",
                     detail="; ".join(t for _, t in warnings[1:]),
                     fix="update the host driver, or pin nvidia-cuda-nvcc-cu12 to the driver's "
                         "CUDA; remove other ptxas from PATH")
    return Check("image.jax-stack", "pass", f"{stack} agree")


def requirements(package, extra: dict | None = None) -> list[Requirement]:
    """The package's Requires-Dist that apply (its base ones; with `extra`, those of the extra)."""
    found = []
    for text in package.requires:
        try:
            requirement = Requirement(text)
        except InvalidRequirement:
            continue
        marker = requirement.marker
        if marker is None and extra is None or marker is not None and extra is not None and (
                marker.evaluate(extra) and not marker.evaluate({**extra, "extra": ""})):
            found.append(requirement)
    return found


def version_problems(packages: dict) -> list[str]:
    """jax against jaxlib, the CUDA plugin against jaxlib and its pjrt."""
    problems = []
    jaxlib = packages.get("jaxlib")
    if jaxlib is None:
        return ["jax is installed without jaxlib"]
    for requirement in requirements(packages["jax"]):
        if requirement.name == "jaxlib" and not requirement.specifier.contains(
                jaxlib.version, prereleases=True):
            problems.append(f"jax {packages['jax'].version} needs jaxlib{requirement.specifier}, "
                            f"not {jaxlib.version}")
    for name, plugin in packages.items():
        if not re.fullmatch(r"jax-cuda\d+-plugin", name):
            continue
        if _release(plugin.version)[:3] != _release(jaxlib.version)[:3]:
            problems.append(f"JAX plugin {name} version {plugin.version} is installed, but it is "
                            f"not compatible with the installed jaxlib version {jaxlib.version}")
        for requirement in requirements(plugin):
            pjrt = packages.get(normalized(requirement.name))
            if requirement.name.endswith("-pjrt") and (pjrt is None or not (
                    requirement.specifier.contains(pjrt.version, prereleases=True))):
                problems.append(f"{name} {plugin.version} needs {requirement}, found "
                                f"{pjrt.version if pjrt else 'none'}")
    return problems


def library_problems(packages: dict, loads: list[Load]) -> list[str]:
    """The nvidia-* wheels (or the system libraries standing in for them) against the versions
    the plugin requires with its with-cuda extra."""
    problems = []
    for name, plugin in packages.items():
        if not re.fullmatch(r"jax-cuda\d+-plugin", name):
            continue
        for requirement in requirements(plugin, WITH_CUDA):
            wheel = packages.get(normalized(requirement.name))
            version = wheel.version if wheel else system_version(requirement.name, loads)
            if version and not requirement.specifier.contains(version, prereleases=True):
                where = "" if wheel else " (the system's, no wheel)"
                problems.append(f"{requirement.name} {version}{where} is outside "
                                f"{requirement.specifier} that {name} {plugin.version} needs")
    return problems


def system_version(wheel: str, loads: list[Load]) -> str | None:
    """The version of the system library that serves for an absent nvidia wheel (cuDNN from the
    CUDA base image under jax[cuda12-local]), from its resolved file name."""
    module = re.fullmatch(r"nvidia-(.+)-cu\d+", wheel)
    names = {n for n, m in WHEEL_MODULE.items() if module and normalized(m) == module.group(1)}
    for load in loads:
        if load.name in names and load.path and "/nvidia/" not in load.path and load.version:
            return load.version if re.fullmatch(r"\d+(\.\d+)+", load.version) else None
    return None


def cpu_only_problems(packages: dict, env: dict[str, str]) -> list[str]:
    plugins = [n for n in packages if re.fullmatch(r"jax-cuda\d+-(plugin|pjrt)", n)]
    built_for_gpu = "CUDA_VERSION" in env or any(n.startswith("nvidia-") for n in packages)
    if built_for_gpu and not plugins:
        return ["a CUDA-enabled jaxlib is not installed in an image built for the GPU: JAX will "
                "say \"An NVIDIA GPU may be present on this machine, but a CUDA-enabled jaxlib "
                "is not installed. Falling back to cpu.\""]
    return []


def driver_problems(packages: dict, driver: str | None) -> list[tuple[bool, str]]:
    """(fatal, text): the CUDA runtime wheel against the driver's CUDA; ptxas newer than it."""
    found = []
    runtime = next((p for n, p in packages.items()
                    if re.fullmatch(r"nvidia-cuda-runtime-cu\d+", n)), None)
    if driver is None or runtime is None:
        return found
    runs, how = cuda_runs(_release(runtime.version)[:2], version_tuple(driver), None)
    if runs is False:
        found.append((True, f"{runtime.name} {runtime.version} needs a newer driver than "
                            f"{driver}: {how}"))
    nvcc = next((p for n, p in packages.items() if NVCC_WHEEL_RE.match(n)), None)
    host = cuda_for_driver(version_tuple(driver))
    if nvcc and host and _release(nvcc.version)[:2] > host:
        found.append((False, f"the NVIDIA driver's CUDA version is {version_text(host)} which is "
                             f"older than the ptxas CUDA version ({nvcc.version}): XLA disables "
                             "parallel compilation"))
    return found


def ptxas_problems(packages: dict, env: dict[str, str], view: MergedView) -> list[tuple[bool, str]]:
    """A `ptxas` on the image's PATH besides the nvidia-cuda-nvcc wheel's (jax#17976)."""
    nvcc = next((p for n, p in packages.items() if NVCC_WHEEL_RE.match(n)), None)
    if nvcc is None:
        return []
    for directory in (d for d in env.get("PATH", "").split(":") if d.startswith("/")):
        found = view.resolve(posixpath.join(directory, "ptxas").lstrip("/"))
        if found:
            return [(False, f"a ptxas on PATH (/{found}) besides {nvcc.name} {nvcc.version}'s: "
                            "which one XLA runs depends on its search, and an older one "
                            "miscompiles or fails")]
    return []


def _release(version: str) -> tuple[int, ...]:
    try:
        return Version(version).release
    except InvalidVersion:
        return ()
