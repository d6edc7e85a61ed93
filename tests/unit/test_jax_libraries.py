"""image.jax-libraries: the libraries JAX's CUDA plugin loads, resolved as glibc's loader would,
on trees of gcc-built stand-ins with the real SONAMEs and dynamic tags (scripts/jax_image.py).
The oracle is glibc itself: the same tree loaded for real by a Python that does what the plugin's
`__init__.py` does (the wheels' libraries by path, then the plugin, whose constructor dlopens
what XLA dlopens), under `LD_DEBUG=libs`; every CUDA library it maps must be the file predicted."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from envcheck.image import jaxstack
from envcheck.image.filetree import MergedView
from envcheck.image.layers import scan_layer
from scripts.jax_image import SITE, SYSTEM, build_tree
from tests.conftest import require_binary

DRIVER = """
import ctypes, pathlib, sys
root, preload = sys.argv[1], sys.argv[2:]
for path in preload:
    ctypes.CDLL(path)
ctypes.CDLL(root + "/SITE/jax_plugins/xla_cuda12/xla_cuda_plugin.so")
""".replace("SITE", SITE)


def tree(tmp_path: Path, **options) -> Path:
    require_binary("gcc")
    root = tmp_path / "root"
    build_tree(root, **options)
    return root


def predicted(root: Path, env: dict[str, str]):
    """The simulation on `root` as one image layer."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        tar.add(root, arcname=".")
    view = MergedView()
    view.apply(scan_layer(io.BytesIO(raw.getvalue()), 0))
    simulated = jaxstack.simulate(view, None, env, "amd64", view.shared_objects())
    check = jaxstack.libraries_check(view, *(simulated or (None, [])))
    return simulated, check


def glibc_maps(root: Path, env: dict[str, str]) -> dict[str, str]:
    """name -> image path of every library of `root` glibc's loader mapped, for real."""
    preload = [str(root / SITE / "nvidia" / module / "lib" / name)
               for module, name in jaxstack.PRELOAD
               if (root / SITE / "nvidia" / module / "lib" / name).exists()]
    ld_path = ":".join(str(root) + d for d in env.get("LD_LIBRARY_PATH", "").split(":") if d)
    done = subprocess.run([sys.executable, "-c", DRIVER, str(root), *preload],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "LD_DEBUG": "libs", "LD_LIBRARY_PATH": ld_path})
    mapped = [os.path.normpath(p) for p in re.findall(r"calling init: (\S+)", done.stderr)]
    return {os.path.basename(p): p[len(str(root)):] for p in mapped
            if p.startswith(str(root)) and os.path.basename(p) in jaxstack.WHEEL_MODULE}


def resolved(simulated) -> dict[str, str]:
    """name -> path of the first resolution of each CUDA library the simulation made."""
    found = {}
    for load in simulated[1]:
        if load.path and load.name in jaxstack.WHEEL_MODULE:
            found.setdefault(load.name, load.path)
    return found


def test_a_clean_pip_stack_loads_the_wheels_copies(tmp_path):
    root = tree(tmp_path)
    simulated, check = predicted(root, {})
    assert check.status == "pass", check
    assert resolved(simulated) == {os.path.basename(p): p for p in glibc_maps(root, {}).values()}
    assert resolved(simulated)["libnvJitLink.so.12"] == (
        f"/{SITE}/nvidia/nvjitlink/lib/libnvJitLink.so.12")
    load = next(x for x in simulated[1] if x.name == "libnvJitLink.so.12")
    assert load.via.startswith("DT_RUNPATH of /") and "cusparse" in load.via or (
        load.via.startswith("DT_RUNPATH of /") and "cusolver" in load.via)


def test_ld_library_path_shadows_nvjitlink_under_runpath(tmp_path):
    """jax#28929: libcusparse's RUNPATH comes after LD_LIBRARY_PATH, so an older system
    libnvJitLink.so.12 there is what loads."""
    root = tree(tmp_path, system=("libnvJitLink.so.12",))
    env = {"LD_LIBRARY_PATH": f"/{SYSTEM}"}
    simulated, check = predicted(root, env)
    assert resolved(simulated)["libnvJitLink.so.12"] == f"/{SYSTEM}/libnvJitLink.so.12"
    assert glibc_maps(root, env)["libnvJitLink.so.12"] == f"/{SYSTEM}/libnvJitLink.so.12"
    assert check.status == "fail" and check.summary.startswith(
        f"libnvJitLink.so.12 resolves to /{SYSTEM}/libnvJitLink.so.12 (via LD_LIBRARY_PATH), "
        f"not the /{SITE}/nvidia/nvjitlink/lib/libnvJitLink.so.12 of its nvidia wheel")
    assert "LD_LIBRARY_PATH" in check.fix


