"""Hostile tar streams through the layer scanner: absolute and climbing paths, symlink and
hardlink loops, device files, huge PAX headers, bad PAX sizes, truncated gzip/zstd. The scanner
never writes anything (it only reads the stream), so "nothing outside a temp dir" holds by
construction; these pin that each input is either read correctly or refused with one error."""

from __future__ import annotations

import gzip
import io
import tarfile

import pytest
import zstandard

from envcheck.image.layers import PAX_BYTES_MAX, LayerError, MergedView, scan_layer


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


@pytest.mark.parametrize("compress", [gzip.compress, zstandard.ZstdCompressor().compress],
                         ids=["gzip", "zstd"])
def test_truncated_compressed_streams(compress):
    data = compress(tar_of((entry("big"), bytes(range(256)) * 400)))
    with pytest.raises(LayerError):
        scan(data[: len(data) // 2])
