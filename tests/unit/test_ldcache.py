"""The pure-Python ld.so.cache reader against the real `ldconfig -p -C FILE` (the oracle): this
machine's own cache, and caches the real ldconfig writes in the new, old and compat formats, with
glibc-hwcaps entries."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from envcheck.image import ldcache

LDCONFIG = shutil.which("ldconfig") or "/sbin/ldconfig"


def oracle(path: Path) -> str:
    return subprocess.run([LDCONFIG, "-p", "-C", str(path)], capture_output=True,
                          check=True).stdout.decode("utf-8", "replace")


def test_this_machines_cache_reads_like_ldconfig():
    path = Path("/etc/ld.so.cache")
    if not path.exists():
        pytest.skip("no /etc/ld.so.cache here")
    assert ldcache.render(ldcache.parse(path.read_bytes()), str(path)) == oracle(path)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A small root: libz, a hwcaps variant, and a compiled libcuda.so.1 in a conf.d directory."""
    root = tmp_path_factory.mktemp("root")
    lib = root / "usr/lib/x86_64-linux-gnu"
    (lib / "glibc-hwcaps/x86-64-v3").mkdir(parents=True)
    shutil.copy("/lib/x86_64-linux-gnu/libz.so.1", lib / "libz.so.1")
    shutil.copy("/lib/x86_64-linux-gnu/libz.so.1", lib / "glibc-hwcaps/x86-64-v3/libz.so.1")
    compat = root / "usr/local/cuda/compat"
    compat.mkdir(parents=True)
    (root / "empty.c").write_text("int envcheck;\n")
    subprocess.run(["gcc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o",
                    str(compat / "libcuda.so.570.124.06"), str(root / "empty.c")], check=True)
    (root / "etc").mkdir()
    (root / "etc/ld.so.conf").write_text("/usr/local/cuda/compat\n")
    return root


@pytest.mark.parametrize("fmt", ["new", "old", "compat"])
def test_formats_written_by_ldconfig(root, fmt):
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the fixture library")
    subprocess.run([LDCONFIG, "-r", str(root), "-c", fmt, "-C", f"/etc/ld.so.cache.{fmt}"],
                   check=True, capture_output=True)
    path = root / f"etc/ld.so.cache.{fmt}"
    cache = ldcache.parse(path.read_bytes())
    assert cache.format == fmt
    ours, theirs = ldcache.render(cache, str(path)), oracle(path)
    if fmt == "compat":
        # ldconfig -p reads compat hwcaps names from the wrong base and prints garbage there;
        # ld.so (and this reader) take them from the new header: everything else must agree.
        strip = lambda text: re.sub(r', hwcap: "[^"]*"', "", text)  # noqa: E731
        ours, theirs = strip(ours), strip(theirs)
    assert ours == theirs
    assert [e.path for e in cache.lookup("libcuda.so.1")] == ["/usr/local/cuda/compat/libcuda.so.1"]
    if fmt != "old":  # the old format has no hwcaps extension
        names = {e.hwcap_name for e in cache.lookup("libz.so.1")}
        assert names == {"x86-64-v3", None}
        assert cache.generator and cache.generator.startswith("ldconfig")


@pytest.mark.parametrize("data,match", [
    (b"", "unknown magic"), (b"not a cache at all", "unknown magic"),
    (b"glibc-ld.so.cache1.1" + b"\x00" * 10, "truncated"),
    (b"glibc-ld.so.cache1.1" + (1000).to_bytes(4, "little") + b"\x00" * 24, "claims 1000"),
    (b"ld.so-1.7.0\x00" + (5).to_bytes(4, "little"), "claims 5 entries"),
])
def test_malformed_caches_raise_the_documented_error(data, match):
    with pytest.raises(ldcache.LdCacheError, match=match):
        ldcache.parse(data)


def test_string_offsets_outside_the_file_are_caught(root):
    subprocess.run([LDCONFIG, "-r", str(root), "-C", "/etc/ld.so.cache.bad"], check=True,
                   capture_output=True)
    data = bytearray((root / "etc/ld.so.cache.bad").read_bytes())
    data[48 + 4:48 + 8] = (10**6).to_bytes(4, "little")  # first entry's key offset
    with pytest.raises(ldcache.LdCacheError, match="outside the file"):
        ldcache.parse(bytes(data))
