"""The inspect-image pipeline: reference -> source -> index/manifest/config -> streamed layers ->
merged view -> facts and checks (`envcheck.image/v1`)."""

from __future__ import annotations

import os

from envcheck.image import cuda, jaxstack, reference
from envcheck.image.blobstream import tune_allocator
from envcheck.image.errors import LayerError
from envcheck.image.filetree import MergedView
from envcheck.image.layers import LayerScan
from envcheck.image.libraries import (
    LIBRARIES,
    cuda_files,
    explain_library,
    library_checks,
    read_ldcache,
)
from envcheck.image.manifest import Resolved, host_arch, resolve
from envcheck.image.python import python_facts
from envcheck.image.reference import ImageRef
from envcheck.image.report import (
    ConfigFacts,
    CudaFacts,
    CudaFiles,
    FileRow,
    ImageReport,
    JaxLibraries,
    LayerRow,
    ManifestFacts,
    PackageVersion,
)
from envcheck.image.sources import ImageSource, Progress, open_source
from envcheck.nvidia.cuda import (
    RequirementError,
    RequirementVerdict,
    parse_requirement,
    requirement_cases,
    requirement_check,
)
from envcheck.nvidia.driver import host_driver_version
from envcheck.report import Check, redact_env, redact_text

ENV_KEYS = ("PATH", "LD_LIBRARY_PATH", "LIBRARY_PATH", "NVIDIA_VISIBLE_DEVICES",
            "NVIDIA_DRIVER_CAPABILITIES", "NVIDIA_REQUIRE_CUDA", "CUDA_VERSION",
            "NV_CUDNN_VERSION", "NCCL_VERSION", "NVIDIA_DISABLE_REQUIRE")


