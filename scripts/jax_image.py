"""A JAX-CUDA-like image tree for the tests: gcc-built stand-ins with the real SONAMEs and the
real wheels' dynamic tags — the plugin `jax_plugins/xla_cuda12/xla_cuda_plugin.so` with DT_RPATH
into `nvidia/*/lib` (as jax-cuda12-pjrt 0.10.2's has), the nvidia-* wheels' libraries with
RUNPATH `$ORIGIN` (as patchelf leaves them), libcusparse needing libnvJitLink — plus, by case, an
older system library on LD_LIBRARY_PATH, a missing wheel, RPATH instead of RUNPATH.

The plugin stand-in dlopens, from a constructor, the libraries XLA dlopens by name, in order,
so that glibc's own loader (`LD_DEBUG=libs`) can be the oracle of the simulation.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from envcheck.image.jaxstack import DLOPENED

SITE = "usr/local/lib/python3.12/site-packages"
SYSTEM = "usr/local/cuda/lib64"
WHEELS = {  # module: [(library, what it needs besides libc)]
    "cuda_runtime": [("libcudart.so.12", ())],
    "cublas": [("libcublas.so.12", ("libcublasLt.so.12",)), ("libcublasLt.so.12", ())],
    "cufft": [("libcufft.so.11", ())],
    "cusolver": [("libcusolver.so.11", ("libcublas.so.12", "libnvJitLink.so.12"))],
    "cusparse": [("libcusparse.so.12", ("libnvJitLink.so.12",))],
    "cuda_cupti": [("libcupti.so.12", ())],
    "nccl": [("libnccl.so.2", ())],
    "nvjitlink": [("libnvJitLink.so.12", ())],
    "cudnn": [("libcudnn.so.9", ()), ("libcudnn_graph.so.9", ())],
}
OPENS = {"libcudnn.so.9": ("libcudnn_graph.so.9",)}  # cuDNN 9 dlopens its parts by name
# The wheels' RUNPATH (patchelf'd): their own directory and nvJitLink's, as nvidia-cusparse-cu12's.
WHEEL_RPATH = "$ORIGIN:$ORIGIN/../../nvjitlink/lib"


def compile_library(out: Path, soname: str, needed: tuple[str, ...] = (),
                    link_dir: Path | None = None, rpath: str | None = None,
                    new_dtags: bool = True, opens: tuple[str, ...] = ()) -> None:
    """A shared object named `soname` that needs `needed` (found in `link_dir` at link time),
    with RUNPATH (new_dtags) or RPATH `rpath`; `opens`: names it dlopens when loaded."""
    out.parent.mkdir(parents=True, exist_ok=True)
    source = out.with_suffix(".c")
    calls = "".join(f'  dlopen("{name}", RTLD_NOW | RTLD_GLOBAL);\n' for name in opens)
    source.write_text("#include <dlfcn.h>\n"
                      f"int {soname.split('.')[0].replace('-', '_')}_f(void) {{ return 1; }}\n"
                      "__attribute__((constructor)) static void opened(void) {\n"
                      f"{calls}}}\n")
    argv = ["gcc", "-shared", "-fPIC", "-o", str(out), str(source), f"-Wl,-soname,{soname}",
            "-Wl,--no-as-needed"]
    argv += [f"-L{link_dir}"] if link_dir else []
    argv += [f"-l:{name}" for name in needed] + (["-ldl"] if opens else [])
    if rpath is not None:
        argv += [f"-Wl,-rpath,{rpath}",
                 "-Wl,--enable-new-dtags" if new_dtags else "-Wl,--disable-new-dtags"]
    subprocess.run(argv, check=True, capture_output=True)
    source.unlink()


def build_tree(root: Path, *, missing: tuple[str, ...] = (), system: tuple[str, ...] = (),
               rpath_wheels: bool = False) -> None:
    """The stack under `root`: every wheel of WHEELS but `missing` (module names); a copy of
    each library of `system` in /usr/local/cuda/lib64; the wheels' libraries with DT_RPATH
    instead of DT_RUNPATH when `rpath_wheels`."""
    site = root / SITE
    links = root.parent / f"{root.name}-link"  # every library once, for the linker to find
    waiting = [library for libraries in WHEELS.values() for library in libraries]
    while waiting:  # what a library needs is linked before it
        name, needed = next(lib for lib in waiting if all((links / n).exists() for n in lib[1]))
        compile_library(links / name, name, needed, links)
        waiting.remove((name, needed))
    for module, libraries in WHEELS.items():
        if module in missing:
            continue
        for name, needed in libraries:
            compile_library(site / "nvidia" / module / "lib" / name, name, needed, links,
                            rpath=WHEEL_RPATH, new_dtags=not rpath_wheels,
                            opens=OPENS.get(name, ()))
    for name in system:
        needed = next(n for libs in WHEELS.values() for lib, n in libs if lib == name)
        compile_library(root / SYSTEM / name, name, needed, links, opens=OPENS.get(name, ()))
    plugin_rpath = ":".join(f"$ORIGIN/../../nvidia/{m}/lib:$ORIGIN/../nvidia/{m}/lib"
                            for m in WHEELS) + ":"
    compile_library(site / "jax_plugins/xla_cuda12/xla_cuda_plugin.so", "xla_cuda_plugin.so",
                    (), None, rpath=plugin_rpath, new_dtags=False, opens=DLOPENED)
