"""The gpu-smoke chain on GPU-host fixtures: fixture roots + recorded tool outputs at the runner
seam + canned Docker API answers (tests/gpu_host.py), each case a real failure from the catalog
(../shared/reference/passthrough.md §3): the failing check's id, its status and that the fix
names the remedy."""

from __future__ import annotations

import json

import pytest

from envcheck.gpu_smoke import gpu_smoke
from envcheck.report import Check, to_json
from tests.gpu_host import (
    FakeDocker,
    bare_host,
    cli_info,
    connect_to,
    healthy_host,
    model_report,
    piece,
    predicted,
    real,
)


def smoke(host, client=None, **options):
    client = client if client is not None else FakeDocker()
    options.setdefault("predict", predicted())
    return gpu_smoke(probe=host.probe, connect=connect_to(client), **options)


def by_id(report) -> dict[str, Check]:
    ids = [c.id for c in report.checks]
    assert len(ids) == len(set(ids)), ids  # one verdict per link
    return {c.id: c for c in report.checks}


def assert_link(report, check_id: str, status: str, *remedy: str) -> Check:
    check = by_id(report)[check_id]
    assert check.status == status, check
    for word in remedy:
        assert word in (check.fix or ""), (word, check)
    return check


def test_healthy_h100_host_passes_every_link_and_runs_on_the_gpu(tmp_path):
    client = FakeDocker()
    report = smoke(healthy_host(tmp_path), client)
    failed = [c for c in report.checks if c.status == "fail"]
    assert failed == []
    checks = by_id(report)
    assert checks["host.driver"].summary.startswith("driver 590.48.01 (proprietary")
    assert "NVIDIA H100 80GB HBM3" in checks["host.nvml"].summary
    assert checks["host.health"].status == "pass"
    assert checks["toolkit.versions"].summary == "nvidia-ctk 1.17.8, nvidia-container-cli 1.17.8"
    assert checks["toolkit.cdi"].status == "pass" and "nvidia.com/gpu=all" in checks[
        "toolkit.cdi"].summary
    assert checks["image.requirement"].status == "pass"  # 590 (CUDA 13.1) runs cuda>=12.8
    assert "GPU 0: NVIDIA H100 80GB HBM3" in checks["container.nvidia-smi"].summary
    assert report.verdict == "gpu" and report.mode == "container-gpu"
    assert report.host.driver_cuda == "13.1"
    gpu_probe, model = client.created
    assert gpu_probe["device_requests"][0].count == -1
    assert gpu_probe["device_requests"][0].capabilities == [["gpu"]]
    assert model["device_requests"] and model["command"][-5:] == [
        "model.smoke", "--json", "--level", "quick", "--in-container"]


def test_least_privilege_options_on_every_container(tmp_path):
    client = FakeDocker(gpu_error=real("docker-run-gpus_could-not-select-device-driver.txt"))
    smoke(healthy_host(tmp_path), client)
    assert len(client.created) == 2
    for options in client.created:
        assert options["user"] == "envcheck" and options["network_mode"] == "none"
        assert options["cap_drop"] == ["ALL"] and options["read_only"] is True
        assert "no-new-privileges" in options["security_opt"] and "/tmp" in options["tmpfs"]
        assert options["mem_limit"] and options["pids_limit"]
    assert client.created[1]["environment"]["JAX_PLATFORMS"] == "cpu"
    assert not client.created[1]["device_requests"]
    names = [options["name"] for options in client.created]
    assert len(set(names)) == 2 and all(n.startswith("envcheck-gpu-smoke-") for n in names)
    assert all(container.removed for container in client.by_name.values())


def test_a_container_a_signal_cut_the_create_reply_of_is_removed():
    """dockerd made the container but a stop signal came before its reply: it is removed by
    the name envcheck gave it."""
    import signal

    from envcheck.gpu_smoke import passthrough
    from envcheck.process import Interrupted

    class CutOff(FakeDocker):
        def create(self, image, command, **options):
            super().create(image, command, **options)
            raise Interrupted(signal.SIGTERM)

    client = CutOff()
    with pytest.raises(Interrupted):
        passthrough.run_container(client, "envcheck-dev:latest", ["python"], gpu=False, env={},
                                  user="", timeout_s=5)
    assert [container.removed for container in client.by_name.values()] == [True]


def ended_process() -> str:
    """The process identity of a process that has ended (and been waited for)."""
    import subprocess

    from envcheck.gpu_smoke.passthrough import process_identity

    child = subprocess.Popen(["sleep", "30"])
    identity = process_identity(child.pid)
    child.kill()
    child.wait()
    assert identity is not None and process_identity(child.pid) is None
    return identity


def owned_by(owner: str) -> dict:
    from envcheck.gpu_smoke.passthrough import OWN_LABEL, OWNER_LABEL

    return {**OWN_LABEL, OWNER_LABEL: owner}


