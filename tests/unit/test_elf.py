"""The one-pass ELF reader of the layer scan, against `readelf -d` as the oracle: libraries built
here with gcc (RPATH and RUNPATH, with `--disable-new-dtags` / `--enable-new-dtags`), run
through patchelf as NVIDIA's wheels are (which moves the string table past the dynamic
section), a 32-bit big-endian object made by hand, and hostile ones: cut short, pointing outside
the file, not ELF at all. The real JAX plugin wheels: tests/integration/test_jax_wheels.py."""

from __future__ import annotations

import io
import re
import shutil
import struct
import subprocess
import tarfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from envcheck.image import elf
from envcheck.image.filetree import MergedView
from envcheck.image.layers import scan_layer
from tests.conftest import require_binary

NVIDIA = "usr/local/lib/python3.12/site-packages/nvidia"


def readelf(path: Path) -> tuple:
    """(SONAME, NEEDED, RPATH, RUNPATH) as `readelf -d` prints them."""
    out = subprocess.run([require_binary("readelf"), "-d", "-W", str(path)], capture_output=True,
                         text=True, check=True).stdout
    tag = lambda name: re.findall(rf"\({name}\)\s+.*?\[(.*)\]", out)  # noqa: E731
    rpath, runpath = tag("RPATH"), tag("RUNPATH")
    return (tag("SONAME")[0] if tag("SONAME") else None, tag("NEEDED"),
            rpath[0].split(":") if rpath else None, runpath[0].split(":") if runpath else None)


def build(tmp_path: Path, name: str, *flags: str, patch_rpath: str | None = None) -> Path:
    """A shared object that needs libm (cos), with `flags` for the linker."""
    require_binary("gcc")
    source = tmp_path / "c.c"
    source.write_text("#include <math.h>\ndouble f(double x) { return cos(x); }\n")
    out = tmp_path / name
    subprocess.run([require_binary("gcc"), "-shared", "-fPIC", "-o", str(out), str(source),
                    f"-Wl,-soname,{name}", "-Wl,--no-as-needed", "-lm", *flags], check=True)
    if patch_rpath is not None:
        subprocess.run([require_binary("patchelf"), "--set-rpath", patch_rpath, str(out)],
                       check=True)
    return out


class Member(io.BytesIO):
    """A tar member's data as the layer scan hands it out: read and skip forward."""

    def skip(self, n: int) -> int:
        start = self.tell()
        return self.seek(min(start + n, len(self.getbuffer()))) - start


def facts_of(data: bytes, size: int | None = None) -> elf.ElfFacts:
    """`size`: what the tar header declares (more than `data` holds: a stream cut short)."""
    return elf.read_elf(Member(data), len(data) if size is None else size, "x/libx.so.1", 0)


@pytest.mark.parametrize("flags, patch", [
    ((), None),
    (("-Wl,-rpath,$ORIGIN/../lib:/opt/cuda/lib64", "-Wl,--disable-new-dtags"), None),
    (("-Wl,-rpath,$ORIGIN", "-Wl,--enable-new-dtags"), None),
    ((), "$ORIGIN/../../nvidia/cublas/lib:$ORIGIN/../nvidia/cublas/lib:"),
])
def test_what_readelf_reads(tmp_path, flags, patch):
    library = build(tmp_path, "libcudnn_graph.so.9", *flags, patch_rpath=patch)
    facts = facts_of(library.read_bytes())
    assert facts.problem is None and facts.elf_class == 64
    assert (facts.soname, facts.needed, facts.rpath, facts.runpath) == readelf(library)
    assert "libm.so.6" in facts.needed


def test_a_string_table_after_the_dynamic_section_is_read_forward(tmp_path):
    """patchelf writes the new string table at the end of the file, past `.dynamic` (as in
    nvidia-cudnn-cu12's libraries); the reader reaches it reading forward."""
    library = build(tmp_path, "libcudnn.so.9", patch_rpath="$ORIGIN")
    sections = subprocess.run(["readelf", "-W", "-S", str(library)], capture_output=True,
                              text=True, check=True).stdout
    offset = {m[0]: int(m[1], 16) for m in re.findall(r"(\.dynstr|\.dynamic)\s+\S+\s+\S+\s+"
                                                      r"([0-9a-f]+)", sections)}
    assert offset[".dynstr"] > offset[".dynamic"]
    assert facts_of(library.read_bytes()).runpath == ["$ORIGIN"]


def test_a_table_beyond_the_kept_prefix_before_the_dynamic_section(tmp_path, monkeypatch):
    """The linker's string table lies in the first bytes; one that lies before `.dynamic` but
    past the kept prefix is a problem said, not a wrong answer."""
    library = build(tmp_path, "libcudart.so.12")
    monkeypatch.setattr(elf, "PREFIX_BYTES", 256)
    facts = facts_of(library.read_bytes())
    assert facts.soname is None and "past the first 256 bytes kept" in facts.problem


