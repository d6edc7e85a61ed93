"""Text rendering of an `envcheck.image/v1` report."""

from __future__ import annotations

import json

from rich.console import Console
from rich.markup import escape

from envcheck.report import Report, render_checks


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


def render_image(report: Report, console: Console) -> None:
    f = report.facts
    out = lambda text="": console.print(escape(text), highlight=False)  # noqa: E731
    out(f"image     {f['reference']}")
    if f["index_digest"]:
        out(f"index     {f['index_digest']}")
    out(f"manifest  {f['manifest']['digest'] or '(none: docker save archive)'}  "
        f"{f['manifest']['media_type']}")
    out(f"config    {f['config']['digest']}  {f['config']['platform']}  "
        f"created {f['config']['created']}")
    out(f"layers    {len(f['layers'])}")
    for i, layer in enumerate(f["layers"]):
        contents = ("not read (--no-layers)" if layer["files"] is None else
                    f"{_size(layer['uncompressed_size'])}, {layer['files']} files")
        compression = layer["compression"] or declared_compression(layer["media_type"])
        out(f"  {i:>2} {layer['digest']}  {_size(layer['size']):>9} {compression}  → {contents}")
        if layer["diff_id"]:
            out(f"     diff_id {layer['diff_id']}")
        if layer["created_by"]:
            out(f"     {layer['created_by'][:110]}")
    out("env")
    for key, value in f["env"].items():
        out(f"  {key}={value if len(value) < 140 else value[:137] + '...'}")
    out(f"entrypoint {_argv(f['entrypoint'])}  cmd {_argv(f['cmd'])}  "
        f"user {f['user'] or '(root)'}")
    render_cuda(f, out)
    render_checks(report.checks, console)
    out(f"VERDICT {report.verdict}")


def render_cuda(f: dict, out) -> None:
    info = f.get("cuda") or {}
    packages = info.get("packages") or {}
    versions = ", ".join(f"{k} {v['version']}" for k, v in packages.items())
    out(f"cuda      CUDA_VERSION {info.get('cuda_version')}; packages: {versions or 'none'}")
    if info.get("libraries"):
        out("          library files: " + ", ".join(f"{k} {v}" for k, v in
                                                      info["libraries"].items()))
    if "usr_local_cuda" in info:
        out(f"          /usr/local/cuda {'present' if info['usr_local_cuda'] else 'absent'}, "
            f"compat {'present' if info['compat_dir'] else 'absent'}; stubs: "
            f"{', '.join(info['stubs']) or 'none'}")
    for library in f.get("libraries", []):
        where = library["resolves_to"] or "not in the image"
        out(f"resolve   {library['soname']}: {where}" + (
            f" (via {library['via']})" if library["via"] else ""))
        for step in library["steps"]:
            out(f"            {step}")
        if library.get("at_run_time"):
            out(f"            {library['at_run_time']}")
    requirement = f.get("requirement") or {}
    for case in requirement.get("cases", [])[:3]:
        out(f"require   {case['constraints']}  →  needs {case['needs']}")
    if len(requirement.get("cases", [])) > 3:
        out(f"          … {len(requirement['cases']) - 3} more alternatives (--json lists all)")
    for row in f.get("files", []):
        link = f" -> {row['link']}" if row["link"] else ""
        out(f"file      {row['path']}{link}  {row['size']} B  mode {row['mode']}  "
            f"layer {row['layer']}")
    for pattern in f.get("files_unmatched", []):
        out(f"file      {pattern}: no match in the merged filesystem")
