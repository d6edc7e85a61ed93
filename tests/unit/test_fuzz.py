"""Hostile input, generated: the ld.so.cache reader, the manifest/index/config path, the
NVIDIA_REQUIRE_CUDA and reference parsers, the layer stream (tar in gzip/zstd/plain), the
text parsers of the GPU-host probes and fleet's reading of node reports. Inputs are real files
mutated (byte flips, truncation, insertion) or structured JSON; the only failure allowed is
each parser's documented error type, with a message.

Default run: 2,000 cases per parser. The slow tier:
    pytest -m fuzz_slow tests/unit/test_fuzz.py        # 100,000 cases per parser
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from envcheck.fleet.aggregate import from_report, parse_report, summarize
from envcheck.host.nvml import parse_query_csv
from envcheck.image import ldcache, reference
from envcheck.image.blobstream import zstd_module
from envcheck.image.errors import SourceError
from envcheck.image.inspect import resolve
from envcheck.image.layers import LayerError, scan_layer
from envcheck.image.sources import TopLevel
from envcheck.nvidia import cuda
from envcheck.nvidia.catalog import classify
from envcheck.nvidia.driver import parse_driver_version
from envcheck.report import to_json
from scripts.cuda_image import REQUIRE
from tests.conftest import REPO, planted

TIERS = [pytest.param(2_000, id="default"),
         pytest.param(100_000, id="slow", marks=pytest.mark.fuzz_slow)]
REAL = REPO / "tests/fixtures/real"


def run(examples: int, strategy, check) -> None:
    """Run `check` on `examples` generated inputs (no deadline: CI machines are slow)."""
    limited = settings(max_examples=examples, deadline=None, database=None,
                       suppress_health_check=list(HealthCheck))
    limited(given(strategy)(check))()


def parsed(error_type, call, *args, prefix: str = ""):
    """call(*args); None when it raised the documented error type, whose message must be
    non-empty (and start with `prefix`). Any other exception fails the case."""
    try:
        return call(*args)
    except error_type as error:
        assert str(error) and str(error).startswith(prefix), error
        return None


def mutated(seed: bytes) -> st.SearchStrategy[bytes]:
    """`seed` with up to 8 byte edits, an optional insertion and an optional truncation."""
    size = max(len(seed), 1)
    edit = st.tuples(st.integers(0, size - 1), st.integers(0, 255))
    return st.builds(_apply, st.just(seed), st.lists(edit, max_size=8),
                     st.one_of(st.none(), st.tuples(st.integers(0, size), st.binary(max_size=64))),
                     st.one_of(st.none(), st.integers(0, size)))


def _apply(seed: bytes, edits, insertion, cut) -> bytes:
    data = bytearray(seed)
    for offset, value in edits:
        if offset < len(data):
            data[offset] = value
    if insertion is not None:
        data[insertion[0]:insertion[0]] = insertion[1]
    return bytes(data[:cut] if cut is not None else data)


def _ldconfig_cache() -> bytes:
    for path in (Path("/etc/ld.so.cache"),):
        if path.is_file():
            return path.read_bytes()[:200_000]
    return ldcache.NEW_MAGIC + b"\0" * 64


@pytest.mark.parametrize("examples", TIERS)
def test_ldcache_reader(examples):
    seed = _ldconfig_cache()

    def check(data: bytes) -> None:
        cache = parsed(ldcache.LdCacheError, ldcache.parse, data)
        for entry in cache.entries[:50] if cache else []:
            assert isinstance(entry.soname, str) and isinstance(entry.path, str)

    run(examples, st.one_of(mutated(seed), st.binary(max_size=256)), check)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                    | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=20)
MANIFEST = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"digest": "sha256:" + "c" * 64, "size": 10},
            "layers": [{"digest": "sha256:" + "1" * 64, "size": 20}]}
INDEX = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
         "manifests": [{"digest": "sha256:" + "a" * 64,
                        "platform": {"os": "linux", "architecture": "amd64"}}]}


class FuzzSource:
    """An ImageSource whose top object and config are whatever the fuzzer made."""

    description = "fuzz:image"

    def __init__(self, top: dict, config):
        self._top, self._config = top, config

    def top(self) -> TopLevel:
        return TopLevel(self._top, str(self._top.get("mediaType", "")), None)

    def manifest(self, digest: str) -> TopLevel:
        return TopLevel(MANIFEST, MANIFEST["mediaType"], digest)

    def json_blob(self, digest: str) -> dict:
        if not isinstance(self._config, dict):
            raise SourceError(f"{self.description}: expected a JSON object")
        return self._config


def _graft(base: dict, key: str, value) -> dict:
    return {**base, key: value}


@pytest.mark.parametrize("examples", TIERS)
def test_manifest_index_and_config(examples):
    keys = st.sampled_from(["config", "layers", "manifests", "mediaType", "schemaVersion"])
    tops = st.one_of(st.dictionaries(st.text(max_size=12), JSON, max_size=5),
                     st.builds(_graft, st.sampled_from([MANIFEST, INDEX]), keys, JSON))
    configs = st.one_of(JSON, st.builds(_graft, st.just({"os": "linux", "rootfs": {}}),
                                        st.sampled_from(["config", "rootfs", "os"]), JSON))

    def check(top_and_config) -> None:
        parsed(SourceError, resolve, FuzzSource(*top_and_config), "linux/amd64",
               prefix="fuzz:image")

    run(examples, st.tuples(tops, configs), check)


@pytest.mark.parametrize("examples", TIERS)
def test_fleet_reads_any_node_report(examples):
    """A node's smoke/v1 report with any JSON value anywhere fleet reads: a row (reported or
    no-report), and a fleet report its schema accepts; never an exception."""
    import jsonschema

    fleet_schema = jsonschema.Draft202012Validator(
        json.loads((REPO / "envcheck/data/schemas/fleet.v1.json").read_text()))
    seed = json.loads((REPO / "tests/fixtures/fleet/smoke_cpu-fallback_container.json")
                      .read_text())
    paths = st.sampled_from([
        "verdict", "checks", "first_failed", "first_failed.id", "first_failed.summary", "node",
        "node.name", "node.cuda_visible_devices", "host", "host.driver", "host.gpus", "device",
        "device.backend", "device.device_count", "timings_s", "timings_s.model"])
    check_values = st.lists(st.one_of(JSON, st.fixed_dictionaries(
        {"id": st.one_of(st.text(max_size=8), JSON), "fix": JSON})), max_size=3)

    def check(case) -> None:
        path, value, checks = case
        report = planted(seed, path, value)
        if checks is not None:
            report["checks"] = checks
        row = from_report("n1", report)
        assert row.status in ("reported", "no-report")
        fleet_schema.validate(to_json(summarize([row], "slurm")))

    run(examples, st.tuples(paths, JSON, st.one_of(st.none(), check_values)), check)


@pytest.mark.parametrize("examples", [pytest.param(200, id="default"),
                                      pytest.param(20_000, id="slow", marks=pytest.mark.fuzz_slow)])
def test_gpu_smoke_reads_any_model_report(examples, tmp_path):
    """The model test's report with any JSON value anywhere gpu-smoke reads: a report its
    schema accepts and text that renders (a `model.run` fail where the report is not one this
    envcheck reads); never an exception. Fewer cases: each runs the whole chain (27 ms)."""
    import jsonschema
    from rich.console import Console

    from envcheck.gpu_smoke import gpu_smoke
    from envcheck.gpu_smoke.render import render_smoke
    from tests.gpu_host import FakeDocker, connect_to, healthy_host, model_report, predicted

    smoke_schema = jsonschema.Draft202012Validator(
        json.loads((REPO / "envcheck/data/schemas/smoke.v1.json").read_text()))
    host, seed = healthy_host(tmp_path), model_report("gpu")
    paths = st.sampled_from([
        "impl", "impl_used", "checks", "timings_s", "timings_s.forward", "timings_s.generate",
        "device", "device.backend", "device.device_kind", "device.device_count", "throughput",
        "throughput.achieved_tflops", "throughput.matmul_bf16_tflops", "checks.0.id",
        "checks.1.status", "checks.1.summary", "checks.1.fix", "checks.1.max_abs_diff",
        "checks.1.tolerance", "checks.2.tokens_per_s", "checks.3.implementations", "schema"])

    def check(case) -> None:
        path, value = case
        docker = FakeDocker(model_out=planted(seed, path, value))
        report = gpu_smoke(probe=host.probe, connect=connect_to(docker), predict=predicted())
        smoke_schema.validate(json.loads(json.dumps(report.to_json())))
        render_smoke(report, Console(file=io.StringIO(), width=200))

    run(examples, st.tuples(paths, JSON), check)


@pytest.mark.parametrize("examples", [pytest.param(200, id="default"),
                                      pytest.param(20_000, id="slow", marks=pytest.mark.fuzz_slow)])
def test_gpu_smoke_reads_any_daemon_json_cdi_spec_and_docker_info(examples, tmp_path):
    """The real daemon.json, CDI spec and `docker info` (GET /info: another engine version, or
    podman's Docker-compatible API, answers it) with any JSON value at a field gpu-smoke reads:
    a report its schema accepts and text that renders; never an exception."""
    import jsonschema
    import yaml
    from rich.console import Console

    from envcheck.gpu_smoke import gpu_smoke
    from envcheck.gpu_smoke.render import render_smoke
    from tests.gpu_host import FakeDocker, cdi_spec, connect_to, healthy_host, predicted

    smoke_schema = jsonschema.Draft202012Validator(
        json.loads((REPO / "envcheck/data/schemas/smoke.v1.json").read_text()))
    host = healthy_host(tmp_path)
    daemon_json = json.loads((host.root / "etc/docker/daemon.json").read_text())
    spec, info = yaml.safe_load(cdi_spec()), FakeDocker().info()
    seeds = {"daemon.json": daemon_json, "cdi": spec, "info": info}
    paths = st.sampled_from([("daemon.json", p) for p in (
        "runtimes", "runtimes.nvidia", "runtimes.nvidia.path", "runtimes.nvidia.args",
        "default-runtime", "features", "features.cdi", "cdi-spec-dirs")] + [("cdi", p) for p in (
        "cdiVersion", "kind", "devices", "devices.0", "devices.0.name",
        "devices.0.containerEdits", "devices.0.containerEdits.deviceNodes", "containerEdits",
        "containerEdits.deviceNodes", "containerEdits.hooks", "containerEdits.hooks.0.args",
        "containerEdits.mounts", "containerEdits.env")] + [("info", p) for p in (
        "ServerVersion", "Runtimes", "Runtimes.nvidia", "DefaultRuntime", "CgroupDriver",
        "CgroupVersion", "CDISpecDirs", "DiscoveredDevices", "SecurityOptions",
        "OperatingSystem", "DockerRootDir")])

    def check(case) -> None:
        (document, path), value = case
        now = {**seeds, document: planted(seeds[document], path, value)}
        host.write("/etc/docker/daemon.json", json.dumps(now["daemon.json"]))
        host.write("/etc/cdi/nvidia.yaml", yaml.safe_dump(now["cdi"]))
        docker = FakeDocker()
        docker.info = lambda: now["info"]
        report = gpu_smoke(probe=host.probe, connect=connect_to(docker), predict=predicted())
        smoke_schema.validate(json.loads(json.dumps(report.to_json())))
        render_smoke(report, Console(file=io.StringIO(), width=200))

    run(examples, st.tuples(paths, JSON), check)


@pytest.mark.parametrize("examples", TIERS)
def test_nvidia_require_cuda(examples):
    tokens = st.sampled_from(["cuda", "driver", "brand", "arch", ">=", "<", "=", ",", " ",
                              "12.8", "470", "tesla", "x", "", ".", "9" * 30])

    def check(text: str) -> None:
        alternatives = parsed(cuda.RequirementError, cuda.parse_requirement, text)
        for driver in ((550, 54, 14), (570, 124, 6), (400,)) if alternatives is not None else ():
            cuda.evaluate(alternatives, driver, None)

    words = st.lists(tokens, max_size=12).map("".join)
    run(examples, st.one_of(words, st.text(max_size=60),
                            mutated(REQUIRE.encode()).map(lambda b: b.decode("latin-1"))), check)


@pytest.mark.parametrize("examples", TIERS)
def test_image_references(examples):
    seeds = ["nvidia/cuda:12.8.0-cudnn-devel-ubuntu24.04", "docker://localhost:5000/x@sha256:"
             + "a" * 64, "oci:/tmp/layout:tag", "docker-archive:/tmp/x.tar"]

    def check(text: str) -> None:
        ref = parsed(reference.RefSyntaxError, reference.parse, text)
        assert ref is None or ref.transport

    mutations = st.sampled_from(seeds).flatmap(
        lambda s: mutated(s.encode()).map(lambda b: b.decode("latin-1")))
    run(examples, st.one_of(st.text(max_size=80), mutations), check)


@pytest.mark.parametrize("examples", TIERS)
def test_probe_text_parsers_never_raise(examples):
    seeds = [(REAL / name).read_bytes() for name in (
        "nvidia-smi-query-gpu-allfields_h100_590.csv.txt",
        "proc-driver-nvidia-version_565-open.txt",
        "docker-run-gpus_could-not-select-device-driver.txt")]

    def check(data: bytes) -> None:
        text = data.decode("utf-8", "replace")
        parse_query_csv(text)
        parse_driver_version(text)
        entry, matched = classify(text)
        assert entry.fix and isinstance(matched, str)
        assert parse_report(text) is None or isinstance(parse_report(text), dict)

    run(examples, st.sampled_from(seeds).flatmap(mutated), check)


def _layer_seeds() -> list[bytes]:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, body in (("etc/ld.so.conf", b"/usr/local/lib\n"), ("usr/lib/libx.so.1", b"x")):
            info = tarfile.TarInfo(name)
            info.size = len(body)
            info.pax_headers = {"comment": "p" * 300}
            tar.addfile(info, io.BytesIO(body))
        link = tarfile.TarInfo("usr/lib/libx.so")
        link.type, link.linkname = tarfile.SYMTYPE, "libx.so.1"
        tar.addfile(link)
    plain = raw.getvalue()
    return [plain, gzip.compress(plain), zstd_module().compress(plain)]


@pytest.mark.parametrize("examples", TIERS)
def test_layer_stream(examples):
    def check(data: bytes) -> None:
        scan = parsed(LayerError, scan_layer, io.BytesIO(data), 0, prefix="layer 0")
        assert scan is None or scan.diff_id.startswith("sha256:")

    run(examples, st.sampled_from(_layer_seeds()).flatmap(mutated), check)


KINDS = [tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.FIFOTYPE]
NAME = st.lists(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0/"),
                        min_size=1, max_size=40), min_size=1, max_size=8).map("/".join)
MEMBER = st.tuples(NAME, st.sampled_from(KINDS), st.integers(0, 1500), st.integers(0, 0o7777),
                   NAME)


def _archive(members, fmt) -> bytes | None:
    raw = io.BytesIO()
    try:
        with tarfile.open(fileobj=raw, mode="w", format=fmt) as tar:
            for name, kind, size, mode, link in members:
                info = tarfile.TarInfo(name)
                info.type, info.mode, info.linkname = kind, mode, link
                info.size = size if kind == tarfile.REGTYPE else 0
                tar.addfile(info, io.BytesIO(b"d" * size) if kind == tarfile.REGTYPE else None)
    except ValueError:  # a name this format cannot hold (ustar: over 256 bytes)
        return None
    return raw.getvalue()


def _fields(name, kind, size, mode, link) -> tuple:
    is_link = kind in (tarfile.SYMTYPE, tarfile.LNKTYPE)
    return (name.rstrip("/"), kind, size if kind == tarfile.REGTYPE else 0, mode,
            link if is_link else "")


@pytest.mark.parametrize("examples", TIERS)
def test_tar_headers_read_as_tarfile_reads_them(examples):
    """envcheck's own header reader (3x cheaper than TarInfo.frombuf) against the standard
    library's, on generated ustar, GNU and PAX archives with long and non-ASCII names."""
    from envcheck.image.tar import Chunks as _Chunks
    from envcheck.image.tar import walk_tar

    def check(case) -> None:
        members, fmt = case
        data = _archive(members, fmt)
        if data is None:
            return
        expected = [_fields(m.name, m.type, m.size, m.mode, m.linkname)
                    for m in tarfile.open(fileobj=io.BytesIO(data))]
        got = []
        walk_tar(_Chunks(iter([data])), lambda info, read: got.append(
            _fields(info.name, info.type, info.size, info.mode, info.linkname)))
        assert got == expected

    formats = st.sampled_from([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
    run(examples // 4, st.tuples(st.lists(MEMBER, min_size=1, max_size=4), formats), check)


@pytest.mark.parametrize("examples", TIERS)
def test_header_checksum_agrees_with_tarfile(examples):
    """The adler32 shortcut accepts exactly the headers whose checksum tarfile accepts, signed
    sums (bytes with the high bit set) included."""
    from envcheck.image.errors import LayerError
    from envcheck.image.tar import _checksum_ok

    def check(case) -> None:
        (name, kind, size, mode, link), where, value = case
        block = bytearray(_archive([(name[:90], kind, size, mode, link[:90])],
                                   tarfile.GNU_FORMAT)[:512])
        block[where] = value
        try:
            exact = tarfile.nti(bytes(block[148:156])) in tarfile.calc_chksums(bytes(block))
        except tarfile.InvalidHeaderError:
            exact = None  # the checksum field itself is no number: ours must refuse it too
        try:
            assert _checksum_ok(bytes(block)) == bool(exact)
        except LayerError:
            assert exact is None

    run(examples, st.tuples(MEMBER, st.integers(0, 511), st.integers(0, 255)), check)
