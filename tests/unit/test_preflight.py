"""gpu-smoke's pre-flight: the static JAX-stack prediction in the smoke report before the
container starts, its cache per image ID (atomic, bounded, refusing a damaged entry), and the
prediction held against the libraries the model test's process really mapped."""

from __future__ import annotations

from envcheck.gpu_smoke import preflight
from envcheck.image.errors import SourceError
from envcheck.image.linker import Load
from envcheck.report import Check
from tests.gpu_host import FakeDocker, connect_to, healthy_host, model_report, predicted

SITE = "/usr/local/lib/python3.12/site-packages"
CUDNN = Load(name="libcudnn.so.9", path=f"{SITE}/nvidia/cudnn/lib/libcudnn.so.9",
             via="DT_RPATH of x", chain=[])
STACK = [Check("image.python", "pass", "9 Python package(s)"),
         Check("image.jax-stack", "fail", "jax 0.10.2: cuDNN too old", fix="pip install"),
         Check("image.jax-libraries", "pass", "all resolve")]


def inspector(calls: list, result=(STACK, [CUDNN])):
    def inspect(image_id, driver):
        calls.append((image_id, driver))
        if isinstance(result, Exception):
            raise result
        return result
    return inspect


def test_the_prediction_is_cached_per_image_and_driver(tmp_path):
    calls = []
    first = preflight.predict("sha256:aa", "590.48.01", inspector(calls), tmp_path)
    again = preflight.predict("sha256:aa", "590.48.01", inspector(calls), tmp_path)
    assert calls == [("sha256:aa", "590.48.01")]
    assert not first.cached and again.cached and again.checks == first.checks == STACK
    assert again.loads == [CUDNN]
    preflight.predict("sha256:aa", "550.54.15", inspector(calls), tmp_path)
    preflight.predict("sha256:bb", "590.48.01", inspector(calls), tmp_path)
    assert len(calls) == 3 and len(list(tmp_path.glob("*.json"))) == 3
    assert not list(tmp_path.glob(".entry-*"))  # no temp file left behind


def test_a_damaged_entry_is_made_again(tmp_path):
    calls = []
    preflight.predict("sha256:aa", None, inspector(calls), tmp_path)
    entry = next(tmp_path.glob("*.json"))
    entry.write_bytes(entry.read_bytes()[:40])  # a run killed mid-write, or a full disk
    assert not preflight.predict("sha256:aa", None, inspector(calls), tmp_path).cached
    assert len(calls) == 2


def test_the_cache_keeps_its_newest_entries(tmp_path, monkeypatch):
    monkeypatch.setattr(preflight, "CACHE_ENTRIES", 3)
    calls = []
    for n in range(5):
        preflight.predict(f"sha256:{n}", None, inspector(calls), tmp_path)
    assert len(list(tmp_path.glob("*.json"))) == 3
    preflight.predict("sha256:4", None, inspector(calls), tmp_path)
    assert len(calls) == 5  # the newest is still there


def test_an_image_that_cannot_be_read_is_a_skip_and_not_cached(tmp_path):
    calls = []
    failing = inspector(calls, SourceError("docker-daemon:sha256:aa: docker save failed"))
    result = preflight.predict("sha256:aa", None, failing, tmp_path)
    assert [(c.id, c.status) for c in result.checks] == [("image.jax-stack", "skip")]
    assert "docker save failed" in result.checks[0].summary
    assert not list(tmp_path.glob("*.json"))


def test_the_stack_is_judged_before_the_container_starts(tmp_path):
    """The prediction's checks sit right after image.requirement, ahead of the GPU probe
    container; its time is a stage of its own."""
    from envcheck.gpu_smoke import gpu_smoke

    docker = FakeDocker(model_out=model_report("gpu"))
    report = gpu_smoke(probe=healthy_host(tmp_path).probe, connect=connect_to(docker),
                       predict=predicted(STACK))
    ids = [c.id for c in report.checks]
    at = ids.index("image.requirement")
    assert ids[at + 1:at + 4] == ["image.python", "image.jax-stack", "image.jax-libraries"]
    assert ids.index("container.passthrough") > at + 3
    assert "preflight" in report.timings_s
    assert report.first_failed.id == "image.jax-stack" and report.verdict == "gpu"


def test_the_libraries_the_process_mapped_against_the_prediction(tmp_path):
    from envcheck.gpu_smoke import gpu_smoke

    def run(mapped: list[str]):
        report_json = model_report("gpu")
        report_json["device"]["mapped_libraries"] = mapped
        docker = FakeDocker(model_out=report_json)
        report = gpu_smoke(probe=healthy_host(tmp_path).probe, connect=connect_to(docker),
                           predict=predicted(loads=[CUDNN]))
        return {c.id: c for c in report.checks}.get("jax.libraries")

    assert run([CUDNN.path]).status == "pass"
    moved = run(["/usr/local/cuda/lib64/libcudnn.so.9.7.0"])
    assert moved.status == "warn" and moved.summary == (
        f"libcudnn.so.9: predicted {CUDNN.path} (DT_RPATH of x), but the process mapped "
        "/usr/local/cuda/lib64/libcudnn.so.9.7.0")
    assert run([]) is None  # the CPU fallback maps no CUDA library: nothing to compare