def test_containers_are_labelled_with_the_envcheck_that_runs_them(tmp_path):
    import os

    from envcheck.gpu_smoke.passthrough import OWNER_LABEL, process_identity

    client = FakeDocker()
    smoke(healthy_host(tmp_path), client)
    owners = {options["labels"][OWNER_LABEL] for options in client.created}
    assert owners == {process_identity()} and process_identity().split("/")[2] == str(
        os.getpid())
    assert all(options["labels"]["envcheck"] == "gpu-smoke" for options in client.created)


def test_the_containers_of_a_killed_envcheck_are_removed_by_the_next_run(tmp_path):
    """A SIGKILLed envcheck cannot remove its container, which holds the GPU until its test
    ends. The next run removes those whose envcheck is gone, and only those: a live envcheck's,
    and any whose pid cannot be judged here (another pid namespace or machine boot: a daemon
    shared by containers or hosts), stay."""
    import os

    from envcheck.gpu_smoke.passthrough import process_identity

    boot, namespace, pid, start = process_identity().split("/")
    gone = {"ended": ended_process(),
            "pid-reused": f"{boot}/{namespace}/{os.getppid()}/1"}  # a start time not its own
    kept = {"this-envcheck": process_identity(),
            "other-namespace": f"{boot}/pid:[1]/{pid}/1",
            "other-boot": f"{'0' * 8}-{boot[9:]}/{namespace}/{pid}/1",
            "malformed": "not-an-owner"}
    client = FakeDocker()
    left = {key: client.leave(f"envcheck-gpu-smoke-{key}", owned_by(owner))
            for key, owner in {**gone, **kept}.items()}
    left["unowned"] = client.leave("envcheck-gpu-smoke-unowned", {"envcheck": "gpu-smoke"})
    left["not-ours"] = client.leave("web", {"envcheck.owner": gone["ended"]})
    report = smoke(healthy_host(tmp_path), client)
    assert {key for key, container in left.items() if container.removed} == set(gone)
    check = assert_link(report, "docker.leftovers", "warn", "OOM killer")
    assert "removed 2 gpu-smoke container(s)" in check.summary
    for key, owner in gone.items():
        assert f"envcheck-gpu-smoke-{key} (envcheck pid {owner.split('/')[2]})" in check.summary
    assert to_json(report)["leftovers_removed"] == [
        {"name": f"envcheck-gpu-smoke-{key}", "owner_pid": int(owner.split("/")[2])}
        for key, owner in gone.items()]
    assert report.verdict == "gpu"  # not a fault of the passthrough chain
    again = smoke(healthy_host(tmp_path / "again"), client)
    assert "docker.leftovers" not in by_id(again) and not again.leftovers_removed


def test_a_zombie_owner_counts_as_ended():
    import subprocess
    import time
    from pathlib import Path

    from envcheck.gpu_smoke.passthrough import orphaned, process_identity

    child = subprocess.Popen(["sleep", "0.2"])
    identity = process_identity(child.pid)
    assert identity is not None and not orphaned(identity)
    deadline = time.monotonic() + 30
    while not orphaned(identity):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    state = Path(f"/proc/{child.pid}/stat").read_text().rpartition(")")[2].split()[0]
    assert state == "Z"  # it has exited, and nobody has waited for it yet
    child.wait()


def test_an_owner_hidden_by_hidepid_counts_as_running(tmp_path):
    """/proc mounted with hidepid= (shared hosts) shows no other user's processes: an owner
    missing from it is only gone if no process has its pid (a live envcheck of another user
    kept its container)."""
    import os
    import subprocess
    from pathlib import Path

    from envcheck.gpu_smoke.passthrough import orphaned, process_identity

    boot, namespace, _, _ = process_identity().split("/")
    hiding = tmp_path / "proc"  # this /proc as such a mount shows it: no other process
    (hiding / "sys/kernel/random").mkdir(parents=True)
    (hiding / "sys/kernel/random/boot_id").write_text(boot + "\n")
    (hiding / "self/ns").mkdir(parents=True)
    (hiding / "self/ns/pid").symlink_to(namespace)
    (hiding / str(os.getpid())).mkdir()  # its own processes it shows
    (hiding / str(os.getpid()) / "stat").write_text(Path("/proc/self/stat").read_text())
    hidden = subprocess.Popen(["sleep", "30"])
    try:
        assert not orphaned(f"{boot}/{namespace}/{hidden.pid}/1", proc=str(hiding))
    finally:
        hidden.kill()
        hidden.wait()
    assert orphaned(f"{boot}/{namespace}/{hidden.pid}/1", proc=str(hiding))
    assert not orphaned(process_identity(), proc=str(hiding))


def test_a_daemon_that_will_not_list_containers_leaves_the_run_as_it_was(tmp_path):
    import docker

    client = FakeDocker(list_error=docker.errors.APIError("500 Server Error"))
    client.leave("envcheck-gpu-smoke-x", owned_by(ended_process()))
    report = smoke(healthy_host(tmp_path), client)
    assert "docker.leftovers" not in by_id(report) and report.verdict == "gpu"