def elf32_be(needed: str = "libc.so.6", soname: str = "libx.so.1", *, strtab_at: int = 180,
             dynamic_at: int = 84, size: int = 256) -> bytes:
    """A minimal 32-bit big-endian (MIPS) shared object: header, one PT_LOAD, PT_DYNAMIC,
    the dynamic section, the string table."""
    strings = b"\0" + needed.encode() + b"\0" + soname.encode() + b"\0"
    data = bytearray(size)
    data[:16] = b"\x7fELF" + bytes([1, 2, 1]) + bytes(9)
    data[16:52] = struct.pack(">HHIIIIIHHHHHH", 3, 8, 1, 0, 52, 0, 0, 52, 32, 2, 0, 0, 0)
    data[52:84] = struct.pack(">IIIIIIII", 1, 0, 0, 0, size, size, 5, 4)  # PT_LOAD at 0
    dynamic = struct.pack(">iIiIiIiIiI", 5, strtab_at, 10, len(strings), 1, 1, 14,
                          2 + len(needed), 0, 0)
    data[84:116] = struct.pack(">IIIIIIII", 2, dynamic_at, dynamic_at, 0, len(dynamic),
                               len(dynamic), 6, 4)
    data[dynamic_at:dynamic_at + len(dynamic)] = dynamic
    data[strtab_at:strtab_at + len(strings)] = strings
    return bytes(data[:size])


def test_another_class_and_byte_order(tmp_path):
    image = elf32_be(dynamic_at=116)
    (tmp_path / "libx.so.1").write_bytes(image)
    facts = facts_of(image)
    assert (facts.elf_class, facts.machine) == (32, 8)
    assert (facts.soname, facts.needed, facts.rpath, facts.runpath) == readelf(
        tmp_path / "libx.so.1")


@pytest.mark.parametrize("data, said", [
    (b"/* GNU ld script */ GROUP ( libcuda.so.1 )", "not an ELF file"),
    (b"\x7fELF" + bytes([3, 1]) + bytes(58), "ELF class 3 / data encoding 1 unknown"),
    (elf32_be(dynamic_at=240), "dynamic section at 240+40 lies outside the file (256 bytes)"),
    (elf32_be(dynamic_at=116, strtab_at=4096), "DT_STRTAB address 0x1000 lies in no loaded"),
    (elf32_be(dynamic_at=116)[:40], "ELF header at 16+36 lies outside the file"),
])
def test_a_file_that_cannot_be_read_says_why(data, said):
    facts = facts_of(data)
    assert facts.problem is not None and said in facts.problem, facts.problem
    assert facts.soname is None and facts.needed == []


def test_a_stream_cut_short_says_so():
    """The tar header promises 256 bytes; the stream ends after 150."""
    facts = facts_of(elf32_be(dynamic_at=116)[:150], size=256)
    assert "the file ends early (truncated)" in facts.problem


@settings(max_examples=1000, deadline=None, database=None)
@given(st.binary(max_size=300) | st.builds(
    lambda edits: bytes(b ^ edits.get(i, 0) for i, b in enumerate(elf32_be(dynamic_at=116))),
    st.dictionaries(st.integers(0, 255), st.integers(1, 255), max_size=6)))
def test_any_bytes_give_facts_or_a_problem(data):
    facts = facts_of(data)
    assert isinstance(facts, elf.ElfFacts)
    assert facts.problem is None or facts.soname is None


def layer(*files: tuple[str, bytes | str]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, body in files:
            info = tarfile.TarInfo(name)
            if isinstance(body, str):
                info.type, info.linkname = tarfile.SYMTYPE, body
                tar.addfile(info)
            else:
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))
    return raw.getvalue()


def test_the_libraries_that_matter_are_read_from_the_layers(tmp_path):
    """The nvidia-* wheels' libraries and the system's CUDA libraries, by path; a library a
    later layer replaced with a link, or removed, is gone from the facts."""
    shutil.rmtree(tmp_path, ignore_errors=True)
    tmp_path.mkdir()
    cudnn = build(tmp_path, "libcudnn.so.9", patch_rpath="$ORIGIN").read_bytes()
    other = build(tmp_path, "libother.so.1").read_bytes()
    first = layer((f"{NVIDIA}/cudnn/lib/libcudnn.so.9", cudnn),
                  ("usr/local/cuda/lib64/libcudart.so.12.8.57", other),
                  ("usr/local/cuda/lib64/libcublas.so.12", other),
                  ("usr/lib/x86_64-linux-gnu/libother.so.1", other))
    second = layer(("usr/local/cuda/lib64/libcublas.so.12", "libcublas.so.12.8.3.14"))
    view = MergedView()
    for index, blob in enumerate((first, second)):
        view.apply(scan_layer(io.BytesIO(blob), index))
    found = {f.path: f for f in view.shared_objects()}
    assert sorted(found) == ["/usr/local/cuda/lib64/libcudart.so.12.8.57",
                             f"/{NVIDIA}/cudnn/lib/libcudnn.so.9"]
    assert found[f"/{NVIDIA}/cudnn/lib/libcudnn.so.9"].runpath == ["$ORIGIN"]
    assert found["/usr/local/cuda/lib64/libcudart.so.12.8.57"].layer == 0


@pytest.mark.parametrize("path, read", [
    ("usr/local/lib/python3.12/site-packages/jax_plugins/xla_cuda12/xla_cuda_plugin.so", True),
    ("opt/venv/lib/python3.11/site-packages/jax_cuda12_plugin/_versions.so", True),
    ("usr/lib/python3/dist-packages/nvidia/cusparse/lib/libcusparse.so.12", True),
    ("usr/lib/x86_64-linux-gnu/libcudnn_engines_precompiled.so.9.7.0", True),
    ("usr/local/cuda-12.8/targets/x86_64-linux/lib/libnvJitLink.so.12.8.61", True),
    ("usr/lib/x86_64-linux-gnu/libm.so.6", False),
    ("usr/local/lib/python3.12/site-packages/numpy/core/_multiarray.so", False),
    ("usr/local/cuda/lib64/libcudart.so.12.txt", False),
])
def test_which_files_are_read(path, read):
    assert elf.is_candidate(path) is read
