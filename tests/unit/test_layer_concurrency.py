"""Layers streamed several at a time (inspect-image --jobs): the same scans in layer order as
one at a time, one layer at a time where the source's layers share a file handle, and a failing
layer stops the others instead of waiting for them."""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
import threading
import time

import pytest

from envcheck.image.inspect import Resolved, scan_all
from envcheck.image.layers import LayerError


def gzip_layer(index: int) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for n in range(3):
            body = f"layer {index} file {n}\n".encode() * (1000 * (index + 1))
            info = tarfile.TarInfo(f"opt/l{index}/f{n}")
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return gzip.compress(raw.getvalue(), mtime=0)


class Endless(io.RawIOBase):
    """A plain layer that never ends: only a stop can end its scan."""

    def __init__(self):
        self.reads = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        self.reads += 1
        buffer[:] = bytes(len(buffer))
        time.sleep(0.001)
        return len(buffer)


class FakeSource:
    """Layers from memory; counts how many are open at once."""

    description = "fake"

    def __init__(self, blobs: list, concurrent_layers: bool = True):
        self.blobs, self.concurrent_layers = blobs, concurrent_layers
        self.open_now = self.open_most = 0
        self.lock = threading.Lock()

    def open_layer(self, descriptor: dict):
        blob = self.blobs[descriptor["index"]]
        with self.lock:
            self.open_now += 1
            self.open_most = max(self.open_most, self.open_now)
        return Tracked(blob if isinstance(blob, io.RawIOBase) else io.BytesIO(blob), self)


class Tracked(io.RawIOBase):
    def __init__(self, raw, source: FakeSource):
        self.raw, self.source = raw, source

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        return self.raw.readinto(buffer)

    def close(self) -> None:
        if not self.closed:
            with self.source.lock:
                self.source.open_now -= 1
        super().close()


def resolved(blobs: list) -> Resolved:
    layers = []
    for index, blob in enumerate(blobs):
        descriptor = {"index": index}
        if isinstance(blob, bytes):
            descriptor.update(digest="sha256:" + hashlib.sha256(blob).hexdigest(),
                              size=len(blob))
        layers.append(descriptor)
    return Resolved(None, None, "", {"layers": layers}, None, {}, "linux/amd64")


def facts(scans) -> list:
    return [(s.index, s.digest, s.diff_id, sorted(s.files)) for s in scans]


def test_several_at_a_time_give_the_same_scans_in_layer_order():
    blobs = [gzip_layer(i) for i in range(5)]
    one = scan_all(FakeSource(blobs), resolved(blobs), jobs=1)
    source = FakeSource(blobs)
    many = scan_all(source, resolved(blobs), jobs=3)
    assert facts(many) == facts(one) and [s.index for s in many] == [0, 1, 2, 3, 4]
    assert 1 < source.open_most <= 3


def test_a_source_with_one_file_handle_is_read_one_layer_at_a_time():
    blobs = [gzip_layer(i) for i in range(4)]
    source = FakeSource(blobs, concurrent_layers=False)
    scan_all(source, resolved(blobs), jobs=4)
    assert source.open_most == 1


def test_a_failing_layer_stops_the_others():
    """Layer 0 never ends; layer 1 is a truncated gzip: its error comes out at once, and the
    endless layer stops at its next chunk."""
    endless = Endless()
    blobs = [endless, gzip_layer(1)[:200]]
    start_s = time.perf_counter()
    with pytest.raises(LayerError, match="layer 1"):
        scan_all(FakeSource(blobs), resolved(blobs), jobs=2)
    assert time.perf_counter() - start_s < 10
    reads = endless.reads
    time.sleep(0.2)
    assert endless.reads == reads  # stopped, not still streaming in the background