def test_no_gpu_on_the_pci_bus(tmp_path):
    report = smoke(bare_host(tmp_path), FakeDocker(
        gpu_error=real("docker-run-gpus_could-not-select-device-driver.txt")))
    assert_link(report, "host.gpu", "fail", "NVIDIA GPU")
    assert by_id(report)["host.nvml"].status == "skip"
    assert_link(report, "toolkit.installed", "fail", "nvidia-container-toolkit")
    assert report.verdict == "cpu-fallback" and report.first_failed.id == "host.gpu"


def test_kernel_module_not_loaded(tmp_path):
    host = healthy_host(tmp_path)
    host.write("/proc/modules", "ext4 1081344 1 - Live 0x0000000000000000\n")
    host.remove("/proc/driver/nvidia/version")
    host.answer("nvidia-smi", "--query-gpu", real("nvidia-smi_failed-no-driver.txt"), rc=9)
    report = smoke(host)
    assert_link(report, "host.kernel-module", "fail", "lsmod", "mokutil", "DKMS")
    assert by_id(report)["host.driver"].status == "skip"


def test_nouveau_bound_instead_of_nvidia(tmp_path):
    host = healthy_host(tmp_path)
    host.write("/proc/modules", "nouveau 2961408 0 - Live 0x0000000000000000\n")
    host.remove("/proc/driver/nvidia/version")
    assert_link(smoke(host), "host.kernel-module", "fail", "blacklist nouveau")


@pytest.mark.parametrize("proc_driver,smi_output", [
    ("580.173.02", "nvidia-smi_nvml-version-mismatch_580.txt"),  # one real report, both files
    ("565.57.01", "nvidia-smi_nvml-version-mismatch_550.txt"),
    ("570.124.06", "nvidia-smi_nvml-version-mismatch_570.txt"),
])
def test_driver_library_version_mismatch(tmp_path, proc_driver, smi_output):
    host = healthy_host(tmp_path)
    host.write("/proc/driver/nvidia/version",
               real("proc-driver-nvidia-version_580-proprietary.txt").replace("580.173.02",
                                                                              proc_driver))
    host.answer("nvidia-smi", "--query-gpu", real(smi_output), rc=18)
    check = assert_link(smoke(host), "host.driver-mismatch", "fail", "reboot")
    assert proc_driver in check.summary


def test_missing_uvm_node(tmp_path):
    host = healthy_host(tmp_path)
    host.remove("/dev/nvidia-uvm")
    assert_link(smoke(host), "host.uvm", "fail", "nvidia-modprobe -u")


def test_missing_control_node(tmp_path):
    host = healthy_host(tmp_path)
    host.remove("/dev/nvidiactl")
    assert_link(smoke(host), "host.devices", "fail", "nvidia-modprobe")


def test_mig_mode_is_a_health_warning(tmp_path):
    host = healthy_host(tmp_path, "nvidia-smi-query-gpu-allfields_h100-mig_590.csv.txt")
    check = assert_link(smoke(host), "host.health", "warn", "MIG")
    assert "MIG mode is on" in check.summary


def test_uncorrected_ecc_errors_fail_health(tmp_path):
    host = healthy_host(tmp_path)
    csv = real("nvidia-smi-query-gpu-allfields_h100_590.csv.txt")
    header, row = csv.strip().splitlines()
    fields = [f.strip() for f in header.split(",")]
    values = [v.strip() for v in row.split(",")]
    values[fields.index("ecc.errors.uncorrected.volatile.total")] = "2"  # edit: two DBEs
    host.answer("nvidia-smi", "--query-gpu", header + "\n" + ", ".join(values) + "\n")
    check = assert_link(smoke(host), "host.health", "fail", "reset the GPU", "Xid")
    assert "2 volatile uncorrected ECC errors" in check.summary


def test_consumer_gpu_notes_without_failing(tmp_path):
    host = healthy_host(tmp_path, "nvidia-smi-query-gpu-allfields_rtx4080super_595.csv.txt")
    check = by_id(smoke(host))["host.health"]
    assert check.status == "pass" and "persistence mode off" in check.summary
    assert "PCIe gen 1 of 4" in check.summary


def test_toolkit_not_installed(tmp_path):
    host = healthy_host(tmp_path)
    for binary in ("nvidia-container-runtime-hook", "nvidia-cdi-hook"):
        host.remove(f"/usr/bin/{binary}")
    assert_link(smoke(host), "toolkit.installed", "fail", "nvidia-container-toolkit",
                "nvidia-ctk runtime configure")


def test_toolkit_versions_disagree(tmp_path):
    host = healthy_host(tmp_path)
    host.answer("nvidia-container-cli", "--version",
                piece("nvidia-container-cli-version_1.17.5.txt"))
    check = assert_link(smoke(host), "toolkit.versions", "warn", "upgrade all toolkit packages")
    assert "1.17.8" in check.summary and "1.17.5" in check.summary


