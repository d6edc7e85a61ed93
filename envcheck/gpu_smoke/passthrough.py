"""Links 4-5 and the container runs: the image's requirements against this driver, then the
image run with a GPU device request (what `docker run --gpus all` sends) and a short probe inside
— device nodes, /proc/driver/nvidia/version, libcuda.so.1 / libnvidia-ml.so.1 in the ld cache,
`nvidia-smi -L` — with the daemon's error text classified against the failure catalog.

Every container runs least-privileged: a non-root user, all capabilities dropped, no new
privileges, a read-only root filesystem with a /tmp tmpfs, no network, memory and pids limits and
a timeout; it is always removed. Only an envcheck killed outright (SIGKILL: the OOM killer, Slurm's
KillWait) cannot remove its container: each is labelled with its owner process, and the next run
removes those whose owner is gone (`remove_leftovers`).
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
import uuid
from pathlib import Path

from envcheck.dev_image import DEV_IMAGE
from envcheck.nvidia.catalog import CATALOG_BY_ID, UNKNOWN, classify
from envcheck.nvidia.cuda import requirement_check
from envcheck.nvidia.driver import parse_driver_version
from envcheck.report import Check
from envcheck.runner import RC_TIMEOUT, RunResult

MISSING = "the image is not in the engine"
NOBODY = "65534:65534"
MEMORY_LIMIT = "8g"
PIDS_LIMIT = 1024
TMPFS = {"/tmp": "rw,exec,nosuid,size=2g,mode=1777"}
SHM_SIZE = "1g"  # NCCL's buffers (container.nccl); Docker's default 64 MB is too small
GPU_ENV = {"NVIDIA_DRIVER_CAPABILITIES": "compute,utility"}
CPU_ENV = {"JAX_PLATFORMS": "cpu"}
BASE_ENV = {"HOME": "/tmp", "XDG_CACHE_HOME": "/tmp/.cache",
            "JAX_COMPILATION_CACHE_DIR": "/tmp/jax-cache"}
PROBE_SCRIPT = (
    "echo '== devices'; ls -1 /dev | grep '^nvidia' || true; "
    "echo '== driver'; cat /proc/driver/nvidia/version 2>&1 || true; "
    "echo '== ldconfig'; (ldconfig -p || /sbin/ldconfig -p) 2>/dev/null "
    "| grep -E 'libcuda[.]so[.]1 |libnvidia-ml[.]so[.]1 ' || true; "
    "echo '== nvidia-smi'; nvidia-smi -L 2>&1 || true"
)
SECTION_RE = re.compile(r"^== (\S+)$", re.MULTILINE)
OWN_LABEL = {"envcheck": "gpu-smoke"}
OWNER_LABEL = "envcheck.owner"  # boot id/pid namespace/pid/start time of the envcheck that ran it
# runc: exec: "sh": executable file not found in $PATH; crun: executable file `sh` not found
# (older Docker escapes the quotes: exec: \"sh\": …)
MISSING_PROGRAM_RE = re.compile(r'exec: \\?"([^"\\]+)\\?": executable file not found|'
                                r"executable file `([^`]+)` not found")


@dataclasses.dataclass(frozen=True)
class ContainerRun:
    """What one container run gave: `error` is the daemon's refusal (the container never ran)."""

    rc: int
    out: str
    err: str
    error: str | None
    seconds: float

    def as_run_result(self) -> RunResult:
        return RunResult(self.rc, self.out, self.error or self.err)