def default_jobs() -> int:
    """Layers streamed at once: one layer keeps about 1.5-2 cores busy (inflate on one, both
    sha256s and the socket on another), so one per two cores, 2 to 4; 1 on a single core.
    (On 2 cores two big CUDA library layers one after the other took 1.14-1.20x as long as
    both at once, x86 ones 1.03x: bench_inspect's `2 big` rows.)"""
    cores = os.cpu_count() or 1
    return 1 if cores < 2 else min(4, max(2, cores // 2))


def scan_all(source: ImageSource, resolved: Resolved, progress: Progress = None,
             jobs: int = 1) -> list[LayerScan]:
    """Every layer of the resolved manifest, scanned and verified by its source."""
    return source.layer_scans(resolved.manifest.get("layers") or [], progress, jobs)


ZSTD_CHUNKED_ANNOTATION = "io.containers.zstd-chunked.manifest-checksum"
ZSTD_CHUNKED_FIX = (
    "layer {index} is zstd:chunked: containers/image's zstd:chunked writer (podman, buildah, "
    "skopeo) has recorded the digest of the tar it was given while writing a different one "
    "(containers/storage#1771, container-libs#391); pulls that check DiffIDs refuse it (\"does "
    "not match config's DiffID\"): push it again with --compression-format gzip or zstd")


def diff_id_check(scans: list[LayerScan], config: dict, layers: list[dict]) -> Check:
    """The diff_ids computed while streaming against the config's rootfs.diff_ids; `layers`
    (the manifest's descriptors) tell a zstd:chunked layer, whose mismatch has a known cause."""
    expected = (config.get("rootfs") or {}).get("diff_ids") or []
    got = [s.diff_id for s in scans]
    if got == expected:
        return Check("image.diff-ids", "pass",
                     f"{len(got)} layer diff_ids computed while streaming equal rootfs.diff_ids")
    fix = "the image is corrupted or was tampered with: re-pull or rebuild it"
    if len(got) != len(expected):
        detail = f"{len(got)} layers but the config lists {len(expected)} diff_ids"
    else:
        bad = next(i for i, (a, b) in enumerate(zip(got, expected, strict=True)) if a != b)
        detail = f"layer {bad}: uncompressed sha256 {got[bad]} ≠ config {expected[bad]}"
        annotations = (layers[bad] if bad < len(layers) else {}).get("annotations") or {}
        if ZSTD_CHUNKED_ANNOTATION in annotations:
            fix = ZSTD_CHUNKED_FIX.format(index=bad)
    return Check("image.diff-ids", "fail", f"layer contents do not match the config: {detail}",
                 fix=fix)


def env_dict(config: dict) -> dict[str, str]:
    env = {}
    for item in (config.get("config") or {}).get("Env") or []:
        key, _, value = item.partition("=")
        env[key] = value
    return env


def inspect_image(text: str, *, platform: str | None = None, file_globs: tuple[str, ...] = (),
                  layers: bool = True, driver_version: str | None = None,
                  progress: Progress = None, timeout_s: float = 30.0,
                  jobs: int | None = None) -> ImageReport:
    """Raises reference.RefSyntaxError (exit 2), SourceError (exit 1 or 2) and LayerError
    (exit 1) for inputs that give no report at all; everything else is a Check."""
    ref = reference.parse(text)
    if layers:
        tune_allocator()
    source = open_source(ref, timeout_s, progress, scan_layers=layers)
    try:
        resolved = resolve(source, platform)
        scans = scan_all(source, resolved, progress, jobs or default_jobs()) if layers else []
    except LayerError as error:
        raise LayerError(f"{source.description}: {error}") from None
    finally:
        source.close()
    return build_report(ref, resolved, scans, file_globs, layers,
                        driver_version or host_driver_version())


def build_report(ref: ImageRef, resolved: Resolved, scans: list[LayerScan],
                 file_globs: tuple[str, ...], layers: bool, driver: str | None) -> ImageReport:
    env = env_dict(resolved.config)
    checks = [Check("image.digests", "pass",
                    f"manifest and config verified; {len(scans)} layer blobs verified while "
                    "streaming" if layers else "manifest and config verified (layers not read)")]
    view = MergedView()
    for scan in scans:
        view.apply(scan)
    report = base_report(ref, resolved, env, scans)
    arch = resolved.config.get("architecture", host_arch())
    compat: list[str] = []
    if layers:
        checks.append(diff_id_check(scans, resolved.config, resolved.manifest.get("layers") or []))
        checks += layer_facts(report, view, env, arch, file_globs, driver)
        compat = report.cuda.compat
    requirement, verdict = requirement_check(env, env.get("CUDA_VERSION"), driver, compat, layers)
    checks.append(requirement)
    report.requirement = verdict or RequirementVerdict(
        cases=requirement_cases(_safe_alternatives(env.get("NVIDIA_REQUIRE_CUDA", ""))))
    report.checks = checks
    report.verdict = "fail" if any(c.status == "fail" for c in checks) else "ok"
    return report


def layer_facts(report: ImageReport, view: MergedView, env: dict[str, str], arch: str,
                file_globs: tuple[str, ...], driver: str | None) -> list[Check]:
    """What the merged view of the layers shows: where the CUDA libraries resolve, the CUDA
    files and versions, the Python packages, the JAX plugin's libraries, the files asked for;
    into `report`, and their checks."""
    cache, cache_check = read_ldcache(view)
    report.libraries = [explain_library(s, view, cache, env, arch) for s in LIBRARIES]
    files = cuda_files(view, env)
    report.cuda = cuda_facts(view, env, files)
    report.python, python_check = python_facts(view.kept)
    report.shared_objects = view.shared_objects()
    simulated = jaxstack.simulate(view, cache, env, arch, report.shared_objects, report.python)
    if simulated:
        report.jax_libraries = JaxLibraries(plugin=simulated[0], loads=simulated[1])
    report.files, report.files_unmatched = files_matching(view, file_globs)
    plugin, loads = simulated or (None, [])
    return [cache_check, *library_checks(report.libraries, files), python_check,
            jaxstack.stack_check(report.python, loads, env, driver, view),
            jaxstack.libraries_check(view, plugin, loads)]


def _safe_alternatives(require: str) -> list:
    try:
        return parse_requirement(require)
    except RequirementError:
        return []


def base_report(ref: ImageRef, resolved: Resolved, env: dict,
                scans: list[LayerScan]) -> ImageReport:
    """What the config and the manifest say (and the layers' digests); checks and the CUDA
    facts of the layers are added by build_report."""
    config = resolved.config.get("config") or {}
    history = [h for h in resolved.config.get("history") or [] if not h.get("empty_layer")]
    layer_rows = []
    for index, descriptor in enumerate(resolved.manifest.get("layers") or []):
        scan = scans[index] if index < len(scans) else None
        created_by = history[index].get("created_by") if index < len(history) else None
        layer_rows.append(LayerRow(
            digest=scan.digest if scan else descriptor.get("digest"),
            size=descriptor.get("size"), media_type=descriptor.get("mediaType"),
            compression=scan.compression if scan else None,
            diff_id=scan.diff_id if scan else None, files=scan.file_count if scan else None,
            uncompressed_size=scan.uncompressed_bytes if scan else None,
            created_by=redact_text(str(created_by)) if created_by else None))
    return ImageReport(
        verdict="ok", checks=[], reference=str(ref), source=ref.transport,
        index_digest=resolved.index_digest,
        manifest=ManifestFacts(digest=resolved.manifest_digest,
                               media_type=resolved.manifest_media_type),
        config=ConfigFacts(digest=resolved.config_digest, created=resolved.config.get("created"),
                           platform=resolved.platform),
        layers=layer_rows,
        # The GPU-relevant variables first (ENV_KEYS order), then the rest as the image has them.
        env=redact_env({**{k: env[k] for k in ENV_KEYS if k in env}, **env}),
        labels={str(k): str(v) for k, v in (config.get("Labels") or {}).items()},
        entrypoint=config.get("Entrypoint"), cmd=config.get("Cmd"),
        user=config.get("User") or "",
        cuda=CudaFacts(cuda_version=env.get("CUDA_VERSION"),
                       cudnn_version=env.get("NV_CUDNN_VERSION")),
        requirement=RequirementVerdict())


def cuda_facts(view: MergedView, env: dict, files: CudaFiles) -> CudaFacts:
    status = view.kept.get("var/lib/dpkg/status", b"").decode("utf-8", "replace")
    packages = cuda.package_versions(cuda.parse_dpkg_status(status))
    return CudaFacts(cuda_version=env.get("CUDA_VERSION"),
                     packages={k: PackageVersion(**v) for k, v in packages.items()},
                     libraries=cuda.library_versions(view.files), stubs=files.stubs,
                     compat=files.compat, stubs_on_ld_library_path=files.stubs_on_ld_library_path,
                     usr_local_cuda=files.usr_local_cuda, compat_dir=files.compat_dir)


def files_matching(view: MergedView, globs: tuple[str, ...]) -> tuple[list[FileRow], list[str]]:
    """The rows of the paths the globs match, each path once, in the globs' order; and the
    globs that match nothing (said, as `ls` says so, rather than left out silently)."""
    rows, seen, unmatched = [], set(), []
    for pattern in globs:
        found = view.glob(pattern)
        if not found:
            unmatched.append(pattern)
        for path, info in found:
            if path not in seen:
                seen.add(path)
                rows.append(FileRow(path="/" + path, size=info.size, mode=f"{info.mode:o}",
                                    kind=info.kind, link=info.link, layer=info.layer))
    return rows, unmatched