def test_config_mode_cdi_breaks_the_gpus_hook(tmp_path):
    host = healthy_host(tmp_path)
    config = real("config.toml_ctk1.17.6_cve-2025-23266-mitigated.toml.txt")
    host.write("/etc/nvidia-container-runtime/config.toml",
               config.replace('mode = "legacy"', 'mode = "cdi"'))  # edit
    assert_link(smoke(host), "toolkit.config", "fail", "--runtime=nvidia", 'mode = "auto"')


@pytest.mark.parametrize("edit, named", [
    ('[nvidia-container-cli]\nno-cgroups = "false"\n', "no-cgroups = 'false' is not true or false"),
    ('[nvidia-container-runtime]\nmode = 5\n', "mode = 5 is not a string"),
    ('nvidia-container-runtime = "legacy"\n', "nvidia-container-runtime is str, not a table"),
    ('nvidia-container-cli = [1]\n', "nvidia-container-cli is list, not a table"),
    ('[nvidia-container-cli\n', "is not valid TOML"),
])
def test_config_the_toolkit_cannot_load_is_a_failed_link(tmp_path, edit, named):
    """Valid TOML of the wrong types (a quoted boolean is the usual slip) stops the toolkit
    loading its config: one failed check naming the setting, not a traceback."""
    host = healthy_host(tmp_path)
    host.write("/etc/nvidia-container-runtime/config.toml", edit)
    check = assert_link(smoke(host), "toolkit.config", "fail", "nvidia-ctk config default")
    assert named in check.summary, check


def test_packaged_pre_1_13_config_is_fine(tmp_path):
    host = healthy_host(tmp_path)
    host.write("/etc/nvidia-container-runtime/config.toml",
               real("config.toml_packaged-default-ubuntu_ctk-pre1.13.toml.txt"))
    assert by_id(smoke(host))["toolkit.config"].status == "pass"


def test_rootless_docker_needs_no_cgroups(tmp_path):
    info = real("docker-info_docker28.1.1_nvidia-runtime.txt").replace(
        "  cgroupns\n", "  cgroupns\n  rootless\n")  # edit: a rootless daemon
    report = smoke(healthy_host(tmp_path), FakeDocker(info_text=info))
    assert_link(report, "toolkit.config", "fail", "no-cgroups = true")
    assert report.docker.rootless is True


def test_stale_cdi_spec(tmp_path):
    host = healthy_host(tmp_path)
    host.write("/etc/cdi/nvidia.yaml", real("cdi-spec_etc-cdi-nvidia.yaml_575_ctk1.17.8.yaml.txt"))
    check = assert_link(smoke(host), "toolkit.cdi", "warn", "nvidia-ctk cdi generate")
    assert "575.64.03" in check.summary and "590.48.01" in check.summary


@pytest.mark.parametrize("spec", [
    "cdiVersion: 0.5.0\nkind: nvidia.com/gpu\ndevices: [all]\n",
    "cdiVersion: 0.5.0\nkind: nvidia.com/gpu\ndevices:\n- name: 0\n",
    "cdiVersion: 0.5.0\nkind: nvidia.com/gpu\ndevices:\n- containerEdits: {}\n",
    "cdiVersion: 0.5.0\nkind: [nvidia.com/gpu]\ndevices: []\n",
])
def test_cdi_spec_with_malformed_devices_is_unreadable(tmp_path, spec):
    """Devices that are not maps with a string name: the CDI library refuses the spec, and so
    does the check (no traceback)."""
    host = healthy_host(tmp_path)
    host.write("/etc/cdi/broken.yaml", spec)
    check = assert_link(smoke(host), "toolkit.cdi", "fail", "nvidia-ctk cdi generate")
    assert "/etc/cdi/broken.yaml" in check.summary


@pytest.mark.parametrize("daemon_json", ['{"runtimes": 5}', '{"runtimes": "nvidia"}', "[1]"])
def test_daemon_json_of_another_shape_registers_no_runtime(tmp_path, daemon_json):
    """dockerd refuses `runtimes` that is not a map; so does the check (no traceback, no
    runtime spelt out of a string's letters)."""
    info = real("docker-info_docker28.1.1_nvidia-runtime.txt").replace(
        "Runtimes: io.containerd.runc.v2 nvidia runc", "Runtimes: io.containerd.runc.v2 runc")
    host = healthy_host(tmp_path)
    host.write("/etc/docker/daemon.json", daemon_json)
    check = assert_link(smoke(host, FakeDocker(info_text=info)), "docker.runtime", "warn",
                        "nvidia-ctk runtime configure")
    assert check.summary.startswith("runtime nvidia not registered"), check