def image_env(client, image: str) -> tuple[dict | None, Check]:
    """The image's config (env, user) through the SDK, or an image.present failure (whose
    detail is MISSING when the engine does not have the image)."""
    import docker

    try:
        attrs = client.images.get(image).attrs
    except docker.errors.ImageNotFound:
        fix = ("build it with `envcheck build` (or run gpu-smoke --build-missing)"
               if image == DEV_IMAGE else f"pull it (`docker pull {image}`), or build the dev "
                                          f"image with `envcheck build` and pass --image "
                                          f"{DEV_IMAGE}")
        return None, Check("image.present", "fail", f"image {image} is not in this Docker engine",
                           detail=MISSING,
                           fix=fix + "; `--no-container` runs the model test on this host")
    except docker.errors.DockerException as error:
        return None, Check("image.present", "fail", f"cannot read image {image}: {error}",
                           fix="check the image name and the daemon")
    config = attrs.get("Config") or {}
    env = dict(item.split("=", 1) for item in config.get("Env") or [] if "=" in item)
    size_mb = attrs.get("Size", 0) / 1e6
    cuda = env.get("CUDA_VERSION", "none")
    check = Check("image.present", "pass",
                  f"{image} {attrs.get('Id', '')[:19]} ({size_mb:.0f} MB, CUDA_VERSION {cuda})")
    return {"env": env, "user": config.get("User") or "", "id": attrs.get("Id")}, check


def preflight_check(env: dict, driver: str | None, brand: str | None = None) -> Check:
    """Link 4: NVIDIA_REQUIRE_CUDA and CUDA_VERSION against this driver (inspect-image's rule)."""
    if "NVIDIA_REQUIRE_CUDA" not in env and "CUDA_VERSION" not in env:
        return Check("image.requirement", "pass", "the image sets no NVIDIA_REQUIRE_CUDA (a "
                                                  "non-CUDA base: JAX brings its own CUDA)")
    if not driver:
        return Check("image.requirement", "skip", "no host driver to judge NVIDIA_REQUIRE_CUDA "
                                                  "against (host.driver)")
    return requirement_check(env, env.get("CUDA_VERSION"), driver, [], False, brand)[0]


def run_container(client, image: str, command: list[str], *, gpu: bool, env: dict,
                  user: str, timeout_s: float, memory_limit: str = MEMORY_LIMIT) -> ContainerRun:
    import docker
    import requests

    requests_ = [docker.types.DeviceRequest(count=-1, capabilities=[["gpu"]])] if gpu else None
    start_s = time.perf_counter()
    # named, so that it can be removed even when a signal cut the create call's reply off
    name = f"envcheck-gpu-smoke-{uuid.uuid4().hex[:12]}"
    try:
        container = client.containers.create(
            image, command, name=name,
            user=user if user not in ("", "root", "0", "0:0") else NOBODY,
            environment={**BASE_ENV, **env}, network_mode="none", read_only=True,
            tmpfs=TMPFS, shm_size=SHM_SIZE, cap_drop=["ALL"], security_opt=["no-new-privileges"],
            mem_limit=memory_limit, pids_limit=PIDS_LIMIT, device_requests=requests_,
            labels={**OWN_LABEL, **({OWNER_LABEL: owner} if (owner := process_identity())
                                    else {})})
        container.start()
        rc, note = _wait(container, timeout_s, memory_limit)
        out = container.logs(stdout=True, stderr=False).decode(errors="replace")
        err = container.logs(stdout=False, stderr=True).decode(errors="replace")
        return ContainerRun(rc, out, err + note, None, time.perf_counter() - start_s)
    except docker.errors.APIError as error:
        text = str(error.explanation or error)
        return ContainerRun(125, "", "", text, time.perf_counter() - start_s)
    except requests.exceptions.RequestException as error:
        return ContainerRun(125, "", "", f"{DAEMON_GONE} ({type(error).__name__})",
                            time.perf_counter() - start_s)
    finally:
        _remove(client, name)


DAEMON_GONE = "the connection to the Docker daemon broke during the run (dockerd restarted?)"
OUT_OF_MEMORY = "container: killed by the kernel: out of memory"


