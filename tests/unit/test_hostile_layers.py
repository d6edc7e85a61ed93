"""Hostile tar streams through the layer scanner: absolute and climbing paths, symlink and
hardlink loops, device files, huge PAX headers, bad PAX sizes, truncated or corrupt gzip/zstd
(through ISA-L and the zlib fallback), a layer of zeros that expands 30000 times. The scanner
never writes anything (it only reads the stream), so "nothing outside a temp dir" holds by
construction; these pin that each input is either read correctly or refused with one error."""

from __future__ import annotations

import gzip
import hashlib
import io
import posixpath
import tarfile
import tracemalloc
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from envcheck.image import blobstream, layers, tar
from envcheck.image.blobstream import OUT_BYTES, zstd_module
from envcheck.image.errors import LayerError
from envcheck.image.filetree import MergedView
from envcheck.image.layers import scan_layer
from envcheck.image.tar import PAX_BYTES_MAX


def tar_of(*members: tuple[tarfile.TarInfo, bytes], fmt=tarfile.PAX_FORMAT) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=fmt) as tar:
        for info, body in members:
            info.size = len(body) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(body) if info.isreg() else None)
    return raw.getvalue()


def entry(name: str, kind=tarfile.REGTYPE, link: str = "", **extra) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    for key, value in extra.items():
        setattr(info, key, value)
    return info


def scan(data: bytes):
    return scan_layer(io.BytesIO(data), 0)


def test_absolute_paths_stay_inside_the_image_root():
    layer = scan(tar_of((entry("/etc/passwd"), b"root:x:0:0\n")))
    assert list(layer.files) == ["etc/passwd"]


@settings(max_examples=3000, deadline=None, database=None)
@given(st.lists(st.sampled_from(["a", "b.so", ".", "..", ".wh.x", "", "\\"]), max_size=7)
       .map("/".join))
def test_member_names_fold_as_normpath_folds_them(name):
    """clean_path (with its fast path for names that need no folding) against posixpath."""
    folded = posixpath.normpath(name.replace("\\", "/").lstrip("/"))
    if folded == ".." or folded.startswith("../"):
        with pytest.raises(LayerError, match="escapes the image root"):
            layers.clean_path(name, 0)
    else:
        assert layers.clean_path(name, 0) == ("" if folded == "." else folded)


@pytest.mark.parametrize("name", ["../../etc/evil", "a/../../b", "..", "/../x"])
def test_climbing_paths_are_refused(name):
    with pytest.raises(LayerError, match="escapes the image root"):
        scan(tar_of((entry(name), b"x")))


def test_symlink_loops_resolve_to_nothing():
    view = MergedView()
    view.apply(scan(tar_of((entry("a", tarfile.SYMTYPE, "b"), b""),
                           (entry("b", tarfile.SYMTYPE, "a"), b""),
                           (entry("self", tarfile.SYMTYPE, "self/x"), b""))))
    assert view.resolve("a") is None and view.resolve("self/x") is None


def test_hardlink_loops_are_recorded_not_followed():
    layer = scan(tar_of((entry("a", tarfile.LNKTYPE, "b"), b""),
                        (entry("b", tarfile.LNKTYPE, "a"), b"")))
    assert {p: f.kind for p, f in layer.files.items()} == {"a": "hardlink", "b": "hardlink"}


def test_device_files_are_listed_without_data():
    layer = scan(tar_of((entry("dev/nvidia0", tarfile.CHRTYPE, devmajor=195, devminor=0), b""),
                        (entry("dev/sda", tarfile.BLKTYPE, devmajor=8, devminor=0), b""),
                        (entry("run/fifo", tarfile.FIFOTYPE), b""),
                        (entry("etc/after", tarfile.REGTYPE), b"still read\n")))
    assert layer.files["dev/nvidia0"].kind == "other"
    assert layer.files["etc/after"].size == 11


def test_huge_pax_header_is_refused_without_reading_it():
    info = entry("x")
    info.pax_headers = {"comment": "p" * (PAX_BYTES_MAX + 1)}
    with pytest.raises(LayerError, match="PAX header of .* bytes is over"):
        scan(tar_of((info, b"x")))


def test_pax_size_that_is_not_a_number():
    data = bytearray(tar_of((entry("x", pax_headers={"size": "12"}), b"abcdefghijkl")))
    where = data.find(b"size=12")
    data[where:where + 7] = b"size=1x"
    with pytest.raises(LayerError, match="PAX size '1x' is not a number"):
        scan(bytes(data))


@pytest.mark.parametrize("field", [
    b"0000017\0", b" 17\0    ", b"\x1c0000017", b"17\x1c\x1f   ", b"0\xff     ", b"8       ",
    b"1_7     ", b"\x80\0\0\0\0\0\0\x11"])