@pytest.mark.parametrize("field,value,link,status,said", [
    ("SecurityOptions", True, "docker.reachable", "pass", "cgroup v2 systemd"),
    ("CDISpecDirs", "/etc/cdi", "docker.cdi", "skip", "CDI not enabled"),
    ("CDISpecDirs", ["/etc/cdi", 5], "docker.cdi", "pass", "CDI enabled (spec dirs /etc/cdi)"),
    ("DiscoveredDevices", True, "docker.cdi", "pass", "CDI enabled"),
    ("DiscoveredDevices", [{"Source": "cdi"}, {"Source": "cdi", "ID": "nvidia.com/gpu=0"}],
     "docker.cdi", "pass", "CDI devices: nvidia.com/gpu=0"),
    ("Runtimes", ["nvidia", "runc"], "docker.runtime", "pass", "runtime nvidia registered"),
    ("Runtimes", "nvidia", "docker.runtime", "fail", "does not have it"),
    ("ServerVersion", 28, "docker.reachable", "pass", "Docker Engine 28 ("),
    ("OperatingSystem", {"name": "x"}, "docker.engine", "pass", "?, cgroup driver systemd"),
    ("CgroupVersion", None, "docker.reachable", "pass", "(Ubuntu 24.04.2 LTS), cgroup v? systemd"),
])
def test_docker_info_of_another_shape(tmp_path, field, value, link, status, said):
    """GET /info fields of another shape than Docker's (another engine on the Docker API, or
    another version): read as absent, or as the strings they hold. Each of the first four was
    a TypeError traceback out of gpu-smoke."""
    docker = FakeDocker()
    info = {**docker.info(), "CDISpecDirs": ["/etc/cdi"], field: value}
    docker.info = lambda: info
    check = assert_link(smoke(healthy_host(tmp_path), docker), link, status)
    assert said in check.summary, check


def test_docker_from_the_snap(tmp_path):
    """The snap's data-root (/var/snap/docker/common/var-lib-docker): its confined dockerd
    cannot reach the host's NVIDIA libraries and hooks."""
    docker = FakeDocker()
    info = {**docker.info(), "DockerRootDir": "/var/snap/docker/common/var-lib-docker"}
    docker.info = lambda: info
    check = assert_link(smoke(healthy_host(tmp_path), docker), "docker.engine", "warn",
                        "sudo snap remove docker")
    assert check.summary.startswith("Docker from the snap"), check


def test_cli_info_cannot_load_nvml(tmp_path):
    host = healthy_host(tmp_path)
    host.answer("nvidia-container-cli", "info",
                real("nvidia-container-cli-list_load-library-failed.txt"), rc=1)
    check = assert_link(smoke(host), "toolkit.cli-info", "fail", "install the NVIDIA driver")
    assert "libnvidia-ml.so.1" in check.summary


def test_the_toolkit_sees_another_driver_and_other_gpus(tmp_path):
    """The toolkit's `nvidia-container-cli info` (the real 4×T4 capture, driver 575) on a host
    whose kernel module and NVML say one H100 on 590: a stale toolkit, a failed link."""
    host = healthy_host(tmp_path)
    host.answer("nvidia-container-cli", "info",
                real("nvidia-container-cli-info_fake-4xT4_575_ctk1.17.6.txt"))
    check = assert_link(smoke(host), "toolkit.cli-info", "fail", "libnvidia-container1",
                        "ldconfig", "restart dockerd")
    assert check.summary == ("the toolkit sees driver 575.57.08 (CUDA 12.2) and 4 GPU(s): NVIDIA "
                             "Tesla T4, but the kernel module is 590.48.01 and NVML lists 1 "
                             "GPU(s)")


@pytest.mark.parametrize("edit, named", [
    (lambda text: text.replace("NVRM version:   590.48.01", "NVRM version:   580.105.08"),
     "the kernel module is 590.48.01"),
    (lambda text: text.replace("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"),
     "NVML lists NVIDIA H100 80GB HBM3"),
])
def test_the_toolkit_disagrees_with_the_host_on_one_thing(tmp_path, edit, named):
    """A driver upgraded under a toolkit that still reads the old one (edit: its version), or
    a GPU model the host does not have (edit: the model name): each alone fails the link."""
    host = healthy_host(tmp_path)
    host.answer("nvidia-container-cli", "info",
                edit(cli_info("nvidia-smi-query-gpu-allfields_h100_590.csv.txt")))
    check = assert_link(smoke(host), "toolkit.cli-info", "fail", "restart dockerd")
    assert named in check.summary


def test_the_toolkit_agrees_with_the_host(tmp_path):
    check = by_id(smoke(healthy_host(tmp_path)))["toolkit.cli-info"]
    assert check.status == "pass" and check.summary == (
        "the toolkit sees driver 590.48.01 (CUDA 13.1) and 1 GPU(s): NVIDIA H100 80GB HBM3")


def test_daemon_json_configured_but_daemon_not_restarted(tmp_path):
    info = real("docker-info_docker28.1.1_nvidia-runtime.txt").replace(
        "Runtimes: io.containerd.runc.v2 nvidia runc", "Runtimes: io.containerd.runc.v2 runc")
    report = smoke(healthy_host(tmp_path), FakeDocker(info_text=info))
    assert_link(report, "docker.runtime", "fail", "restart dockerd")