def test_rpath_comes_before_ld_library_path(tmp_path):
    """The same tree with the wheels' tags as DT_RPATH: it wins over LD_LIBRARY_PATH."""
    root = tree(tmp_path, system=("libnvJitLink.so.12",), rpath_wheels=True)
    env = {"LD_LIBRARY_PATH": f"/{SYSTEM}"}
    simulated, check = predicted(root, env)
    expected = f"/{SITE}/nvidia/nvjitlink/lib/libnvJitLink.so.12"
    assert resolved(simulated)["libnvJitLink.so.12"] == expected
    assert glibc_maps(root, env)["libnvJitLink.so.12"] == expected
    assert check.status == "pass"


def test_a_missing_wheel_is_found_on_the_system_or_not_at_all(tmp_path):
    root = tree(tmp_path, missing=("cudnn",))
    simulated, check = predicted(root, {})
    assert "libcudnn.so.9" not in glibc_maps(root, {})
    assert check.status == "fail" and check.summary.startswith(
        "libcudnn.so.9 is not found (asked for by xla_cuda_plugin.so)")
    assert "Unable to load libcudnn.so.9. Is it installed?" in check.summary


def test_a_missing_wheel_on_ld_library_path_is_no_shadowing(tmp_path):
    root = tree(tmp_path, missing=("cudnn",), system=("libcudnn.so.9",))
    env = {"LD_LIBRARY_PATH": f"/{SYSTEM}"}
    simulated, check = predicted(root, env)
    assert resolved(simulated)["libcudnn.so.9"] == f"/{SYSTEM}/libcudnn.so.9"
    assert glibc_maps(root, env)["libcudnn.so.9"] == f"/{SYSTEM}/libcudnn.so.9"
    assert check.status == "pass"


def test_an_image_without_the_plugin_is_skipped(tmp_path):
    root = tmp_path / "root"
    (root / SITE).mkdir(parents=True)
    simulated, check = predicted(root, {})
    assert simulated is None and check.status == "skip"


@pytest.mark.parametrize("path, python, version", [
    (f"/{SITE}/nvidia/cudnn/lib/libcudnn.so.9", True, "nvidia-cudnn-cu12 9.7.0.66"),
    (f"/{SYSTEM}/libcudnn.so.9.7.0", False, "9.7.0"),
    ("/usr/lib/libfoo.so", False, None),
])
def test_a_library_version_comes_from_its_wheel_or_its_name(path, python, version):
    from envcheck.image.python import PythonFacts, PythonPackage

    facts = PythonFacts(packages=[PythonPackage(
        name="nvidia-cudnn-cu12", version="9.7.0.66", location=f"/{SITE}", metadata="x")])
    assert jaxstack.library_version(path, facts if python else None) == version


def test_an_older_system_cudnn_part_shadows_the_wheels_through_ld_library_path(tmp_path):
    """libcudnn.so.9 itself comes from the wheel (preloaded by path), but it dlopens its parts
    by name, and its RUNPATH comes after LD_LIBRARY_PATH: the system's part is what loads."""
    root = tree(tmp_path, system=("libcudnn_graph.so.9",))
    env = {"LD_LIBRARY_PATH": f"/{SYSTEM}"}
    simulated, check = predicted(root, env)
    assert resolved(simulated)["libcudnn.so.9"] == f"/{SITE}/nvidia/cudnn/lib/libcudnn.so.9"
    assert resolved(simulated)["libcudnn_graph.so.9"] == f"/{SYSTEM}/libcudnn_graph.so.9"
    assert glibc_maps(root, env)["libcudnn_graph.so.9"] == f"/{SYSTEM}/libcudnn_graph.so.9"
    assert check.status == "fail" and check.summary.startswith("libcudnn_graph.so.9 resolves to")


def test_a_loop_of_needed_libraries_ends():
    """A needs B and B needs A (or an RPATH chain that comes back): each SONAME is loaded once,
    as ld.so reuses a loaded object."""
    from envcheck.image.elf import ElfFacts
    from envcheck.image.linker import Loader

    view = MergedView()
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name in ("libA.so.1", "libB.so.1"):
            tar.addfile(tarfile.TarInfo(f"usr/lib/{name}"), io.BytesIO(b""))
    view.apply(scan_layer(io.BytesIO(raw.getvalue()), 0))
    facts = {f"/usr/lib/{a}": ElfFacts(path=f"/usr/lib/{a}", layer=0, elf_class=64, machine=62,
                                      soname=a, needed=[b], rpath=["$ORIGIN", "$ORIGIN/.."])
             for a, b in (("libA.so.1", "libB.so.1"), ("libB.so.1", "libA.so.1"))}
    loader = Loader(view=view, cache=None, ld_library_path=[], arch="amd64", elf=facts)
    loader.open_path("/usr/lib/libA.so.1", chain=[])
    assert [(load.name, load.via) for load in loader.loads] == [
        ("/usr/lib/libA.so.1", "path"), ("libB.so.1", "DT_RPATH of /usr/lib/libA.so.1"),
        ("libA.so.1", "loaded")]
