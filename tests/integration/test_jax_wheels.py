"""The real JAX CUDA plugin wheels (jax-cuda12-plugin and jax-cuda12-pjrt 0.10.2, downloaded from
the package index once into ~/.cache/envcheck/wheels, as the Debian base image is cached),
unpacked into an image layer's site-packages: the layer scan's ELF facts of every shared object
equal `readelf -d`'s, and reading them costs a bounded amount of memory (the 480 MB
xla_cuda_plugin.so included), measured against the same layer scanned with no ELF reading."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from tests.conftest import IN_CI, REPO, require_binary
from tests.unit.test_elf import readelf

WHEELS = ("jax-cuda12-plugin==0.10.2", "jax-cuda12-pjrt==0.10.2")
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "envcheck" / "wheels"
SITE = "usr/local/lib/python3.11/site-packages"
SCAN = """
import json, sys
from envcheck.image import elf
from envcheck.image.layers import scan_layer
if sys.argv[2] == "off":
    elf.is_candidate = lambda path: False
with open(sys.argv[1], "rb") as blob:
    scan = scan_layer(blob, 0)
print(json.dumps({p: [f.soname, f.needed, f.rpath, f.runpath, f.problem]
                  for p, f in scan.elf.items()}))
"""


@pytest.fixture(scope="module")
def plugin_layer(tmp_path_factory) -> tuple[Path, Path]:
    """(the unpacked tree, a layer tar of it)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    if len(list(CACHE.glob("jax_cuda12_*-0.10.2-*.whl"))) < 2:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                               "-d", str(CACHE), *WHEELS], capture_output=True, text=True,
                              timeout=1200)
        if done.returncode != 0:
            message = f"cannot download {', '.join(WHEELS)}: {done.stderr.strip()[-300:]}"
            pytest.fail(message) if IN_CI else pytest.skip(message)
    root = tmp_path_factory.mktemp("plugin")
    for wheel in sorted(CACHE.glob("jax_cuda12_*-0.10.2-*.whl")):
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(root / SITE)
    layer = root.parent / "plugin-layer.tar"
    with tarfile.open(layer, "w") as tar:
        tar.add(root / "usr", arcname="usr")
    return root, layer


def scan(layer: Path, reading: str) -> tuple[dict, int]:
    """The ELF facts the scan read, and its peak RSS in KiB (GNU time's: a child forked from
    this pytest would start from pytest's own high-water mark)."""
    stats = layer.parent / f"time-{reading}.txt"
    done = subprocess.run([require_binary("time"), "-f", "%M", "-o", str(stats), sys.executable,
                           "-c", SCAN, str(layer), reading], capture_output=True, text=True,
                          cwd=REPO, timeout=600, check=True)
    return json.loads(done.stdout), int(stats.read_text().split()[-1])


def test_the_plugin_wheels_facts_are_readelfs(plugin_layer):
    root, layer = plugin_layer
    read, _ = scan(layer, "on")
    objects = sorted(str(p.relative_to(root)) for p in root.rglob("*.so*") if p.is_file())
    assert sorted(read) == objects and len(objects) >= 10
    plugin = f"{SITE}/jax_plugins/xla_cuda12/xla_cuda_plugin.so"
    assert (root / plugin).stat().st_size > 400e6
    for path in objects:
        soname, needed, rpath, runpath, problem = read[path]
        assert problem is None, (path, problem)
        assert (soname, needed, rpath, runpath) == readelf(root / path), path
    assert read[plugin][2][:2] == ["$ORIGIN/../../nvidia/cuda_cupti/lib",
                                   "$ORIGIN/../nvidia/cuda_cupti/lib"]  # DT_RPATH, not RUNPATH


def test_reading_them_costs_bounded_memory(plugin_layer):
    """The same layer scanned with the ELF reading on and off: the difference in peak RSS stays
    within the reader's bound (envcheck/image/elf.py: 2.25 MiB per file read) and noise."""
    _, layer = plugin_layer
    with_elf = min(scan(layer, "on")[1] for _ in range(2))
    without = min(scan(layer, "off")[1] for _ in range(2))
    print(f"peak RSS scanning the plugin layer: {with_elf / 1024:.1f} MiB with ELF facts, "
          f"{without / 1024:.1f} MiB without")
    assert with_elf - without <= 6 * 1024


def test_the_real_plugin_without_the_nvidia_wheels_finds_no_cuda(plugin_layer):
    """`pip install jax-cuda12-plugin` without its with-cuda extra: the plugin's DT_RPATH points
    into nvidia/*/lib, which is not there, and nothing else holds CUDA: every library XLA
    dlopens is not found, and the check says what JAX will say."""
    from envcheck.image import jaxstack
    from envcheck.image.filetree import MergedView
    from envcheck.image.layers import scan_layer

    _, layer = plugin_layer
    view = MergedView()
    with layer.open("rb") as blob:
        view.apply(scan_layer(blob, 0))
    plugin, loads = jaxstack.simulate(view, None, {}, "amd64", view.shared_objects())
    assert plugin == f"/{SITE}/jax_plugins/xla_cuda12/xla_cuda_plugin.so"
    assert [load.name for load in loads if load.path is None
            and load.name in jaxstack.WHEEL_MODULE] == list(jaxstack.DLOPENED)
    check = jaxstack.libraries_check(view, plugin, loads)
    assert check.status == "fail" and "Unable to load libcudart.so.12" in check.summary