def test_docker_desktop_hint(tmp_path):
    info = real("docker-info_docker-desktop29.6.2-wsl2_nvidia-runtime_cdi.txt")
    report = smoke(healthy_host(tmp_path), FakeDocker(info_text=info))
    assert_link(report, "docker.engine", "warn", "wsl --update")
    check = assert_link(report, "docker.cdi", "warn", "nvidia-ctk cdi generate")
    assert "docker.com/gpu=webgpu" in check.summary


@pytest.mark.parametrize("capture", [
    "docker-run-gpus_could-not-select-device-driver.txt",
    "docker-compose-gpu_could-not-select-device-driver-nvidia.txt",
])
def test_daemon_cannot_select_the_nvidia_driver(tmp_path, capture):
    report = smoke(healthy_host(tmp_path), FakeDocker(gpu_error=real(capture)))
    check = assert_link(report, "toolkit.docker-runtime", "fail", "nvidia-ctk runtime configure",
                        "restart dockerd")
    assert "could not select device driver" in check.summary
    assert by_id(report)["container.libcuda"].status == "skip"
    assert report.verdict == "cpu-fallback" and report.mode == "container-cpu"


@pytest.mark.parametrize("capture", [
    "docker-run-gpus_load-library-failed-libnvidia-ml.txt",
    "docker-compose-gpu_load-library-failed-libnvidia-ml.txt",
])
def test_hook_cannot_load_the_host_nvml(tmp_path, capture):
    report = smoke(healthy_host(tmp_path), FakeDocker(gpu_error=real(capture)))
    assert_link(report, "host.driver-libraries", "fail", "install the NVIDIA driver", "ldconfig")


@pytest.mark.parametrize("capture,driver,brand", [
    ("docker-compose-gpu_requirement-cuda12.8_driver550.txt", "550.144.03", "GeForce"),
    ("docker-run-gpus_requirement-cuda12.8_win-docker-desktop_551.txt", "551.78", "Tesla"),
])
def test_image_needs_a_newer_driver(tmp_path, capture, driver, brand):
    """The drivers of the two reports (edits: version numbers; the GPU brand the toolkit sees).
    A Tesla on 550.x would be let in by the image's brand=tesla,driver>=550 exception."""
    host = healthy_host(tmp_path)
    host.write("/proc/driver/nvidia/version", real(
        "proc-driver-nvidia-version_580-proprietary.txt").replace("580.173.02", driver))
    host.answer("nvidia-smi", "--query-gpu", real(
        "nvidia-smi-query-gpu-allfields_h100_590.csv.txt").replace("590.48.01", driver))
    host.answer("nvidia-container-cli", "info", cli_info(
        "nvidia-smi-query-gpu-allfields_h100_590.csv.txt").replace("590.48.01", driver)
        .replace("Brand:          NVIDIA", f"Brand:          {brand}"))
    report = smoke(host, FakeDocker(gpu_error=real(capture)))
    preflight = assert_link(report, "image.requirement", "fail", "update the host driver")
    assert driver in preflight.summary and brand in preflight.summary
    inside = assert_link(report, "container.passthrough", "fail", "upgrade the host driver")
    assert "cuda>=12.8" in inside.summary
    assert report.first_failed.id == "image.requirement"


def test_nvml_unknown_error_inside_the_container(tmp_path):
    probe_out = (FakeDocker().probe_out.split("== nvidia-smi")[0] + "== nvidia-smi\n"
                 + real("nvidia-smi_nvml-unknown-error.txt"))
    report = smoke(healthy_host(tmp_path), FakeDocker(probe_out=probe_out))
    assert_link(report, "container.nvidia-smi", "fail", "recreate the container",
                "native.cgroupdriver=cgroupfs")


def test_no_driver_libraries_injected(tmp_path):
    probe_out = FakeDocker().probe_out.replace("libcuda.so.1 (libc6", "libcudart.so.12 (libc6")
    report = smoke(healthy_host(tmp_path), FakeDocker(probe_out=probe_out))
    check = assert_link(report, "container.libcuda", "fail", "NVIDIA_DRIVER_CAPABILITIES")
    assert check.summary.endswith("libcuda.so.1")


def test_container_without_injection(tmp_path):
    probe_out = ("== devices\n== driver\ncat: /proc/driver/nvidia/version: No such file or "
                 "directory\n== ldconfig\n== nvidia-smi\nsh: 1: nvidia-smi: not found\n")
    report = smoke(healthy_host(tmp_path), FakeDocker(probe_out=probe_out))
    assert_link(report, "container.devices", "fail", "--gpus all")
    assert_link(report, "container.driver", "fail", "--gpus all")