def test_number_fields_are_read_as_tarfile_reads_them(field):
    """Octal with str.strip's whitespace (\\x1c-\\x1f too), or base-256; anything else is a
    bad header, as for tarfile (the fuzz test found \\x1c in a checksum field read apart)."""
    try:
        expected = tarfile.nti(field)
    except tarfile.InvalidHeaderError:
        expected = None
    try:
        got = tar._number(field)
    except LayerError:
        got = None
    assert got == expected


@pytest.mark.parametrize("compress", [gzip.compress, zstd_module().compress],
                         ids=["gzip", "zstd"])
def test_truncated_compressed_streams(compress):
    data = compress(tar_of((entry("big"), bytes(range(256)) * 400)))
    with pytest.raises(LayerError):
        scan(data[: len(data) // 2])


class Zeros(io.RawIOBase):
    def __init__(self, size: int):
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_a_layer_of_zeros_is_inflated_in_bounded_memory(kind):
    """256 MiB of zeros is 8 KiB of zstd (a frame expands 30000 times): the inflater must hand
    it out in pieces, not as one 256 MiB buffer."""
    size, blob = 256 << 20, io.BytesIO()
    opener = gzip.GzipFile if kind == "gzip" else zstd_module().ZstdFile
    with opener(fileobj=blob, mode="wb") if kind == "gzip" else opener(blob, "wb") as packed:
        with tarfile.open(fileobj=packed, mode="w|") as tar:
            tar.addfile(entry("zeros", size=size), io.BufferedReader(Zeros(size)))
    blob.seek(0)
    tracemalloc.start()
    try:
        layer = scan_layer(blob, 0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert layer.compression == kind and layer.files["zeros"].size == size
    assert peak < 32 << 20, f"{peak >> 20} MiB at peak for a {len(blob.getvalue())}-byte blob"


@pytest.fixture(params=["isal", "zlib"])
def gzip_inflater(request, monkeypatch):
    """ISA-L's gzip inflater, and zlib's behind the same API (where isal is not installed)."""
    if request.param == "zlib":
        monkeypatch.setattr(blobstream, "_gzip_inflater",
                            lambda: (blobstream._ZlibInflater, (zlib.error,)))
    return request.param


def test_gzip_members_split_anywhere_give_the_same_layer(gzip_inflater):
    """Members that end exactly at an output piece's end (OUT_BYTES) and in mid-piece."""
    plain = tar_of((entry("a"), bytes(range(256)) * 3000), (entry("b"), b"b" * OUT_BYTES))
    cuts = [0, OUT_BYTES, 2 * OUT_BYTES + 7, len(plain)]
    data = b"".join(gzip.compress(plain[a:b]) for a, b in zip(cuts, cuts[1:], strict=False))
    layer = scan(data)
    assert layer.diff_id == "sha256:" + hashlib.sha256(plain).hexdigest()
    assert layer.uncompressed_bytes == len(plain) and sorted(layer.files) == ["a", "b"]


def test_gzip_truncated_or_failing_its_checksum(gzip_inflater):
    data = gzip.compress(tar_of((entry("big"), bytes(range(256)) * 400)))
    with pytest.raises(LayerError, match="truncated gzip stream"):
        scan(data[:-3])
    crc = len(data) - 8
    with pytest.raises(LayerError, match="corrupt gzip stream"):
        scan(data[:crc] + bytes([data[crc] ^ 1]) + data[crc + 1:])


def test_kept_files_over_the_layers_total_are_refused(monkeypatch):
    """ld.so.cache, ld.so.conf* and dpkg status files are held in memory; a layer with too
    many of them (dpkg/status.d has one per package) is refused, not read into memory."""
    monkeypatch.setattr(layers, "KEEP_TOTAL_MAX", 2500)
    files = [(entry(f"var/lib/dpkg/status.d/pkg{i}"), b"Package: x\n" * 100) for i in range(3)]
    assert len(scan(tar_of(*files[:2])).kept) == 2
    with pytest.raises(LayerError, match="status.d/pkg2: .* over 2500 bytes"):
        scan(tar_of(*files))


def test_a_header_checksummed_with_signed_bytes_is_read():
    """Old Sun and NeXT tars summed header bytes as signed chars; GNU tar and tarfile accept
    that, and so must the adler32 shortcut's fallback."""
    data = bytearray(tar_of((entry("bibliothèque/über.so"), b"x"), fmt=tarfile.USTAR_FORMAT))
    signed = 256 + sum(b - 256 if b > 127 else b for b in data[:148] + data[156:512])
    assert signed != tarfile.calc_chksums(bytes(data[:512]))[0]  # the name has high bytes
    data[148:156] = b"%06o\0 " % signed
    assert sorted(scan(bytes(data)).files) == ["bibliothèque/über.so"]
    data[148:156] = b"%06o\0 " % (signed + 1)
    with pytest.raises(LayerError, match="bad checksum"):
        scan(bytes(data))
