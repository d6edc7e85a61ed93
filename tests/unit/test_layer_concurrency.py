"""Layers streamed several at a time (inspect-image --jobs): the same scans in layer order as
one at a time, a docker save archive's layers each through a handle of its own, and a failing
layer stops the others instead of waiting for them — also one waiting out a registry's
Retry-After, or one stuck on a connection that stopped sending."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import json
import os
import sys
import tarfile
import threading
import time

import pytest

from envcheck.image.blobstream import HELPER_NICE, BlobStream
from envcheck.image.errors import LayerError, SourceError
from envcheck.image.inspect import Resolved, default_jobs, scan_all
from envcheck.image.reference import ImageRef
from envcheck.image.registry import RegistryClient
from envcheck.image.sources.base import StreamedSource
from envcheck.image.sources.docker_archive import DockerArchiveSource


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


class FakeSource(StreamedSource):
    """Layers from memory; counts how many are open at once."""

    description = "fake"

    def __init__(self, blobs: list):
        self.blobs = blobs
        self.open_now = self.open_most = 0
        self.lock = threading.Lock()

    def open_layer(self, descriptor: dict, stop=None):
        blob = self.blobs[descriptor["index"]]
        if callable(blob):
            blob = blob(stop)
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

    def abort(self) -> None:
        getattr(self.raw, "abort", lambda: None)()

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


@pytest.mark.parametrize("target, error", [
    ("../gone/layer.tar", "layer b/layer.tar named in manifest.json is missing"),
    ("../b/layer.tar", "layer b/layer.tar named in manifest.json is missing"),  # a loop
    ("../a/layer.tar", None)])
def test_docker_archive_layer_links_are_followed_inside_the_archive(tmp_path, target, error):
    """A layer saved as a symlink (docker < 25 links a layer it already wrote) is read through
    it; one that points nowhere, or round in a loop, is a missing layer."""
    blob = gzip_layer(0)
    archive = tmp_path / "saved.tar"
    with tarfile.open(archive, "w") as tar:
        manifest = json.dumps([{"Config": "c.json", "Layers": ["b/layer.tar"]}]).encode()
        for name, data in [("manifest.json", manifest), ("a/layer.tar", blob)]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("b/layer.tar")
        link.type, link.linkname = tarfile.SYMTYPE, target
        tar.addfile(link)
    source = DockerArchiveSource(ImageRef("docker-archive", path=str(archive)))
    if error:
        with pytest.raises(SourceError, match=error):
            source.top()
    else:
        [layer] = source.top().body["layers"]
        assert layer["size"] == len(blob)
        with source.open_layer(layer) as reader:
            assert reader.read() == blob
    source.close()


def test_several_at_a_time_give_the_same_scans_in_layer_order():
    blobs = [gzip_layer(i) for i in range(5)]
    one = scan_all(FakeSource(blobs), resolved(blobs), jobs=1)
    source = FakeSource(blobs)
    many = scan_all(source, resolved(blobs), jobs=3)
    assert facts(many) == facts(one) and [s.index for s in many] == [0, 1, 2, 3, 4]
    assert 1 < source.open_most <= 3


def test_docker_archive_layers_read_at_once_through_their_own_handles(tmp_path):
    """Reads of two layers interleaved, as two threads do: each gets its own bytes."""
    blobs = [gzip_layer(i) for i in range(3)]
    archive = tmp_path / "saved.tar"
    names = [f"blobs/sha256/{hashlib.sha256(b).hexdigest()}" for b in blobs]
    with tarfile.open(archive, "w") as tar:
        manifest = json.dumps([{"Config": "config.json", "Layers": names}]).encode()
        for name, data in [("manifest.json", manifest), *zip(names, blobs, strict=True)]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    source = DockerArchiveSource(ImageRef("docker-archive", path=str(archive)))
    layers = source.top().body["layers"]
    readers = [source.open_layer(layer) for layer in layers]
    got = [bytearray() for _ in readers]
    while any(r is not None for r in readers):
        for n, reader in enumerate(readers):
            if reader is not None:
                piece = reader.read(1000)
                got[n] += piece
                if not piece:
                    reader.close()
                    readers[n] = None
    assert [bytes(g) for g in got] == blobs
    source.close()


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


class TooManyRequests(http.server.BaseHTTPRequestHandler):
    """A registry that answers every request with 429 and Retry-After: 30."""

    asked = threading.Event()

    def do_GET(self):
        TooManyRequests.asked.set()
        self.send_response(429)
        self.send_header("Retry-After", "30")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def assert_layer_1_error_at_once(handler, layer_0_waits: threading.Event,
                                 release=lambda: None) -> None:
    """Layer 0 comes from a local server answering with `handler`; layer 1 fails once layer 0
    waits (`layer_0_waits` set, then 0.2 s): the run must end with layer 1's error in under
    5 s. `release` frees the handler before the server closes."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client = RegistryClient(f"127.0.0.1:{server.server_address[1]}", "slow/image")
    broken = gzip_layer(1)[:200]

    def fails_once_layer_0_waits(stop):
        layer_0_waits.wait(10)
        time.sleep(0.2)  # layer 0 is in its back-off, or blocked in recv, now
        return broken

    blobs = [lambda stop: client.open_blob("sha256:" + "0" * 64, stop),
             fails_once_layer_0_waits]
    start_s = time.perf_counter()
    try:
        with pytest.raises(LayerError, match="layer 1"):
            scan_all(FakeSource(blobs), resolved(blobs), jobs=2)
        assert time.perf_counter() - start_s < 5
    finally:
        release()
        server.shutdown()
        server.server_close()