@pytest.mark.parametrize("capture,remedy", [
    ("jax_warning_cuda-jaxlib-not-installed.txt", 'jax[cuda12]'),
    ("jax_warning_cuda-backend-failed_outdated-cusparse.txt", "jax-cuda12-plugin"),
    ("jax_warning_cuda-backend-failed_unable-to-load-cuda.txt", "TF_CPP_MIN_LOG_LEVEL=0"),
    ("jax_plugin-init-failure_cusparse_fallback-to-cpu.txt", 'jax[cuda12]'),
])
def test_gpu_reached_but_jax_fell_back_to_cpu(tmp_path, capture, remedy):
    client = FakeDocker(model_out=model_report("cpu"), model_err=real(capture))
    report = smoke(healthy_host(tmp_path), client)
    assert_link(report, "jax.backend", "fail", remedy)
    assert report.verdict == "cpu-fallback" and report.first_failed.id == (
        "jax.backend")


def test_wsl2_gpu_access_blocked(tmp_path):
    host = bare_host(tmp_path)
    host.write("/dev/dxg")
    host.answer("nvidia-smi", "--query-gpu", real("nvidia-smi_wsl2_gpu-access-blocked.txt"),
                rc=255)
    report = smoke(host)
    assert by_id(report)["host.gpu"].status == "pass"
    assert by_id(report)["host.kernel-module"].status == "skip"
    assert_link(report, "host.nvml", "fail", "wsl --update")


def test_wrong_numbers_on_the_gpu_fail_the_verdict(tmp_path):
    client = FakeDocker(model_out=model_report("gpu", parity="fail", diff=0.3))
    report = smoke(healthy_host(tmp_path), client)
    assert_link(report, "model.parity", "fail", "wrong numbers")
    assert report.verdict == "fail"


def test_missing_image_says_how_to_build_it(tmp_path):
    report = smoke(healthy_host(tmp_path), FakeDocker(missing_image=True))
    check = assert_link(report, "image.present", "fail", "envcheck build")
    assert "docker pull" not in check.fix  # the default image is built here, never pulled
    assert by_id(report)["container.passthrough"].status == "skip"
    assert report.verdict == "fail"


def fake_build(monkeypatch, docker, error: Exception | None = None) -> list[dict]:
    """envcheck build at its seam: it records what it was asked, then fails with `error` or
    makes the image appear in the fake engine."""
    from envcheck import build as builder

    asked = []

    def build(**options):
        asked.append(options)
        options["on_step"]("step 1/20 (FROM base)")
        if error is not None:
            raise error
        docker.missing_image = False

    monkeypatch.setattr(builder, "build", build)
    return asked


def test_a_missing_image_is_built_first(tmp_path, monkeypatch):
    """--build-missing on a GPU host: the CUDA base and jax[cuda12], then the whole chain."""
    from envcheck.build import BuildOptions

    docker, stages = FakeDocker(missing_image=True, model_out=model_report("gpu")), []
    asked = fake_build(monkeypatch, docker)
    report = smoke(healthy_host(tmp_path), docker, build=BuildOptions(network="host"),
                   on_stage=stages.append)
    assert [(a["base_image"], a["jax_extra"], a["network"], a["tag"]) for a in asked] == [
        ("nvidia/cuda:12.8.0-cudnn-devel-ubuntu24.04", "cuda12", "host", "envcheck-dev:latest")]
    present = by_id(report)["image.present"]
    assert present.status == "pass" and present.summary.endswith(
        "; built by this run from nvidia/cuda:12.8.0-cudnn-devel-ubuntu24.04")
    assert report.verdict == "gpu" and report.mode == "container-gpu"
    assert not report.container_untested and "build" in report.timings_s
    assert "building envcheck-dev:latest: step 1/20 (FROM base)" in stages


def test_a_host_without_a_gpu_builds_on_a_slim_base(tmp_path, monkeypatch):
    from envcheck.build import BuildOptions

    docker = FakeDocker(missing_image=True)
    asked = fake_build(monkeypatch, docker)
    smoke(bare_host(tmp_path), docker, build=BuildOptions())
    assert [(a["base_image"], a["jax_extra"]) for a in asked] == [
        ("python:3.12-slim-bookworm", "cpu")]


def test_no_base_to_build_from_tests_on_the_host_and_says_so(tmp_path, monkeypatch):
    """Offline, no registry: the model test runs on this host, every container link is
    skipped with the reason, and the report says the container path was not tested."""
    import io

    from rich.console import Console

    from envcheck import build as builder
    from envcheck.build import BuildOptions
    from envcheck.gpu_smoke import chain
    from envcheck.gpu_smoke.render import render_smoke
    from envcheck.runner import RunResult

    docker = FakeDocker(missing_image=True)
    fake_build(monkeypatch, docker, builder.NoBase("base image x:1 is not present locally and "
                                                   "cannot be pulled (no such host)"))
    monkeypatch.setattr(chain, "host_model_run", lambda timeout_s, level: RunResult(
        0, json.dumps(model_report("cpu")), ""))
    report = smoke(bare_host(tmp_path), docker, build=BuildOptions(base_image="x:1"))
    present = by_id(report)["image.present"]
    assert present.status == "skip" and "cannot be built here: base image x:1" in present.summary
    assert all(by_id(report)[i].status == "skip" for i in chain.CONTAINER_IDS[1:])
    assert report.mode == "host" and report.verdict == "cpu-fallback"
    assert report.container_untested == present.summary
    text = io.StringIO()
    render_smoke(report, Console(file=text, width=400))
    assert text.getvalue().splitlines()[-1].endswith(
        "; the container path was not tested (image.present says why)")


