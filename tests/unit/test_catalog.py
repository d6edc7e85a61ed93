"""The failure catalog on recorded error texts: real captures (tests/fixtures/real, sources in
SOURCES.md) and the exact texts quoted in ../shared/reference/passthrough.md §3. Each case
asserts the broken link (check id) and that the fix names the remedy."""

from __future__ import annotations

import pytest

from envcheck.nvidia.catalog import CATALOG, UNKNOWN, classify
from tests.conftest import REPO

FIXTURES = REPO / "tests" / "fixtures" / "real"

RECORDED = [  # (fixture file, check id, a phrase the fix must contain)
    ("docker-run-gpus_could-not-select-device-driver.txt", "toolkit.docker-runtime",
     "nvidia-ctk runtime configure"),
    ("docker-compose-gpu_could-not-select-device-driver-nvidia.txt", "toolkit.docker-runtime",
     "restart dockerd"),
    ("docker-run-gpus_load-library-failed-libnvidia-ml.txt", "host.driver-libraries",
     "ldconfig"),
    ("docker-compose-gpu_load-library-failed-libnvidia-ml.txt", "host.driver-libraries",
     "install the NVIDIA driver"),
    ("nvidia-container-cli-list_load-library-failed.txt", "host.driver-libraries", "snap"),
    ("docker-run-gpus_requirement-cuda12.8_win-docker-desktop_551.txt", "image.requirement",
     "upgrade the host driver"),
    ("docker-compose-gpu_requirement-cuda12.8_driver550.txt", "image.requirement",
     "NVIDIA_DISABLE_REQUIRE"),
    ("nvidia-smi_nvml-unknown-error.txt", "container.nvml", "recreate the container"),
    ("nvidia-smi_nvml-version-mismatch_550.txt", "host.driver-mismatch", "reboot"),
    ("nvidia-smi_nvml-version-mismatch_570.txt", "host.driver-mismatch", "reboot"),
    ("nvidia-smi_failed-no-driver.txt", "host.kernel-module", "nouveau"),
    ("nvidia-smi_wsl2_failed-driver-not-loaded.txt", "host.kernel-module", "dmesg"),
    ("nvidia-smi_wsl2_gpu-access-blocked.txt", "host.wsl-access", "wsl --update"),
    ("jax_warning_cuda-jaxlib-not-installed.txt", "jax.cuda-plugin", "jax[cuda12]"),
    ("jax_warning_cuda-backend-failed_unable-to-load-cuda.txt", "jax.cuda-backend",
     "jax-cuda12-plugin"),
    ("jax_warning_cuda-backend-failed_outdated-cusparse.txt", "jax.cuda-backend",
     "TF_CPP_MIN_LOG_LEVEL"),
]

QUOTED = [  # exact texts from passthrough.md §3 (row number), check id, fix phrase
    ("invoking the NVIDIA Container Runtime Hook directly (e.g. specifying the docker --gpus "
     "flag) is not supported. Please use the NVIDIA Container Runtime", "toolkit.mode",
     "--runtime=nvidia"),  # 14
    ("nvidia-container-cli: mount error: open failed: /sys/fs/cgroup/devices/user.slice/"
     "devices.allow: permission denied", "toolkit.cgroups", "no-cgroups = true"),  # 11
    ("failed to add device rules: bpf_prog_query(BPF_CGROUP_DEVICE) failed", "toolkit.cgroups",
     "CDI"),  # 11, cgroup v2
    ("nvidia-container-cli: mount error: file creation failed: /var/lib/docker/overlay2/x/merged"
     "/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1: file exists: unknown.",
     "image.driver-libraries", "remove libnvidia-ml.so.1"),  # 13
    ("Failed to initialize NVML: Insufficient Permissions", "container.nvml-permissions",
     "label=disable"),  # 12
    ("Kernel module nvidia_uvm is not loaded", "host.uvm", "nvidia-modprobe"),  # 10
    ("CUDA driver version is insufficient for CUDA runtime version", "cuda.driver-too-old",
     "upgrade the driver"),  # 5
    ("Error 804: forward compatibility was attempted on non supported HW",
     "cuda.forward-compat", "compat"),  # 6
    ("failed call to cuInit: CUDA_ERROR_NO_DEVICE: no CUDA-capable device is detected",
     "container.devices", "--gpus all"),  # 7
    ("kernel driver does not appear to be running on this host (abc): /proc/driver/nvidia/"
     "version does not exist", "container.devices", "NVIDIA_VISIBLE_DEVICES"),  # 7
    ("CUDA backend failed to initialize: Unable to load cuDNN. Is it installed?", "jax.cudnn",
     "unset LD_LIBRARY_PATH"),  # 19
    ("Loaded runtime CuDNN library: 8.5.0 but source was compiled with: 8.6.0.  CuDNN library "
     "needs to have matching major version and equal or higher minor version.", "jax.cudnn",
     "fresh virtual environment"),  # 20
    ("The NVIDIA driver's CUDA version is 12.2 which is older than the ptxas CUDA version "
     "(12.6.20). Because the driver is older than the ptxas version, XLA is disabling parallel "
     "compilation", "xla.ptxas", "update the driver"),  # 21
    ("cudaErrorUnsupportedPtxVersion: the provided PTX was compiled with an unsupported "
     "toolchain.", "cuda.ptx", "SASS"),  # 22
    ("modprobe: FATAL: Module nvidia not found in directory /lib/modules/6.8.0",
     "host.kernel-module", "DKMS"),  # 9
]


@pytest.mark.parametrize("fixture,check_id,remedy", RECORDED, ids=[r[0] for r in RECORDED])
def test_recorded_texts(fixture, check_id, remedy):
    entry, matched = classify((FIXTURES / fixture).read_text())
    assert entry.check_id == check_id and matched
    assert remedy in entry.fix


@pytest.mark.parametrize("text,check_id,remedy", QUOTED, ids=[q[1] for q in QUOTED])
def test_catalog_texts(text, check_id, remedy):
    entry, _ = classify(text)
    assert entry.check_id == check_id
    assert remedy in entry.fix


def test_the_requirement_error_quotes_the_condition():
    text = (FIXTURES / "docker-compose-gpu_requirement-cuda12.8_driver550.txt").read_text()
    assert classify(text)[1] == "unsatisfied condition: cuda>=12.8"


def test_unknown_text_keeps_its_first_line():
    entry, matched = classify("\n  something new broke\nsecond line")
    assert entry is UNKNOWN and matched == "something new broke"


def test_at_least_twenty_recorded_cases_and_every_entry_covered():
    assert len(RECORDED) + len(QUOTED) >= 20
    covered = {case[1] for case in RECORDED + QUOTED}
    assert {entry.check_id for entry in CATALOG} <= covered
