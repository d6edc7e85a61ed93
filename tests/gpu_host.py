"""GPU-host fixtures: a fake root (/sys PCI entries, /proc/modules, /proc/driver/nvidia/version,
/dev nodes, toolkit binaries, config.toml, CDI specs, daemon.json) plus recorded command outputs
at the runner seam and canned Docker API answers at the SDK seam — all from the verbatim captures
in tests/fixtures/real (SOURCES.md there); every derived state is one visible edit below.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import docker

from envcheck.host import Probe
from envcheck.runner import RunResult
from scripts.cuda_image import ENV as CUDA_12_8_ENV
from tests.conftest import REPO

REAL = REPO / "tests/fixtures/real"
PIECES = REPO / "tests/fixtures/gpu-host"
H100_DRIVER = "590.48.01"
TOOLKIT_BINARIES = ("nvidia-ctk", "nvidia-container-cli", "nvidia-container-runtime",
                    "nvidia-container-runtime-hook", "nvidia-cdi-hook")
PCI_H100 = {"vendor": "0x10de", "device": "0x2330", "class": "0x030200"}
MODULES = ("nvidia_uvm 2076672 0 - Live 0x0000000000000000 (POE)\n"
           "nvidia 104071168 1 nvidia_uvm, Live 0x0000000000000000 (POE)\n")


def real(name: str) -> str:
    return (REAL / name).read_text()


def piece(name: str) -> str:
    return (PIECES / name).read_text()


def proc_version(driver: str = H100_DRIVER) -> str:
    """The real proprietary 580.173.02 line; the version number swapped in (edit)."""
    return real("proc-driver-nvidia-version_580-proprietary.txt").replace("580.173.02", driver)


def smi_q_field(query_csv: str, field: str) -> str:
    """A field of the `nvidia-smi -q` capture of the same GPU and driver as `query_csv`."""
    text = real(query_csv.replace("query-gpu-allfields", "q").replace(".csv.txt", ".txt"))
    return next(line.split(":", 1)[1].strip() for line in text.splitlines()
                if line.strip().startswith(field))


def cli_info(query_csv: str) -> str:
    """`nvidia-container-cli info` on the host of `query_csv`: the layout of the real 4xT4
    capture (nvidia-container-cli-info_fake-4xT4_575_ctk1.17.6.txt), filled in (edit) with the
    driver, CUDA version, model, UUID, bus id and compute capability of that GPU's captures
    (its query CSV, and Product Brand and CUDA Version of its `nvidia-smi -q`)."""
    from envcheck.host.nvml import parse_query_csv

    rows = parse_query_csv(real(query_csv))
    text = (f"NVRM version:   {rows[0]['driver_version']}\n"
            f"CUDA version:   {smi_q_field(query_csv, 'CUDA Version')}\n")
    for row in rows:
        text += (f"\nDevice Index:   {row['index']}\nDevice Minor:   {row['index']}\n"
                 f"Model:          {row['name']}\n"
                 f"Brand:          {smi_q_field(query_csv, 'Product Brand')}\n"
                 f"GPU UUID:       {row['uuid']}\nBus Location:   {row['pci.bus_id']}\n"
                 f"Architecture:   {row['compute_cap']}\n")
    return text


def cdi_spec(driver: str = H100_DRIVER) -> str:
    """The real spec nvidia-ctk 1.17.8 generated for driver 575.64.03, regenerated in words
    for `driver` (edit: the version strings)."""
    return real("cdi-spec_etc-cdi-nvidia.yaml_575_ctk1.17.8.yaml.txt").replace("575.64.03", driver)


@dataclasses.dataclass
class Host:
    """A fixture root and the recorded outputs its commands give, keyed by (tool, first arg)."""

    root: Path
    outputs: dict[tuple[str, str], RunResult]

    def run(self, argv, timeout_s, env=None, input_text=None) -> RunResult:
        key = (Path(argv[0]).name, argv[1].split("=")[0] if len(argv) > 1 else "")
        return self.outputs.get(key, RunResult(127, "", f"{argv[0]}: command not found"))

    @property
    def probe(self) -> Probe:
        return Probe(self.root, self.run)

    def write(self, path: str, text: str = "") -> None:
        target = self.root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)

    def remove(self, path: str) -> None:
        (self.root / path.lstrip("/")).unlink()

    def answer(self, tool: str, arg: str, text: str, rc: int = 0) -> None:
        self.outputs[(tool, arg)] = RunResult(rc, text if rc == 0 else "",
                                              "" if rc == 0 else text)


def bare_host(tmp_path: Path) -> Host:
    """A machine with no GPU, no driver and no toolkit (like this CI machine)."""
    host = Host(tmp_path / "root", {})
    for folder in ("sys/bus/pci/devices", "proc", "dev", "usr/bin"):
        (host.root / folder).mkdir(parents=True, exist_ok=True)
    host.write("/proc/modules", "ext4 1081344 1 - Live 0x0000000000000000\n")
    return host


def healthy_host(tmp_path: Path, query_csv: str = "nvidia-smi-query-gpu-allfields_h100_590.csv.txt"
                 ) -> Host:
    """One H100 on driver 590.48.01 (the GE capture set), toolkit 1.17.8 with the real
    config.toml, CDI spec and daemon.json; or the GPU and driver of another query CSV, every
    part of the host agreeing on them (the kernel module, NVML, the toolkit, the CDI spec)."""
    from envcheck.host.nvml import parse_query_csv

    driver = parse_query_csv(real(query_csv))[0]["driver_version"]
    host = bare_host(tmp_path)
    for name, value in PCI_H100.items():
        host.write(f"/sys/bus/pci/devices/0000:00:09.0/{name}", value + "\n")
    host.write("/proc/modules", MODULES)
    host.write("/proc/driver/nvidia/version", proc_version(driver))
    for node in ("nvidiactl", "nvidia0", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset"):
        host.write(f"/dev/{node}")
    for binary in TOOLKIT_BINARIES:
        host.write(f"/usr/bin/{binary}")
    host.write("/etc/nvidia-container-runtime/config.toml",
               real("config.toml_ctk1.17.6_cve-2025-23266-mitigated.toml.txt"))
    host.write("/etc/cdi/nvidia.yaml", cdi_spec(driver))
    host.write("/etc/docker/daemon.json",
               real("daemon.json_after-nvidia-ctk-runtime-configure.json.txt"))
    host.answer("nvidia-smi", "--query-gpu", real(query_csv))
    host.answer("nvidia-smi", "--version", real("nvidia-smi-version_h100_590.txt")  # edit:
                .replace("590.48.01", driver).replace("590.48", driver.rsplit(".", 1)[0])
                .replace("13.1", smi_q_field(query_csv, "CUDA Version")))
    host.answer("nvidia-ctk", "--version", piece("nvidia-ctk-version_1.17.8.txt"))
    host.answer("nvidia-container-cli", "--version",
                piece("nvidia-container-cli-version_1.17.5.txt").replace("1.17.5", "1.17.8"))
    host.answer("nvidia-container-cli", "info", cli_info(query_csv))
    return host


def docker_info(text: str) -> dict:
    """`docker info` text -> the GET /info fields the daemon checks read."""
    info: dict = {"SecurityOptions": []}
    scalars = {"Server Version": "ServerVersion", "Default Runtime": "DefaultRuntime",
               "Cgroup Driver": "CgroupDriver", "Cgroup Version": "CgroupVersion",
               "Operating System": "OperatingSystem", "Docker Root Dir": "DockerRootDir"}
    lists = {"CDI spec directories": "CDISpecDirs", "Discovered Devices": "DiscoveredDevices",
             "Security Options": "SecurityOptions"}
    server = text[text.index("\nServer:"):]
    current = None
    for line in server.splitlines():
        key, _, value = line.strip().partition(":")
        depth = len(line) - len(line.lstrip())
        if depth == 1:
            current = lists.get(key)
            if key in scalars:
                info[scalars[key]] = value.strip()
            elif key == "Runtimes":
                info["Runtimes"] = {name: {} for name in value.split()}
            elif current:
                info[current] = []
        elif depth == 2 and current and line.strip():
            item = line.strip()
            info[current].append({"Source": "cdi", "ID": item.split(": ", 1)[1]}
                                 if current == "DiscoveredDevices" else item)
    return info


def model_report(backend: str = "cpu", parity: str = "pass", diff: float = 4.8e-7) -> dict:
    """A model.smoke report as the container prints it."""
    checks = [
        {"id": "model.load", "status": "pass", "summary": "tiny-gpt2: 3 layers"},
        {"id": "model.parity", "status": parity, "summary": f"max |Δ| {diff:.2e}",
         "max_abs_diff": diff, "tolerance": 1e-4,
         "fix": None if parity == "pass" else "the device computes wrong numbers"},
        {"id": "model.generate", "status": "pass", "summary": "greedy equal", "tokens_per_s": 99.0},
        {"id": "model.attention", "status": "pass", "summary": "xla 0.0e+00",
         "implementations": [{"impl": "xla", "dtype": "float32", "status": "pass",
                              "max_abs_diff": 0.0, "tolerance": 1e-4}]},
    ]
    return {
        "schema": "envcheck.model-smoke/v2", "ok": parity == "pass", "impl": "auto",
        "impl_used": "cudnn" if backend == "gpu" else "xla",
        "checkpoint": "x", "checks": checks, "timings_s": {"forward": 0.001, "generate": 0.3},
        "device": {"backend": backend, "device_kind": "NVIDIA H100 80GB HBM3" if backend == "gpu"
                   else "cpu", "device_count": 1, "jax": "0.10.2"},
    }


HEALTHY_PROBE = ("== devices\nnvidia-modeset\nnvidia-uvm\nnvidia-uvm-tools\nnvidia0\nnvidiactl\n"
                 "== driver\n" + proc_version() +
                 "== ldconfig\n\tlibnvidia-ml.so.1 (libc6,x86-64) => "
                 "/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1\n\tlibcuda.so.1 (libc6,x86-64) => "
                 "/usr/lib/x86_64-linux-gnu/libcuda.so.1\n"
                 "== nvidia-smi\n" + real("nvidia-smi-L_h100_590.txt"))


@dataclasses.dataclass
class FakeDocker:
    """Canned Docker API answers: `info` text, the image's env, what the GPU probe container
    prints (or the daemon's refusal to start it), and what the model container prints."""

    info_text: str = dataclasses.field(
        default_factory=lambda: real("docker-info_docker28.1.1_nvidia-runtime.txt"))
    image_env: list[str] = dataclasses.field(default_factory=lambda: list(CUDA_12_8_ENV))
    gpu_error: str | None = None
    probe_out: str = HEALTHY_PROBE
    model_out: dict | None = None
    model_err: str = ""
    missing_image: bool = False
    model_wait_error: Exception | None = None
    created: list[dict] = dataclasses.field(default_factory=list)
    list_error: Exception | None = None

    def __post_init__(self):
        self.images = self
        self.containers = self
        self.api = FakeApi(self)
        self.by_name: dict[str, FakeContainer] = {}

    def info(self) -> dict:
        return docker_info(self.info_text)

    def get(self, name: str):
        if self.missing_image:
            raise docker.errors.ImageNotFound(f"No such image: {name}")
        attrs = {"Id": "sha256:" + "ab" * 32, "Size": 9_000_000_000,
                 "Config": {"Env": self.image_env, "User": "envcheck"}}
        return type("Image", (), {"attrs": attrs})()

    def create(self, image, command, **options):
        self.created.append({"image": image, "command": command, **options})
        gpu = bool(options.get("device_requests"))
        if command[0] == "sh":
            container = FakeContainer(self.gpu_error if gpu else None, self.probe_out, "")
        else:
            report = self.model_out or model_report("gpu" if gpu else "cpu")
            container = FakeContainer(None, json.dumps(report) + "\n", self.model_err,
                                      wait_error=self.model_wait_error)
        container.labels = options.get("labels") or {}
        self.by_name[options["name"]] = container
        return container

    def leave(self, name: str, labels: dict) -> FakeContainer:
        """A container of an earlier run, still there (as a killed envcheck leaves it)."""
        container = FakeContainer(None, "", "", labels=labels)
        self.by_name[name] = container
        return container


def _id(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


@dataclasses.dataclass
class FakeApi:
    """The low-level API calls envcheck makes, over FakeDocker's containers."""

    docker: FakeDocker

    def containers(self, filters: dict, **options) -> list[dict]:
        assert options == {"all": True}  # stopped ones too
        if self.docker.list_error is not None:
            raise self.docker.list_error
        wanted = [tuple(f.split("=", 1)) for f in filters.get("label", [])]
        return [{"Id": _id(name), "Names": [f"/{name}"], "Labels": c.labels}
                for name, c in self.docker.by_name.items()
                if not c.removed and all(c.labels.get(k) == v for k, v in wanted)]

    def remove_container(self, name: str, force: bool) -> None:
        found = [c for n, c in self.docker.by_name.items()
                 if name in (n, _id(n)) and not c.removed]
        if not found:
            raise docker.errors.NotFound(f"No such container: {name}")
        found[0].remove(force)


@dataclasses.dataclass
class FakeContainer:
    start_error: str | None
    out: str
    err: str
    removed: bool = False
    wait_error: Exception | None = None
    attrs: dict = dataclasses.field(default_factory=lambda: {"State": {"OOMKilled": False}})
    labels: dict = dataclasses.field(default_factory=dict)

    def start(self):
        if self.start_error:
            raise docker.errors.APIError("500 Server Error", explanation=self.start_error)

    def wait(self, timeout):
        if self.wait_error is not None:
            raise self.wait_error
        return {"StatusCode": 0}

    def reload(self):
        pass

    def logs(self, stdout, stderr):
        return (self.out if stdout else self.err).encode()

    def kill(self):
        pass

    def remove(self, force):
        if self.wait_error is not None:  # the daemon is gone: removing fails the same way
            raise self.wait_error
        self.removed = True


def connect_to(client):
    """The docker.connect seam answering with `client` (None: no Docker here)."""
    def connect(probe, timeout_s):
        return client, None
    return connect


def predicted(checks: list | None = None, loads: list | None = None):
    """gpu-smoke's pre-flight seam: the prediction for any image is `checks` and `loads` (the
    unit tier reads no image's layers; tests/integration does, from the real daemon)."""
    from envcheck.gpu_smoke.preflight import Prediction

    def predict(image_id: str, driver: str | None) -> Prediction:
        return Prediction(image_id=image_id, driver=driver, seconds=0.0,
                          checks=list(checks or []), loads=list(loads or []))

    return predict