def test_a_build_that_fails_fails_the_image_link(tmp_path, monkeypatch):
    from envcheck import build as builder
    from envcheck.build import BuildOptions

    docker = FakeDocker(missing_image=True)
    fake_build(monkeypatch, docker, builder.BuildError("build failed at step 9/20 (RUN pip)",
                                                       ["ERROR: No matching distribution"]))
    report = smoke(healthy_host(tmp_path), docker, build=BuildOptions())
    check = assert_link(report, "image.present", "fail", "envcheck build")
    assert "building it failed: build failed at step 9/20" in check.summary
    assert report.verdict == "fail" and not report.container_untested


@pytest.mark.parametrize("case", ["healthy", "bare", "requirement", "missing-image",
                                  "leftovers"])
def test_json_reports_validate_against_the_schema(tmp_path, case):
    import json

    import jsonschema

    from tests.conftest import REPO

    schema = json.loads((REPO / "envcheck/data/schemas/smoke.v1.json").read_text())
    host = bare_host(tmp_path) if case == "bare" else healthy_host(tmp_path)
    client = FakeDocker(missing_image=case == "missing-image", gpu_error=real(
        "docker-compose-gpu_requirement-cuda12.8_driver550.txt") if case == "requirement" else None)
    if case == "leftovers":
        client.leave("envcheck-gpu-smoke-0123456789ab", owned_by(ended_process()))
    report = smoke(host, client).to_json()
    assert ("leftovers_removed" in report) == (case == "leftovers")
    jsonschema.validate(json.loads(json.dumps(report)), schema)
    broken = {**report, "verdict": "maybe"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_daemon_restarted_during_the_model_run(tmp_path):
    """dockerd goes away while the model container runs: the SDK raises ConnectionError from
    wait() and from remove(); the report says so, no traceback."""
    import requests

    gone = requests.exceptions.ConnectionError("('Connection aborted.', RemoteDisconnected("
                                               "'Remote end closed connection without response'))")
    report = smoke(healthy_host(tmp_path), FakeDocker(model_wait_error=gone))
    check = assert_link(report, "model.run", "fail", "dockerd is back")
    assert "dockerd restarted?" in check.summary and report.verdict == "fail"


def test_daemon_that_stops_answering_after_the_ping(tmp_path, monkeypatch):
    import json

    import requests

    from envcheck.gpu_smoke import chain as smoke_module
    from envcheck.runner import RunResult

    class Dying(FakeDocker):
        def info(self):
            raise requests.exceptions.ConnectionError("Connection aborted.")

    monkeypatch.setattr(smoke_module, "host_model_run", lambda timeout_s, level: RunResult(
        0, json.dumps(model_report("cpu")), ""))
    report = smoke(healthy_host(tmp_path), Dying())
    assert_link(report, "docker.reachable", "fail", "systemctl start docker")
    assert report.mode == "host" and report.verdict == "fail"


# What the OCI runtimes say when the image lacks the program (runc as Docker 28 words it; older
# Docker with escaped quotes, containerd/containerd#3597; crun, containers/crun#1688).
NO_SHELL_ERRORS = [
    'failed to create task for container: failed to create shim task: OCI runtime create '
    'failed: runc create failed: unable to start container process: error during container '
    'init: exec: "sh": executable file not found in $PATH: unknown',
    'OCI runtime create failed: container_linux.go:345: starting container process caused '
    '"exec: \\"sh\\": executable file not found in $PATH": unknown',
    "crun: executable file `sh` not found in $PATH: No such file or directory: OCI runtime "
    "attempted to invoke a command that was not found",
]


@pytest.mark.parametrize("error", NO_SHELL_ERRORS)
def test_an_image_without_a_shell_cannot_be_probed_but_still_runs_the_model(tmp_path, error):
    """A distroless Python image on a healthy host: the probe is a warning (it says nothing
    about the GPU), the model still runs on the GPU and decides the verdict."""
    report = smoke(healthy_host(tmp_path), FakeDocker(gpu_error=error))
    check = assert_link(report, "container.passthrough", "warn", "envcheck build")
    assert "no `sh`" in check.summary
    assert {by_id(report)[i].status for i in ("container.devices", "container.libcuda")} == {
        "skip"}
    assert report.verdict == "gpu"