def test_a_failing_layer_cuts_another_layers_retry_after_short():
    """Layer 0 waits out a 30 s Retry-After; layer 1 fails once layer 0 is waiting: the run
    ends at once with layer 1's error instead of after the wait."""
    assert_layer_1_error_at_once(TooManyRequests, TooManyRequests.asked)


class Hangs(http.server.BaseHTTPRequestHandler):
    """Sends a blob's first bytes, then nothing (a stalled connection) until released."""

    sent, release = threading.Event(), threading.Event()

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(10 << 20))
        self.end_headers()
        self.wfile.write(gzip_layer(0)[:1000])
        self.wfile.flush()
        Hangs.sent.set()
        Hangs.release.wait(60)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("protocol", ["HTTP/1.1", "HTTP/1.0"])
def test_a_failing_layer_wakes_another_layer_stuck_on_a_hung_connection(monkeypatch, protocol):
    """Layer 0's registry stops sending mid-blob (the read would wait out the 30 s socket
    timeout); layer 1 fails meanwhile: the run ends at once with layer 1's error. (Over
    HTTP/1.0 the socket has moved from the connection to the response.)"""
    monkeypatch.setattr(Hangs, "protocol_version", protocol)
    monkeypatch.setattr(Hangs, "sent", threading.Event())
    monkeypatch.setattr(Hangs, "release", threading.Event())
    assert_layer_1_error_at_once(Hangs, Hangs.sent, release=Hangs.release.set)


@pytest.mark.parametrize("cores, jobs", [(None, 1), (1, 1), (2, 2), (4, 2), (8, 4), (64, 4)])
def test_default_jobs(monkeypatch, cores, jobs):
    monkeypatch.setattr("os.cpu_count", lambda: cores)
    assert default_jobs() == jobs


def thread_nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


class NiceRecorder:
    """A stand-in for a stage's work that notes the priority of the thread it runs on."""

    def __init__(self, inner=None):
        self.inner, self.seen = inner, set()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        self.seen.add(thread_nice())
        return self.inner.readinto(buffer)

    def update(self, data) -> None:
        self.seen.add(thread_nice())

    def hexdigest(self) -> str:
        return ""


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice values are Linux's")
def test_helper_threads_yield_to_the_inflating_thread():
    blob = gzip_layer(0)
    reader, plain_hash = NiceRecorder(io.BytesIO(blob)), NiceRecorder()
    stream = BlobStream(reader, limit_bytes=None, uncompressed_max=1 << 30)
    stream._plain_hash = plain_hash
    caller_nice = thread_nice()
    assert b"".join(stream) == gzip.decompress(blob)
    helper_nice = min(19, caller_nice + HELPER_NICE)
    assert reader.seen == {helper_nice} and plain_hash.seen == {helper_nice}
    assert thread_nice() == caller_nice  # the inflating (calling) thread keeps its priority


class CountingHash:
    """hashlib's sha256, counting the bytes it is given."""

    def __init__(self):
        self.inner, self.hashed = hashlib.sha256(), 0

    def update(self, data) -> None:
        self.hashed += len(data)
        self.inner.update(data)

    def hexdigest(self) -> str:
        return self.inner.hexdigest()


@pytest.mark.parametrize("compressed", [True, False], ids=["gzip", "plain"])
def test_a_plain_layer_is_hashed_once(compressed):
    """A plain tar's digest is its diff_id: its bytes go through sha256 once (a `docker save`
    layer of 1.8 GB took 2.3-3.0 CPU s with two hashes, 1.5 with one); a gzip layer's
    uncompressed bytes are hashed on their own."""
    tar = gzip.decompress(gzip_layer(1))
    blob = gzip.compress(tar, mtime=0) if compressed else tar
    stream = BlobStream(io.BytesIO(blob), limit_bytes=None, uncompressed_max=1 << 30)
    stream._compressed_hash, stream._plain_hash = CountingHash(), CountingHash()
    assert b"".join(stream) == tar
    assert stream.digest == "sha256:" + hashlib.sha256(blob).hexdigest()
    assert stream.diff_id == "sha256:" + hashlib.sha256(tar).hexdigest()
    assert stream._compressed_hash.hashed == len(blob)
    assert stream._plain_hash.hashed == (len(tar) if compressed else 0)
