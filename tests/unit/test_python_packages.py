"""image.python: the Python packages of an image read from its layers — real METADATA files of
the JAX stack's wheels (tests/fixtures/python, SOURCES.md there) in a venv and in Debian's
dist-packages, a later layer uninstalling one (whiteouts), and damaged metadata."""

from __future__ import annotations

import io
import tarfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from envcheck.image import layers, python
from envcheck.image.filetree import MergedView
from envcheck.image.layers import scan_layer
from tests.conftest import REPO

FIXTURES = REPO / "tests/fixtures/python"
VENV = "opt/venv/lib/python3.12/site-packages"
SYSTEM = "usr/lib/python3/dist-packages"


def metadata(dist_info: str) -> bytes:
    return (FIXTURES / dist_info / "METADATA").read_bytes()


def layer(*files: tuple[str, bytes], whiteouts: tuple[str, ...] = ()) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, body in files:
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
        for path in whiteouts:
            head, _, base = path.rpartition("/")
            tar.addfile(tarfile.TarInfo(f"{head}/.wh.{base}"), io.BytesIO(b""))
    return raw.getvalue()


def merged(*blobs: bytes) -> MergedView:
    view = MergedView()
    for index, blob in enumerate(blobs):
        view.apply(scan_layer(io.BytesIO(blob), index))
    return view


STACK = ("jax-0.10.2.dist-info", "jaxlib-0.10.2.dist-info", "jax_cuda12_plugin-0.10.2.dist-info",
         "jax_cuda12_pjrt-0.10.2.dist-info", "nvidia_cublas_cu12-12.8.3.14.dist-info",
         "nvidia_cudnn_cu12-9.7.0.66.dist-info")


def test_the_jax_stack_of_a_venv_and_the_system_packages():
    venv = layer(*((f"{VENV}/{d}/METADATA", metadata(d)) for d in STACK),
                 (f"{VENV}/jax/__init__.py", b""))
    system = layer((f"{SYSTEM}/six-1.16.0.egg-info", b"Metadata-Version: 1.1\nName: six\n"
                                                      b"Version: 1.16.0\n"),
                   (f"{SYSTEM}/Requests.egg-info/PKG-INFO", b"Name: Requests\nVersion: 2.28.1\n"))
    facts, check = python.python_facts(merged(system, venv).kept)
    assert [(p.name, p.version) for p in facts.packages] == [
        ("jax", "0.10.2"), ("jax-cuda12-pjrt", "0.10.2"), ("jax-cuda12-plugin", "0.10.2"),
        ("jaxlib", "0.10.2"), ("nvidia-cublas-cu12", "12.8.3.14"), ("nvidia-cudnn-cu12",
                                                                    "9.7.0.66"),
        ("requests", "2.28.1"), ("six", "1.16.0")]
    by_name = {p.name: p for p in facts.packages}
    assert by_name["jax"].location == f"/{VENV}" and by_name["six"].location == f"/{SYSTEM}"
    assert by_name["requests"].metadata == f"/{SYSTEM}/Requests.egg-info/PKG-INFO"
    plugin = by_name["jax-cuda12-plugin"].requires
    assert "jax-cuda12-pjrt==0.10.2" in plugin
    assert any(r.startswith("nvidia-cudnn-cu12<10.0,>=9.8") for r in plugin), plugin
    assert by_name["nvidia-cudnn-cu12"].requires == []  # Requires-Dist only for the JAX family
    assert check.status == "pass" and check.summary == (
        "8 Python package(s) in 2 location(s); jax 0.10.2, jax-cuda12-pjrt 0.10.2, "
        "jax-cuda12-plugin 0.10.2, jaxlib 0.10.2")


def test_a_package_uninstalled_in_a_later_layer_is_gone():
    dist_info = f"{VENV}/jaxlib-0.10.2.dist-info"
    base = layer((f"{dist_info}/METADATA", metadata("jaxlib-0.10.2.dist-info")),
                 (f"{VENV}/jax-0.10.2.dist-info/METADATA", metadata("jax-0.10.2.dist-info")))
    facts, _ = python.python_facts(merged(base, layer(whiteouts=(dist_info,))).kept)
    assert [p.name for p in facts.packages] == ["jax"]


def test_only_the_headers_of_a_metadata_file_are_held():
    """jax's METADATA carries its README after the headers (13 KB): the scan keeps the
    headers alone, and still every Requires-Dist."""
    whole = metadata("jax-0.10.2.dist-info")
    kept = merged(layer((f"{VENV}/jax-0.10.2.dist-info/METADATA", whole))).kept
    held = kept[f"{VENV}/jax-0.10.2.dist-info/METADATA"]
    assert len(held) < len(whole) / 2 and whole.startswith(held) and b"\n\n" not in held
    package = python.read_package(f"{VENV}/jax-0.10.2.dist-info/METADATA", held)
    assert package.requires == [line.split(": ", 1)[1] for line in whole.decode().splitlines()
                                if line.startswith("Requires-Dist: ")]


def test_metadata_elsewhere_is_not_a_package():
    view = merged(layer(("opt/src/jax-0.10.2.dist-info/METADATA", b"Name: jax\nVersion: 1\n"),
                        (f"{VENV}/jax-0.10.2.dist-info/RECORD", b"x")))
    facts, check = python.python_facts(view.kept)
    assert facts.packages == [] and check.status == "skip"


@pytest.mark.parametrize("body, said", [
    (b"Name: jax\nVersion: 0.4\xff\n", "METADATA: not UTF-8"),
    (b"Metadata-Version: 2.1\nName: jax\n", "METADATA: no Version header"),
    (b"Version: 1.0\n", "METADATA: no Name header"),
])
def test_damaged_metadata_is_a_warning_naming_the_file(body, said):
    view = merged(layer((f"{VENV}/jax-0.4.dist-info/METADATA", body),
                        (f"{VENV}/six-1.16.0.dist-info/METADATA", b"Name: six\nVersion: 1.16.0\n")))
    facts, check = python.python_facts(view.kept)
    assert [p.name for p in facts.packages] == ["six"]
    assert facts.unreadable == [f"/{VENV}/jax-0.4.dist-info/{said}"]
    assert check.status == "warn" and f"/{VENV}/jax-0.4.dist-info/{said}" in check.summary
    assert "--force-reinstall" in check.fix


def test_the_layers_budget_for_kept_files_counts_metadata(monkeypatch):
    monkeypatch.setattr(layers, "KEEP_TOTAL_MAX", 2000)
    files = [(f"{VENV}/p{i}-1.dist-info/METADATA", b"Name: p\nVersion: 1\n" + b"X: y\n" * 200)
             for i in range(2)]
    with pytest.raises(layers.LayerError, match="p1-1.dist-info/METADATA: .*Python package "
                                                "metadata files come to over 2000 bytes"):
        merged(layer(*files))


@settings(max_examples=500, deadline=None, database=None)
@given(st.binary(max_size=300) | st.builds(
    lambda cut, flips: bytes(b ^ f for b, f in zip(
        metadata("jax_cuda12_plugin-0.10.2.dist-info")[:cut], flips + bytes(cut), strict=False)),
    st.integers(0, 2100), st.binary(max_size=40)))
def test_any_metadata_bytes_give_a_package_or_a_reason(data):
    found = python.read_package(f"{VENV}/x-1.dist-info/METADATA", python.headers_only(data))
    assert isinstance(found, python.PythonPackage) or found.startswith(f"/{VENV}/x-1.dist-info")
