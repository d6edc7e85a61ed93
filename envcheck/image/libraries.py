"""Where the dynamic loader would find the CUDA libraries in an image, without running it:
LD_LIBRARY_PATH, then /etc/ld.so.cache (ldcache.py), then the default directories, on the merged
view of the layers; the link-time stubs and the forward-compatibility libcuda it ships."""

from __future__ import annotations

import posixpath

from envcheck.image import ldcache
from envcheck.image.filetree import MergedView
from envcheck.image.report import CudaFiles, LibraryResolution
from envcheck.report import Check

LIBRARIES = ("libcuda.so.1", "libcudart.so.12", "libcudnn.so.9", "libnvidia-ml.so.1")
DRIVER_LIBRARIES = ("libcuda.so.1", "libnvidia-ml.so.1")  # belong to the host driver
AT_RUN_TIME = ("at run time the NVIDIA Container Toolkit mounts the host driver's copy into the "
               "container's library directory and refreshes ld.so.cache; an image never ships it")
DEFAULT_DIRS = {"amd64": ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib64",
                          "usr/lib64", "lib", "usr/lib"),
                "arm64": ("lib/aarch64-linux-gnu", "usr/lib/aarch64-linux-gnu", "lib", "usr/lib")}


def explain_library(soname: str, view: MergedView, cache: ldcache.LdCache | None,
                    env: dict[str, str], arch: str) -> LibraryResolution:
    """Where ld.so would find `soname` in this image, step by step, as it searches."""
    steps, found, via = [], None, None
    for directory in [d for d in env.get("LD_LIBRARY_PATH", "").split(":") if d]:
        target = view.resolve(posixpath.join(directory, soname))
        if target and not found:
            found, via = "/" + target, "LD_LIBRARY_PATH"
        where = "/" + target if target else (
            "not there" if view.resolve(directory) else "directory absent in the image")
        steps.append(f"LD_LIBRARY_PATH {directory}: {where}")
    entries = cache.lookup(soname, arch) if cache else []
    for entry in entries:
        present = view.resolve(entry.path)
        steps.append(f"ld.so.cache: {entry.path}" + ("" if present else " (missing file)"))
        if present and not found:
            found, via = entry.path, "ld.so.cache"
    if not entries:
        steps.append("ld.so.cache: no entry" if cache else "ld.so.cache: none in the image")
    for directory in DEFAULT_DIRS.get(arch, ()):
        target = view.resolve(posixpath.join(directory, soname))
        if target and not found:
            found, via = "/" + target, "default directory"
            steps.append(f"default directory /{directory}: /{target}")
    at_run_time = AT_RUN_TIME if soname in DRIVER_LIBRARIES and not found else None
    return LibraryResolution(soname=soname, resolves_to=found, via=via, steps=steps,
                             at_run_time=at_run_time)


def cuda_files(view: MergedView, env: dict[str, str]) -> CudaFiles:
    # A file reached through a symlink (/usr/local/cuda -> cuda-12.8) is named once, by its
    # real path: it is one library, not two.
    stubs = sorted({"/" + (view.resolve(p) or p) for p, _ in view.glob("**/stubs/libcuda.so*")})
    compat = sorted({"/" + (view.resolve(p) or p) for p, info in
                     view.glob("usr/local/cuda*/compat/libcuda.so.*.*") if info.kind == "file"})
    on_path = [d for d in env.get("LD_LIBRARY_PATH", "").split(":") if "stubs" in d]
    return CudaFiles(stubs=stubs, compat=compat, stubs_on_ld_library_path=on_path,
                     usr_local_cuda=view.resolve("usr/local/cuda") is not None,
                     compat_dir=view.resolve("usr/local/cuda/compat") is not None)


def library_checks(libraries: list[LibraryResolution], files: CudaFiles) -> list[Check]:
    checks = []
    libcuda = libraries[0]
    if files.stubs_on_ld_library_path:
        checks.append(Check(
            "image.libcuda-stubs", "fail",
            f"LD_LIBRARY_PATH includes {', '.join(files.stubs_on_ld_library_path)}: the "
            "link-time stub libcuda.so would shadow the real driver",
            fix="remove the stubs directory from LD_LIBRARY_PATH (use LIBRARY_PATH for linking)"))
    if libcuda.resolves_to and "compat" not in libcuda.resolves_to:
        checks.append(Check(
            "image.libcuda", "warn",
            f"the image ships its own libcuda.so.1 ({libcuda.resolves_to}, via "
            f"{libcuda.via}): it must match the host driver exactly",
            fix="remove driver libraries from the image; the Container Toolkit mounts the "
                "host's libcuda.so.1 at run time"))
    else:
        checks.append(Check(
            "image.libcuda", "pass",
            "no libcuda.so.1 in the image: at run time the NVIDIA Container Toolkit mounts the "
            "host driver's and refreshes ld.so.cache" + (
                f"; compat {', '.join(files.compat)} is used only on older drivers"
                if files.compat else "")))
    return checks


def read_ldcache(view: MergedView) -> tuple[ldcache.LdCache | None, Check]:
    data = view.kept.get("etc/ld.so.cache")
    if data is None:
        return None, Check("image.ldcache", "warn", "the image has no /etc/ld.so.cache",
                           fix="run ldconfig in the image build so libraries resolve by cache")
    try:
        cache = ldcache.parse(data)
    except ldcache.LdCacheError as error:
        return None, Check("image.ldcache", "fail", f"/etc/ld.so.cache is malformed: {error}",
                           fix="rerun ldconfig in the image build")
    return cache, Check("image.ldcache", "pass",
                        f"/etc/ld.so.cache ({cache.format} format): {len(cache.entries)} entries")