def _wait(container, timeout_s: float, memory_limit: str) -> tuple[int, str]:
    """(exit code, a note for stderr): killed at the timeout (124), or OOM-killed."""
    import requests

    try:
        rc = container.wait(timeout=timeout_s)["StatusCode"]
    except requests.exceptions.RequestException as error:
        if not (isinstance(error, requests.exceptions.ReadTimeout) or "timed out" in str(error)):
            raise  # the daemon went away, not our timeout
        container.kill()
        return RC_TIMEOUT, f"\ncontainer: timed out after {timeout_s:g} s"
    container.reload()
    if (container.attrs.get("State") or {}).get("OOMKilled"):
        return rc, f"\n{OUT_OF_MEMORY} (limit {memory_limit})"
    return rc, ""


def _remove(client, name: str) -> bool:
    """Kill and remove the container `name`, if it was created: whether it was there to go."""
    import docker
    import requests

    try:
        client.api.remove_container(name, force=True)
    except (docker.errors.APIError, requests.exceptions.RequestException):
        return False  # never created, already gone, or the daemon is: nothing to remove
    return True


def process_identity(pid: int | None = None, proc: str = "/proc") -> str | None:
    """`BOOT-ID/PID-NAMESPACE/PID/START-TICKS` of a process (this one by default): which machine
    boot and pid namespace the pid counts in, and its start time, so a pid reused by another
    process does not pass for it. None off Linux, or for a process that is gone."""
    pid = os.getpid() if pid is None else pid
    try:
        boot = Path(proc, "sys/kernel/random/boot_id").read_text().strip()
        namespace = os.readlink(f"{proc}/self/ns/pid")
        stat = Path(proc, str(pid), "stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # after the command name, which may hold anything
    if len(fields) < 20 or fields[0] in ("Z", "X"):  # a zombie has ended already
        return None
    return f"{boot}/{namespace}/{pid}/{fields[19]}"  # field 22 of proc_pid_stat(5): starttime


def orphaned(owner: str, proc: str = "/proc") -> bool:
    """Whether the envcheck that `owner` (a process_identity) names is gone. Only a process of
    this machine boot and pid namespace can be told gone; any other is taken to be running (a
    daemon shared by several hosts or containers: their pids mean nothing here)."""
    here = process_identity(proc=proc)
    parts = owner.split("/")
    if here is None or len(parts) != 4 or not parts[2].isdigit():
        return False
    if here.split("/")[:2] != parts[:2]:
        return False
    pid = int(parts[2])
    if not Path(proc, str(pid)).exists():  # gone, or hidden (hidepid=: another user's process)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except OSError:  # PermissionError: there, another user's
            pass
        return False
    return process_identity(pid, proc) != owner


def remove_leftovers(client) -> list[dict]:
    """Remove the containers of gpu-smoke runs whose envcheck is gone (killed before it could
    remove them: one may still run its model test, holding the GPU). [{name, owner_pid}] of
    each one removed; none when the daemon cannot be asked."""
    import docker
    import requests

    removed = []
    try:
        listed = client.api.containers(all=True, filters={"label": [
            f"{key}={value}" for key, value in OWN_LABEL.items()]})
    except (docker.errors.APIError, requests.exceptions.RequestException):
        return removed
    for container in listed:
        owner = (container.get("Labels") or {}).get(OWNER_LABEL)
        if owner and orphaned(owner):
            name = (container.get("Names") or ["/" + container["Id"][:12]])[0].lstrip("/")
            if _remove(client, container["Id"]):
                removed.append({"name": name, "owner_pid": int(owner.split("/")[2])})
    return removed


def missing_program(text: str) -> str | None:
    """The program an image lacks, from the OCI runtime's refusal to start its container."""
    found = MISSING_PROGRAM_RE.search(text or "")
    return found and (found.group(1) or found.group(2))


def passthrough_checks(run: ContainerRun, taken: set[str]) -> list[Check]:
    """Link 5 from the probe container: why it did not start, or what it saw inside."""
    program = missing_program(run.error or "")
    if program:  # a distroless image: nothing to say about the GPU either way
        reason = f"the image has no `{program}` to probe with"
        return [Check("container.passthrough", "warn",
                      f"the GPU probe could not look inside: {reason} (it runs sh, ls, grep, "
                      "ldconfig); the model test still asks for the GPU",
                      detail=run.error.strip()[:400],
                      fix="probe with an image that has a shell: pass --image with the one "
                          "`envcheck build` makes, or one based on it")
                ] + [Check(i, "skip", reason) for i in INSIDE_IDS]
    if run.error is not None or run.rc == RC_TIMEOUT:
        text = run.error or run.err
        entry, matched = classify(text)
        check_id = entry.check_id if entry is not UNKNOWN and entry.check_id not in taken else (
            "container.passthrough")
        failed = Check(check_id, "fail", f"the GPU container did not start: {matched}",
                       detail=f"{entry.cause}. Daemon said: {text.strip()[:400]}", fix=entry.fix)
        reason = f"the GPU container did not start ({check_id})"
        return [failed] + [Check(i, "skip", reason) for i in INSIDE_IDS]
    sections = parse_sections(run.out)
    started = Check("container.passthrough", "pass",
                    f"the image ran with a GPU device request in {run.seconds:.1f} s")
    return [started] + inside_checks(sections)


INSIDE_IDS = ("container.devices", "container.driver", "container.libcuda",
              "container.nvidia-smi")


def parse_sections(out: str) -> dict[str, str]:
    parts = SECTION_RE.split(out)
    return {parts[i]: parts[i + 1].strip() for i in range(1, len(parts) - 1, 2)}


def inside_checks(sections: dict[str, str]) -> list[Check]:
    nodes = sections.get("devices", "").split()
    checks = [Check("container.devices", "pass", f"device nodes: {' '.join(nodes)}")
              if "nvidiactl" in nodes and any(re.fullmatch(r"nvidia\d+", n) for n in nodes)
              else _inside_fail("container.devices", f"no GPU device nodes inside "
                                                     f"(saw: {' '.join(nodes) or 'none'})",
                                sections.get("devices", ""))]
    driver, _ = parse_driver_version(sections.get("driver", ""))
    checks.append(Check("container.driver", "pass", f"/proc/driver/nvidia/version: {driver}")
                  if driver else
                  _inside_fail("container.driver", "/proc/driver/nvidia/version missing "
                                                   "inside", sections.get("driver", "")))
    libs = sections.get("ldconfig", "")
    missing = [so for so in ("libcuda.so.1", "libnvidia-ml.so.1") if so + " " not in libs]
    checks.append(Check("container.libcuda", "pass", "libcuda.so.1 and libnvidia-ml.so.1 are "
                                                     "in the container's ld cache")
                  if not missing else
                  Check("container.libcuda", "fail", f"not in the container's ld cache: "
                                                     f"{', '.join(missing)}",
                        fix="set NVIDIA_DRIVER_CAPABILITIES=compute,utility (compute gives "
                            "libcuda, utility NVML); in legacy mode check ldconfig in "
                            "config.toml"))
    smi = sections.get("nvidia-smi", "")
    gpus = re.findall(r"^GPU \d+: .*$", smi, re.MULTILINE)
    checks.append(Check("container.nvidia-smi", "pass", f"nvidia-smi -L: {'; '.join(gpus)}")
                  if gpus else _inside_fail("container.nvidia-smi", "nvidia-smi -L listed no "
                                                                    "GPU inside", smi))
    return checks


def _inside_fail(check_id: str, summary: str, text: str) -> Check:
    entry, matched = classify(text)
    if entry is UNKNOWN:  # nothing recognisable: the usual cause is no injection at all
        entry, matched = CATALOG_BY_ID["container.devices"], text.strip()[:200]
    return Check(check_id, "fail", summary, detail=f"{matched}: {entry.cause}", fix=entry.fix)
