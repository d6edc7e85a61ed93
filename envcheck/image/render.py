"""Text rendering of an `envcheck.image/v1` report."""

from __future__ import annotations

import json
import posixpath
from collections.abc import Callable

from msgspec import UNSET
from rich.console import Console
from rich.markup import escape

from envcheck.image.jaxstack import WHEEL_MODULE
from envcheck.image.python import PythonFacts, family
from envcheck.image.report import CudaFacts, ImageReport, JaxLibraries
from envcheck.report import render_checks


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def declared_compression(media_type: str | None) -> str:
    """The compression a layer's media type declares (OCI `…tar+gzip`/`+zstd`, Docker
    `…tar.gzip`, plain `…tar`), for a layer not read; '' for a type that says none."""
    kind = (media_type or "").rpartition(".")[2]
    return {"tar+gzip": "gzip", "tar+zstd": "zstd", "gzip": "gzip", "tar": "none"}.get(kind, "")


def _argv(argv: list[str] | None) -> str:
    """As the Dockerfile's exec form writes it; (none) where the image sets none."""
    return json.dumps(argv) if argv is not None else "(none)"


def render_image(report: ImageReport, console: Console) -> None:
    out = lambda text="": console.print(escape(text), highlight=False)  # noqa: E731
    out(f"image     {report.reference}")
    if report.index_digest:
        out(f"index     {report.index_digest}")
    out(f"manifest  {report.manifest.digest or '(none: docker save archive)'}  "
        f"{report.manifest.media_type}")
    out(f"config    {report.config.digest}  {report.config.platform}  "
        f"created {report.config.created}")
    out(f"layers    {len(report.layers)}")
    for i, layer in enumerate(report.layers):
        contents = ("not read (--no-layers)" if layer.files is None else
                    f"{_size(layer.uncompressed_size)}, {layer.files} files")
        compression = layer.compression or declared_compression(layer.media_type)
        out(f"  {i:>2} {layer.digest}  {_size(layer.size):>9} {compression}  → {contents}")
        if layer.diff_id:
            out(f"     diff_id {layer.diff_id}")
        if layer.created_by:
            out(f"     {layer.created_by[:110]}")
    out("env")
    for key, value in report.env.items():
        out(f"  {key}={value if len(value) < 140 else value[:137] + '...'}")
    out(f"entrypoint {_argv(report.entrypoint)}  cmd {_argv(report.cmd)}  "
        f"user {report.user or '(root)'}")
    render_cuda(report.cuda, out)
    if report.python and (report.python.packages or report.python.unreadable):
        render_python(report.python, out)
    render_libraries(report, out)
    if report.jax_libraries:
        render_jax_libraries(report.jax_libraries, out)
    render_checks(report.checks, console)
    out(f"VERDICT {report.verdict}")


def render_cuda(cuda: CudaFacts, out: Callable[[str], None]) -> None:
    versions = ", ".join(f"{k} {v.version}" for k, v in (cuda.packages or {}).items())
    out(f"cuda      CUDA_VERSION {cuda.cuda_version}; packages: {versions or 'none'}")
    if cuda.libraries:
        out("          library files: " + ", ".join(f"{k} {v}" for k, v in
                                                      cuda.libraries.items()))
    if cuda.usr_local_cuda is not UNSET:
        out(f"          /usr/local/cuda {'present' if cuda.usr_local_cuda else 'absent'}, "
            f"compat {'present' if cuda.compat_dir else 'absent'}; stubs: "
            f"{', '.join(cuda.stubs) or 'none'}")


def render_python(facts: PythonFacts, out: Callable[[str], None]) -> None:
    """How many packages where; by name, the JAX family, the NVIDIA wheels and other CUDA
    users."""
    locations = sorted({p.location for p in facts.packages})
    out(f"python    {len(facts.packages)} packages in " + (", ".join(locations) or "none"))
    for kind, label in (("jax", "JAX"), ("nvidia", "NVIDIA wheels"),
                        ("cuda", "other CUDA users")):
        named = [f"{p.name} {p.version}" for p in facts.packages if family(p.name) == kind]
        if named:
            out(f"          {label}: {', '.join(named)}")
    for problem in facts.unreadable[:5]:
        out(f"          unreadable: {problem}")


def render_jax_libraries(libraries: JaxLibraries, out: Callable[[str], None]) -> None:
    """The CUDA libraries the JAX plugin loads, each once, where it resolves and how."""
    out(f"jax       plugin {libraries.plugin}")
    seen = set()
    for load in libraries.loads:
        if load.name in seen or (load.path and load.name not in WHEEL_MODULE):
            continue  # libc and the like resolve as for any program
        seen.add(load.name)
        where = f"{load.path} ({load.via}" + (f", {load.version})" if load.version else ")")
        out(f"          {posixpath.basename(load.name)}: "
            + (where if load.path else "NOT FOUND"))


def render_libraries(report: ImageReport, out: Callable[[str], None]) -> None:
    """Where each library resolves, what NVIDIA_REQUIRE_CUDA needs, the files asked for."""
    for library in report.libraries or []:
        where = library.resolves_to or "not in the image"
        out(f"resolve   {library.soname}: {where}" + (
            f" (via {library.via})" if library.via else ""))
        for step in library.steps:
            out(f"            {step}")
        if library.at_run_time:
            out(f"            {library.at_run_time}")
    cases = report.requirement.cases
    for case in cases[:3]:
        out(f"require   {case.constraints}  →  needs {case.needs}")
    if len(cases) > 3:
        out(f"          … {len(cases) - 3} more alternatives (--json lists all)")
    for row in report.files or []:
        link = f" -> {row.link}" if row.link else ""
        out(f"file      {row.path}{link}  {row.size} B  mode {row.mode}  layer {row.layer}")
    for pattern in report.files_unmatched or []:
        out(f"file      {pattern}: no match in the merged filesystem")
