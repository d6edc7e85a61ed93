"""The GPU passthrough failure catalog: an error text (from the daemon, the NVIDIA hook, NVML,
nvidia-smi, CUDA or JAX) -> the broken link (a stable check id), the cause and the fix.

Entries follow ../shared/reference/passthrough.md §3 (each with its sources there). The order
matters: more specific patterns come first, since one daemon error can quote several texts.
"""

from __future__ import annotations

import dataclasses
import re


@dataclasses.dataclass(frozen=True)
class Entry:
    check_id: str
    pattern: re.Pattern
    cause: str
    fix: str


def _entry(check_id: str, pattern: str, cause: str, fix: str) -> Entry:
    return Entry(check_id, re.compile(pattern, re.IGNORECASE | re.DOTALL), cause, fix)


CATALOG: tuple[Entry, ...] = (
    _entry("toolkit.mode", r"invoking the NVIDIA Container Runtime Hook directly",
           "config.toml sets mode=cdi/csv while the container was started with --gpus",
           "use `--runtime=nvidia` (or CDI device names), or set `mode = \"auto\"` in "
           "/etc/nvidia-container-runtime/config.toml"),
    _entry("image.requirement", r"unsatisfied condition: (cuda>=[\d.]+)",
           "the image's NVIDIA_REQUIRE_CUDA needs a newer driver than the host's",
           "upgrade the host driver (CUDA 12.8 needs R570+), use an older image tag, or set "
           "NVIDIA_DISABLE_REQUIRE=1 only if forward compatibility covers it"),
    _entry("host.driver-mismatch", r"driver/library version mismatch",
           "the driver's user-space libraries were upgraded while the old kernel module is "
           "still loaded",
           "reboot (or unload and reload the nvidia kernel modules) and pin the driver packages"),
    _entry("host.driver-libraries", r"load library failed: libnvidia-ml\.so\.1",
           "the toolkit cannot find the host driver's libnvidia-ml.so.1 in the host ld cache "
           "(driver missing or broken, or a snap / Docker Desktop daemon that cannot see host "
           "libraries)",
           "install the NVIDIA driver and run `ldconfig`; use docker-ce from Docker's apt "
           "repository rather than the snap or Docker Desktop"),
    _entry("toolkit.cgroups",
           r"devices\.allow: permission denied|bpf_prog_query\(BPF_CGROUP_DEVICE\)",
           "a rootless runtime cannot change device cgroups",
           "set `no-cgroups = true` in /etc/nvidia-container-runtime/config.toml (rootless) "
           "and pass the /dev/nvidia* devices explicitly, or use CDI"),
    _entry("image.driver-libraries",
           r"file creation failed: \S*lib(nvidia-ml|cuda)\.so\.1: file exists",
           "the image ships driver libraries that collide with the ones the toolkit injects "
           "(common on WSL2)",
           "remove libnvidia-ml.so.1 / libcuda.so.1 from the image; on WSL2 never install a "
           "Linux NVIDIA driver inside the distribution"),
    _entry("toolkit.docker-runtime",
           r"could not select device driver \"[^\"]*\" with capabilities: \[\[[^\]]*\]\]",
           "dockerd has no NVIDIA device driver registered: the NVIDIA Container Toolkit is not "
           "installed, was installed after dockerd started, or is not on dockerd's PATH "
           "(snap Docker, Docker Desktop VM, rootless)",
           "install nvidia-container-toolkit, run `nvidia-ctk runtime configure "
           "--runtime=docker` and restart dockerd; check `docker info` for the nvidia runtime"),
    _entry("container.nvml", r"Failed to initialize NVML: Unknown Error",
           "the container lost device access after a cgroup update (legacy hook with the "
           "systemd cgroup driver, e.g. after `systemctl daemon-reload`)",
           "recreate the container; use CDI, or `\"exec-opts\": "
           "[\"native.cgroupdriver=cgroupfs\"]` in daemon.json"),
    _entry("host.wsl-access", r"GPU access blocked by the operating system",
           "WSL2 / Windows blocks GPU access for this distribution",
           "update the Windows NVIDIA driver and WSL (`wsl --update`), and run the container "
           "from a WSL2 distribution with GPU support enabled"),
    _entry("container.nvml-permissions", r"Failed to initialize NVML: Insufficient Permissions",
           "SELinux labels (or no-cgroups without the device nodes) block NVML",
           "run with `--security-opt=label=disable`, or pass the /dev/nvidia* device nodes"),
    _entry("host.kernel-module",
           r"couldn't communicate with the NVIDIA driver|Module nvidia not found"
           r"|RmInitAdapter failed",
           "the NVIDIA kernel module is not loaded (nouveau bound, Secure Boot rejecting the "
           "unsigned module, or DKMS not built for the running kernel)",
           "check `lsmod | grep -E 'nvidia|nouveau'`, `mokutil --sb-state` and dmesg; "
           "blacklist nouveau, enroll the MOK key or rebuild the DKMS module"),
    _entry("host.uvm", r"nvidia_uvm is not loaded|Could not load UVM kernel module",
           "the nvidia_uvm kernel module is not loaded, so /dev/nvidia-uvm is missing",
           "run `nvidia-modprobe -u -c=0` (or `modprobe nvidia_uvm`) and make it persistent"),
    _entry("container.devices",
           r"no CUDA-capable device is detected|CUDA_ERROR_NO_DEVICE|/proc/driver/nvidia/version "
           r"does not exist",
           "the container started without GPU injection (no --gpus / CDI device, "
           "NVIDIA_VISIBLE_DEVICES void or none, or CUDA_VISIBLE_DEVICES empty)",
           "start the container with `--gpus all` (or a CDI device) and check "
           "NVIDIA_VISIBLE_DEVICES / CUDA_VISIBLE_DEVICES"),
    _entry("cuda.driver-too-old", r"CUDA driver version is insufficient for CUDA runtime version",
           "the CUDA runtime in the image is newer than the host driver supports",
           "upgrade the driver to the toolkit's minimum, use an older CUDA image, or the "
           "forward-compatibility package on data-center GPUs"),
    _entry("cuda.forward-compat", r"forward compatibility was attempted on non supported HW",
           "cuda-compat libraries were loaded on a GPU that does not support forward "
           "compatibility (GeForce)",
           "remove /usr/local/cuda/compat from the library path, or upgrade the driver"),
    _entry("cuda.ptx", r"unsupported toolchain|cudaErrorUnsupportedPtxVersion",
           "PTX was built by a newer toolchain than the driver can JIT-compile",
           "upgrade the driver, or ship SASS for the target architecture"),
    _entry("jax.cuda-plugin",
           r"a CUDA-enabled jaxlib is not installed",
           "JAX sees an NVIDIA GPU but no CUDA backend is installed (CPU-only `pip install jax`)",
           "`pip install -U \"jax[cuda12]\"` in a fresh virtual environment"),
    _entry("jax.cudnn", r"Unable to load cuDNN|Outdated cuDNN installation found|"
                        r"Loaded runtime CuDNN library",
           "cuDNN is missing or older than jaxlib was built against (often LD_LIBRARY_PATH "
           "shadowing the pip wheels with an older system cuDNN)",
           "unset LD_LIBRARY_PATH and reinstall `jax[cuda12]` in a fresh virtual environment"),
    _entry("jax.cuda-backend", r"CUDA backend failed to initialize",
           "JAX's CUDA plugin loaded but could not initialize (library or version skew)",
           "match jax, jaxlib and jax-cuda12-plugin versions (`pip install -U \"jax[cuda12]\"`); "
           "rerun with TF_CPP_MIN_LOG_LEVEL=0 for the underlying error"),
    _entry("xla.ptxas", r"older than the ptxas CUDA version",
           "the pip ptxas is newer than the driver (minor-version compatibility; a warning)",
           "update the driver, or install the forward-compatibility package"),
)
CATALOG_BY_ID = {entry.check_id: entry for entry in CATALOG}
UNKNOWN = Entry("container.gpu", re.compile(""), "an error not in the catalog",
                "read the full error text; `docker info` and `nvidia-container-cli info` show "
                "the toolkit's view of the host")


def classify(text: str) -> tuple[Entry, str]:
    """(the first matching entry, the matched text); UNKNOWN with the first line otherwise."""
    for entry in CATALOG:
        match = entry.pattern.search(text)
        if match:
            return entry, match.group(0)
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return UNKNOWN, first[:200]
