"""envcheck installed from its wheel into a fresh virtual environment, outside the checkout: what
commands read at run time (the Kubernetes manifests, the report schemas) comes with the package,
and `envcheck build`, which needs the project's sources as its build context, says so in one
line. The fresh venv reaches the test venv's dependencies through a .pth line (the editable
checkout there is not seen: .pth files of a path added that way are not read)."""

from __future__ import annotations

import shutil
import site
import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The bin/ folder of a fresh venv with only envcheck's wheel installed."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for package in ("envcheck", "model"):
        shutil.copytree(REPO / package, source / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w",
                    str(work / "dist"), str(source)], check=True, timeout=300)
    wheel = next((work / "dist").glob("envcheck-*.whl"))
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin/python"),
                    "install", "--no-deps", "--quiet", str(wheel)], check=True, timeout=300)
    packages = next(venv.glob("lib/python*/site-packages"))
    (packages / "test-venv-dependencies.pth").write_text("\n".join(site.getsitepackages()))
    return venv / "bin"


def run(bin_dir, *args, cwd):
    return subprocess.run([str(bin_dir / "envcheck"), *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def test_the_wheel_is_what_runs(installed, tmp_path):
    done = subprocess.run([str(installed / "python"), "-c", "import envcheck; "
                           "print(envcheck.__file__)"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=60)
    assert str(installed.parent) in done.stdout and str(REPO) not in done.stdout


def test_fleet_k8s_render_from_the_wheel(installed, tmp_path):
    done = run(installed, "fleet", "k8s", "render", "--kind", "job", "--image",
               "registry.example/envcheck:1", "--nodes", "3", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    docs = list(yaml.safe_load_all(done.stdout))
    assert [d["kind"] for d in docs] == ["Namespace", "Job"]
    assert docs[1]["spec"]["completions"] == 3
    pod = docs[1]["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == "registry.example/envcheck:1"


def test_the_schemas_come_with_the_wheel(installed, tmp_path):
    done = subprocess.run([str(installed / "python"), "-c", "from envcheck import schemas; "
                           "print(all(schemas.committed(s) == schemas.text(s) "
                           "for s in schemas.REPORTS))"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=60)
    assert done.stdout.strip() == "True", done.stderr


def test_build_from_the_wheel_says_it_needs_a_checkout(installed, tmp_path):
    done = run(installed, "build", "--jax-extra", "cpu", cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("Error: envcheck build ")
    assert "run it from a checkout of the envcheck repository" in done.stderr
