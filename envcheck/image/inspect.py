"""The inspect-image pipeline: reference -> source -> index/manifest/config -> streamed layers ->
merged view -> facts and checks (`envcheck.image/v1`)."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import platform as host_platform
import posixpath
from collections.abc import Callable
from pathlib import Path

from envcheck.host.driver import parse_driver_version
from envcheck.image import cuda, ldcache, reference
from envcheck.image.blobstream import Cancelled, Halt, tune_allocator
from envcheck.image.filetree import MergedView
from envcheck.image.layers import FileBudget, LayerError, LayerScan, scan_layer
from envcheck.image.registry import RegistryError
from envcheck.image.sources import (
    INDEX_TYPES,
    ImageSource,
    SavedStreamSource,
    SourceError,
    open_source,
)
from envcheck.report import Check, Report, redact_env, redact_text

LIBRARIES = ("libcuda.so.1", "libcudart.so.12", "libcudnn.so.9", "libnvidia-ml.so.1")
DRIVER_LIBRARIES = ("libcuda.so.1", "libnvidia-ml.so.1")  # belong to the host driver
AT_RUN_TIME = ("at run time the NVIDIA Container Toolkit mounts the host driver's copy into the "
               "container's library directory and refreshes ld.so.cache; an image never ships it")
DEFAULT_DIRS = {"amd64": ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib64",
                          "usr/lib64", "lib", "usr/lib"),
                "arm64": ("lib/aarch64-linux-gnu", "usr/lib/aarch64-linux-gnu", "lib", "usr/lib")}
ATTESTATION = "attestation-manifest"
ENV_KEYS = ("PATH", "LD_LIBRARY_PATH", "LIBRARY_PATH", "NVIDIA_VISIBLE_DEVICES",
            "NVIDIA_DRIVER_CAPABILITIES", "NVIDIA_REQUIRE_CUDA", "CUDA_VERSION",
            "NV_CUDNN_VERSION", "NCCL_VERSION", "NVIDIA_DISABLE_REQUIRE")


@dataclasses.dataclass
class Resolved:
    index_digest: str | None
    manifest_digest: str | None
    manifest_media_type: str
    manifest: dict
    config_digest: str | None
    config: dict
    platform: str


def host_arch() -> str:
    machine = host_platform.machine().lower()
    return {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(machine, machine)


def choose_platform(index: dict, wanted: str, description: str) -> dict:
    """The index entry for `wanted` (os/arch[/variant]), skipping attestation manifests."""
    candidates = []
    entries = index.get("manifests")
    if not isinstance(entries, list):
        raise SourceError(f"{description}: malformed index (no manifests list)")
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        plat = entry.get("platform") if isinstance(entry.get("platform"), dict) else {}
        annotations = entry.get("annotations")
        kind = annotations.get("vnd.docker.reference.type") if isinstance(annotations,
                                                                           dict) else None
        if kind == ATTESTATION or plat.get("os") == "unknown":
            continue
        name = "/".join(str(p) for p in (plat.get("os"), plat.get("architecture"),
                                         plat.get("variant")) if p)
        if isinstance(entry.get("digest"), str):
            candidates.append((name, entry))
    for name, entry in candidates:
        if platform_matches(name, wanted):
            return entry
    available = ", ".join(name for name, _ in candidates) or "none"
    raise SourceError(f"{description}: no manifest for platform {wanted} (available: "
                      f"{available}); choose one with --platform")


def platform_matches(name: str, wanted: str) -> bool:
    """`name` (os/arch[/variant]) is `wanted`; an os/arch `wanted` takes any variant."""
    return name == wanted or wanted.count("/") == 1 and name.rsplit("/", 1)[0] == wanted


def check_manifest(body: dict, description: str) -> None:
    """The fields this pipeline reads, with the right types; a malformed manifest is one error."""
    config = body.get("config")
    layers = body.get("layers")
    problems = []
    if not isinstance(config, dict) or not isinstance(config.get("digest"), (str, type(None))):
        problems.append("no config descriptor")
    if not isinstance(layers, list):
        problems.append("no layers list")
    else:
        for index, layer in enumerate(layers):
            valid = isinstance(layer, dict) and isinstance(layer.get("digest"), (str, type(None)))
            if not valid or not isinstance(layer.get("size", 0), int):
                problems.append(f"layer {index} is not a descriptor with digest and size")
    if problems:
        raise SourceError(f"{description}: malformed manifest ({'; '.join(problems)})")


def check_config(config: dict, description: str) -> None:
    """The config fields this pipeline reads, with the right types (one error otherwise)."""
    inner = config.get("config") or {}
    rootfs = config.get("rootfs") or {}
    history = config.get("history") or []
    strings = (str, type(None))
    problems = [name for name, ok in (
        ("config", isinstance(inner, dict)), ("rootfs", isinstance(rootfs, dict)),
        ("history", isinstance(history, list) and all(isinstance(h, dict) for h in history)),
        *((key, isinstance(config.get(key), strings)) for key in
          ("os", "architecture", "variant", "created")),
    ) if not ok]
    if not problems:
        problems += [f"config.{key}" for key, ok in (
            ("Env", _str_list(inner.get("Env"))),
            ("Entrypoint", _str_list(inner.get("Entrypoint"))),
            ("Cmd", _str_list(inner.get("Cmd"))), ("User", isinstance(inner.get("User"), strings)),
            ("Labels", isinstance(inner.get("Labels") or {}, dict)),
        ) if not ok]
        problems += [] if _str_list(rootfs.get("diff_ids")) else ["rootfs.diff_ids"]
    if problems:
        raise SourceError(f"{description}: the image config is malformed "
                          f"({', '.join(problems)} of the wrong type)")


def _str_list(value) -> bool:
    return value is None or isinstance(value, list) and all(isinstance(v, str) for v in value)


def resolve(source: ImageSource, wanted_platform: str | None) -> Resolved:
    top = source.top()
    index_digest = None
    wanted = wanted_platform or f"linux/{host_arch()}"
    from_index = top.media_type in INDEX_TYPES or "manifests" in top.body
    if from_index:
        index_digest = top.digest
        entry = choose_platform(top.body, wanted, source.description)
        top = source.manifest(entry["digest"])
    check_manifest(top.body, source.description)
    config_descriptor = top.body["config"]
    config = source.json_blob(config_descriptor.get("digest"))
    check_config(config, source.description)
    plat = "/".join(p for p in (config.get("os"), config.get("architecture"),
                                config.get("variant")) if p)
    if wanted_platform and not from_index and plat.split("/")[:2] != wanted.split("/")[:2]:
        raise SourceError(f"{source.description}: the image is {plat or 'of no platform'} "
                          f"only (one manifest, no index), not {wanted}: drop --platform or "
                          "choose an image built for it")
    return Resolved(index_digest, top.digest, top.media_type, top.body,
                    config_descriptor.get("digest"), config, plat)


def default_jobs() -> int:
    """Layers streamed at once: one layer keeps about 1.5-2 cores busy (inflate on one, both
    sha256s and the socket on another), so one per two cores, 2 to 4; 1 on a single core.
    (On 2 cores two big CUDA library layers one after the other took 1.14-1.20x as long as
    both at once, x86 ones 1.03x: bench_inspect's `2 big` rows.)"""
    cores = os.cpu_count() or 1
    return 1 if cores < 2 else min(4, max(2, cores // 2))


def scan_all(source: ImageSource, resolved: Resolved,
             progress: Callable[[int, int], Callable[[int], None]] | None = None,
             jobs: int = 1) -> list[LayerScan]:
    """Every layer, up to `jobs` at a time. A failure stops the other layers (at their next
    chunk, in a retry back-off, or in a read from a hung connection); the lowest failing
    layer is raised."""
    descriptors = resolved.manifest.get("layers") or []
    if isinstance(source, SavedStreamSource):  # its one pass has scanned them already
        return source.scans(descriptors)
    stop, budget = Halt(), FileBudget()

    def scan(index: int, descriptor: dict) -> LayerScan:
        if stop.is_set():
            raise Cancelled()
        report = progress(index, descriptor.get("size") or 0) if progress else None
        with source.open_layer(descriptor, stop) as blob, stop.watch(blob):
            return scan_layer(blob, index, expected_digest=descriptor.get("digest"),
                              expected_size=descriptor.get("size"), progress=report, stop=stop,
                              budget=budget)

    workers = min(jobs, len(descriptors))
    if workers <= 1:
        return [scan(index, descriptor) for index, descriptor in enumerate(descriptors)]
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="layer") as pool:
        futures = [pool.submit(scan, i, d) for i, d in enumerate(descriptors)]
        try:
            for future in concurrent.futures.as_completed(futures):
                if future.exception() is not None:
                    stop.set()
        finally:
            stop.set()  # also on Ctrl-C: the running layers stop at their next chunk
    errors = [e for e in (f.exception() for f in futures)
              if e is not None and not isinstance(e, Cancelled)]
    if errors:
        raise errors[0]
    return [future.result() for future in futures]


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


def explain_library(soname: str, view: MergedView, cache: ldcache.LdCache | None,
                    env: dict[str, str], arch: str) -> dict:
    """Where ld.so would find `soname` in this image, step by step, as it searches."""
    steps, found, via = [], None, None
    for directory in [d for d in env.get("LD_LIBRARY_PATH", "").split(":") if d]:
        target = view.resolve(posixpath.join(directory, soname))
        if target and not found:
            found, via = "/" + target, "LD_LIBRARY_PATH"
        where = "/" + target if target else (
            "not there" if view.resolve(directory) else "directory absent in the image")
        steps.append(f"LD_LIBRARY_PATH {directory}: {where}")
    entries = cache.lookup(soname, arch) if cache else []
    for entry in entries:
        present = view.resolve(entry.path)
        steps.append(f"ld.so.cache: {entry.path}" + ("" if present else " (missing file)"))
        if present and not found:
            found, via = entry.path, "ld.so.cache"
    if not entries:
        steps.append("ld.so.cache: no entry" if cache else "ld.so.cache: none in the image")
    for directory in DEFAULT_DIRS.get(arch, ()):
        target = view.resolve(posixpath.join(directory, soname))
        if target and not found:
            found, via = "/" + target, "default directory"
            steps.append(f"default directory /{directory}: /{target}")
    at_run_time = AT_RUN_TIME if soname in DRIVER_LIBRARIES and not found else None
    return {"soname": soname, "resolves_to": found, "via": via, "steps": steps,
            "at_run_time": at_run_time}


def stub_and_compat(view: MergedView, env: dict[str, str]) -> dict:
    # A file reached through a symlink (/usr/local/cuda -> cuda-12.8) is named once, by its
    # real path: it is one library, not two.
    stubs = sorted({"/" + (view.resolve(p) or p) for p, _ in view.glob("**/stubs/libcuda.so*")})
    compat = sorted({"/" + (view.resolve(p) or p) for p, info in
                     view.glob("usr/local/cuda*/compat/libcuda.so.*.*") if info.kind == "file"})
    on_path = [d for d in env.get("LD_LIBRARY_PATH", "").split(":") if "stubs" in d]
    return {"stubs": stubs, "compat": compat, "stubs_on_ld_library_path": on_path,
            "usr_local_cuda": view.resolve("usr/local/cuda") is not None,
            "compat_dir": view.resolve("usr/local/cuda/compat") is not None}


def library_checks(libraries: list[dict], extra: dict) -> list[Check]:
    checks = []
    libcuda = libraries[0]
    if extra["stubs_on_ld_library_path"]:
        checks.append(Check(
            "image.libcuda-stubs", "fail",
            f"LD_LIBRARY_PATH includes {', '.join(extra['stubs_on_ld_library_path'])}: the "
            "link-time stub libcuda.so would shadow the real driver",
            fix="remove the stubs directory from LD_LIBRARY_PATH (use LIBRARY_PATH for linking)"))
    if libcuda["resolves_to"] and "compat" not in libcuda["resolves_to"]:
        checks.append(Check(
            "image.libcuda", "warn",
            f"the image ships its own libcuda.so.1 ({libcuda['resolves_to']}, via "
            f"{libcuda['via']}): it must match the host driver exactly",
            fix="remove driver libraries from the image; the Container Toolkit mounts the "
                "host's libcuda.so.1 at run time"))
    else:
        checks.append(Check(
            "image.libcuda", "pass",
            "no libcuda.so.1 in the image: at run time the NVIDIA Container Toolkit mounts the "
            "host driver's and refreshes ld.so.cache" + (
                f"; compat {', '.join(extra['compat'])} is used only on older drivers"
                if extra["compat"] else "")))
    return checks


def requirement_check(env: dict[str, str], cuda_version: str | None, driver: str | None,
                      compat: list[str], compat_known: bool, brand: str | None = None
                      ) -> tuple[Check, dict | None]:
    require = env.get("NVIDIA_REQUIRE_CUDA", "")
    if not driver:
        return Check("image.requirement", "skip",
                     "no driver version to judge NVIDIA_REQUIRE_CUDA against",
                     fix="pass --driver-version X.Y (or run on the GPU host)"), None
    compat_version = compat[0].rsplit("libcuda.so.", 1)[-1] if compat else None
    try:
        verdict = cuda.requirement_verdict(require, cuda_version, driver, compat_version,
                                           compat_known, brand)
    except cuda.RequirementError as error:
        return Check("image.requirement", "fail", f"NVIDIA_REQUIRE_CUDA unreadable: {error}",
                     fix="fix the image's NVIDIA_REQUIRE_CUDA"), None
    if verdict["toolkit_starts"] is False:
        first = require.split()[0] if require else ""
        return Check("image.requirement", "fail",
                     f"driver {driver} (CUDA {verdict['driver_cuda']}"
                     + (f", {brand}" if brand else "") + "): the Container Toolkit "
                     f"refuses to start this image (unsatisfied condition: {first})",
                     fix="update the host driver (see the cases), or use an image built for an "
                         "older CUDA; NVIDIA_DISABLE_REQUIRE=1 skips the check"), verdict
    status = "pass" if verdict["toolkit_starts"] and verdict["how"] == "natively" else "warn"
    if verdict["cuda_runs"] is False:
        return Check("image.requirement", "fail",
                     f"driver {driver} (CUDA {verdict['driver_cuda']}): the toolkit would start "
                     f"the container but CUDA {cuda_version} cannot run: {verdict['how']}",
                     fix="update the host driver to a branch that supports this CUDA"), verdict
    starts = "starts" if verdict["toolkit_starts"] else (
        f"starts only on GPU brands {', '.join(verdict['brands'])}")
    return Check("image.requirement", status,
                 f"driver {driver} (CUDA {verdict['driver_cuda']}): the toolkit {starts}; CUDA "
                 f"runs {verdict['how']}"), verdict


def host_driver_version(root: Path = Path("/")) -> str | None:
    try:
        text = (root / "proc/driver/nvidia/version").read_text()
    except OSError:
        return None
    return parse_driver_version(text)[0]


def inspect_image(text: str, *, platform: str | None = None, file_globs: tuple[str, ...] = (),
                  layers: bool = True, driver_version: str | None = None,
                  progress=None, timeout_s: float = 30.0, jobs: int | None = None) -> Report:
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
    except RegistryError as error:  # raised while a layer streams (blob 404, dropped for good)
        raise SourceError(str(error)) from None
    finally:
        source.close()
    return build_report(ref, source, resolved, scans, file_globs, layers,
                        driver_version or host_driver_version())


def build_report(ref, source, resolved: Resolved, scans: list[LayerScan],
                 file_globs: tuple[str, ...], layers: bool, driver: str | None) -> Report:
    env = env_dict(resolved.config)
    checks = [Check("image.digests", "pass",
                    f"manifest and config verified; {len(scans)} layer blobs verified while "
                    "streaming" if layers else "manifest and config verified (layers not read)")]
    view = MergedView()
    for scan in scans:
        view.apply(scan)
    facts = base_facts(ref, source, resolved, env, scans)
    arch = resolved.config.get("architecture", host_arch())
    cuda_version = env.get("CUDA_VERSION")
    compat: list[str] = []
    if layers:
        checks.append(diff_id_check(scans, resolved.config, resolved.manifest.get("layers") or []))
        cache, cache_check = read_ldcache(view)
        checks.append(cache_check)
        libraries = [explain_library(s, view, cache, env, arch) for s in LIBRARIES]
        extra = stub_and_compat(view, env)
        compat = extra["compat"]
        checks += library_checks(libraries, extra)
        facts["libraries"] = libraries
        facts["cuda"] = cuda_facts(view, env, extra)
        facts["files"], facts["files_unmatched"] = files_matching(view, file_globs)
    else:
        facts["cuda"] = {"cuda_version": cuda_version,
                         "cudnn_version": env.get("NV_CUDNN_VERSION")}
    requirement, verdict = requirement_check(env, cuda_version, driver, compat, layers)
    checks.append(requirement)
    facts["requirement"] = verdict or {
        "cases": [{"constraints": ",".join(map(str, a)), "needs": cuda.minimum_driver(a)}
                  for a in _safe_alternatives(env.get("NVIDIA_REQUIRE_CUDA", ""))]}
    verdict_text = "fail" if any(c.status == "fail" for c in checks) else "ok"
    return Report("image", verdict_text, checks, facts)


def _safe_alternatives(require: str) -> list:
    try:
        return cuda.parse_requirement(require)
    except cuda.RequirementError:
        return []


def base_facts(ref, source, resolved: Resolved, env: dict, scans: list[LayerScan]) -> dict:
    config = resolved.config.get("config") or {}
    history = [h for h in resolved.config.get("history") or [] if not h.get("empty_layer")]
    layer_rows = []
    for index, descriptor in enumerate(resolved.manifest.get("layers") or []):
        scan = scans[index] if index < len(scans) else None
        layer_rows.append({
            "digest": scan.digest if scan else descriptor.get("digest"),
            "size": descriptor.get("size"), "media_type": descriptor.get("mediaType"),
            "compression": scan.compression if scan else None,
            "diff_id": scan.diff_id if scan else None,
            "files": scan.file_count if scan else None,
            "uncompressed_size": scan.uncompressed_bytes if scan else None,
            "created_by": (redact_text(str(history[index].get("created_by")))
                           if index < len(history) and history[index].get("created_by")
                           else None),
        })
    return {
        "reference": str(ref), "source": ref.transport, "index_digest": resolved.index_digest,
        "manifest": {"digest": resolved.manifest_digest,
                     "media_type": resolved.manifest_media_type},
        "config": {"digest": resolved.config_digest, "created": resolved.config.get("created"),
                   "platform": resolved.platform},
        "layers": layer_rows,
        # The GPU-relevant variables first (ENV_KEYS order), then the rest as the image has them.
        "env": redact_env({**{k: env[k] for k in ENV_KEYS if k in env}, **env}),
        "labels": config.get("Labels") or {}, "entrypoint": config.get("Entrypoint"),
        "cmd": config.get("Cmd"), "user": config.get("User") or "",
    }


def read_ldcache(view: MergedView) -> tuple[ldcache.LdCache | None, Check]:
    data = view.kept.get("etc/ld.so.cache")
    if data is None:
        return None, Check("image.ldcache", "warn", "the image has no /etc/ld.so.cache",
                           fix="run ldconfig in the image build so libraries resolve by cache")
    try:
        cache = ldcache.parse(data)
    except ldcache.LdCacheError as error:
        return None, Check("image.ldcache", "fail", f"/etc/ld.so.cache is malformed: {error}",
                           fix="rerun ldconfig in the image build")
    return cache, Check("image.ldcache", "pass",
                        f"/etc/ld.so.cache ({cache.format} format): {len(cache.entries)} entries")


def cuda_facts(view: MergedView, env: dict, extra: dict) -> dict:
    status = view.kept.get("var/lib/dpkg/status", b"").decode("utf-8", "replace")
    packages = cuda.package_versions(cuda.parse_dpkg_status(status))
    return {"cuda_version": env.get("CUDA_VERSION"), "packages": packages,
            "libraries": cuda.library_versions(view.files), **extra}


def files_matching(view: MergedView, globs: tuple[str, ...]) -> tuple[list[dict], list[str]]:
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
                rows.append(file_row(path, info))
    return rows, unmatched


def file_row(path: str, info) -> dict:
    return {"path": "/" + path, "size": info.size, "mode": f"{info.mode:o}", "kind": info.kind,
            "link": info.link, "layer": info.layer}


__all__ = ["inspect_image", "LayerError", "SourceError"]
