"""A `docker save` archive read in one pass from a stream (compressed whole, or the daemon's
save): layers are scanned as they pass, before manifest.json says which they are, and handed
out in the manifest's order with the same scans as the archive read in place."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
import threading

import pytest

from envcheck.image.blobstream import CHUNK_BYTES
from envcheck.image.errors import LayerError, SourceError, UnreadableImage
from envcheck.image.inspect import Resolved, scan_all
from envcheck.image.reference import ImageRef
from envcheck.image.sources import daemon as daemon_source_module
from envcheck.image.sources import saved_stream
from envcheck.image.sources.docker_archive import DockerArchiveSource, _chosen_entry
from envcheck.image.sources.saved_stream import SavedStreamSource


def layer(index: int) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name in (f"opt/l{index}/a", f"opt/l{index}/b", "etc/shared"):
            body = f"{name} of layer {index}\n".encode() * 50
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return raw.getvalue()


def saved(entries: list, layers: list[str]) -> bytes:
    """A tar of `entries` ((name, bytes) files, (name, "->target") symlinks) and, last, a
    manifest.json naming `layers`."""
    raw = io.BytesIO()
    manifest = json.dumps([{"Config": "config.json", "Layers": layers}]).encode()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, data in [*entries, ("manifest.json", manifest)]:
            info = tarfile.TarInfo(name)
            if isinstance(data, str):
                info.type, info.linkname = tarfile.SYMTYPE, data[2:]
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return raw.getvalue()


def pieces(data: bytes, size: int = 64 << 10):
    return (data[i:i + size] for i in range(0, len(data), size))


def facts(scans) -> list:
    return [(s.index, s.digest, s.diff_id, sorted((p, i.layer) for p, i in s.files.items()))
            for s in scans]


def blob_name(data: bytes) -> str:
    return "blobs/sha256/" + hashlib.sha256(data).hexdigest()


def test_layers_in_the_manifests_order_as_the_archive_read_in_place_gives_them(tmp_path):
    """Layer 2 is layer 0 again (docker ≥ 25 stores one blob), the link of a legacy name comes
    before its target: each scan says its own place in the image."""
    a, b = layer(0), layer(1)
    names = [blob_name(a), "legacy/layer.tar", blob_name(a)]
    data = saved([("legacy/layer.tar", "->../" + blob_name(b)), (blob_name(a), a),
                  (blob_name(b), b)], names)
    (tmp_path / "saved.tar").write_bytes(data)
    in_place = DockerArchiveSource(ImageRef("docker-archive", path=str(tmp_path / "saved.tar")))
    streamed = SavedStreamSource("saved", pieces(gzip.compress(data)), scan_layers=True,
                                 shown="saved.tar.gz", hint="save it again")
    tops = [source.top().body for source in (in_place, streamed)]
    assert tops[0] == tops[1]
    resolved = Resolved(None, None, "", tops[0], None, {}, "linux/amd64")
    got = [facts(scan_all(source, resolved, jobs=2)) for source in (in_place, streamed)]
    assert got[0] == got[1]
    assert [f[0] for f in got[1]] == [0, 1, 2] and got[1][0][1] == got[1][2][1]
    assert {i for _, i in got[1][2][3]} == {2}
    in_place.close()


def test_a_member_named_as_a_layer_that_is_no_tar():
    data = saved([("notes.txt", b"{}" * 10)], ["notes.txt"])
    source = SavedStreamSource("saved", pieces(data), scan_layers=True, shown="x",
                               hint="save it again")
    with pytest.raises(LayerError, match=r"layer 0 \(notes.txt\): not a tar archive"):
        source.layer_scans(source.top().body["layers"])


def test_small_members_that_are_no_layers_are_kept_up_to_a_limit(monkeypatch):
    monkeypatch.setattr(saved_stream, "KEPT_BYTES_MAX", 1000)
    data = saved([(f"n{i}.json", b"{}" * 200) for i in range(5)], [])
    with pytest.raises(UnreadableImage, match="over 1000 bytes of small files that are no "
                                              "layers: not a docker save archive"):
        SavedStreamSource("saved", pieces(data), scan_layers=True, shown="x", hint="")


def test_a_failing_layer_stops_the_inflating_thread():
    """A corrupted blob early in a long stream: one error naming it, and the thread that
    inflates the stream stops there instead of reading the rest."""
    bad = bytearray(layer(0))
    name = blob_name(bytes(bad))
    bad[600] ^= 1
    filler = os.urandom(48 << 20)  # what comes after: 48 MiB that gzip cannot shrink
    data = gzip.compress(saved([(name, bytes(bad)), ("filler", filler)], [name]),
                         compresslevel=1)
    read = [0]

    def counted():
        for piece in pieces(data):
            read[0] += len(piece)
            yield piece

    before = threading.active_count()
    with pytest.raises(LayerError, match=f"saved: {name} \\(sha256:.*does not match"):
        SavedStreamSource("saved", counted(), scan_layers=True, shown="x", hint="")
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and thread.daemon:
            thread.join(timeout=5)
    assert threading.active_count() <= before
    assert read[0] < len(data) // 2


class _Image:
    def __init__(self, data: bytes, break_at: int):
        self.data, self.break_at, self.attrs = data, break_at, {"Size": len(data)}

    def save(self, chunk_size: int, named: bool):
        import requests

        for start in range(0, self.break_at, chunk_size):
            yield self.data[start:min(start + chunk_size, self.break_at)]
        raise requests.exceptions.ChunkedEncodingError("Connection broken: IncompleteRead")


@pytest.mark.parametrize("where", ["inside a layer", "between members"])
def test_a_daemon_save_that_breaks_off_is_one_line(monkeypatch, where):
    """The daemon's save stream breaks (dockerd restarted): one error line, whether the break
    reaches the thread reading a layer or the one walking the archive."""
    from envcheck.image.reference import parse

    big = layer(0) + os.urandom(2 << 20)  # a tar, then more bytes: the layer is 2 MiB long
    data = saved([(blob_name(big), big), ("other.json", b"{}")], [blob_name(big)])
    after_layer = 512 + -(-len(big) // 512) * 512  # its header, its data padded
    break_at = (1 << 20) if where == "inside a layer" else after_layer + 100
    image = _Image(data, break_at)
    client = type("Client", (), {"images": type("Images", (), {"get": lambda _, n: image})()})()
    monkeypatch.setattr(daemon_source_module, "ping_client", lambda timeout_s: client)
    with pytest.raises(SourceError, match=r"^docker-daemon:x:1: docker save failed "
                                                  r"\(Connection broken: IncompleteRead\)$"):
        daemon_source_module.daemon_source(parse("docker-daemon:x:1"))


def test_a_compressed_archive_cut_in_its_last_bytes_is_no_report():
    """The cut falls in the zero blocks after the archive's end (gzip's CRC and size with
    them): every member was read whole, and still the file is damaged: one line."""
    data = gzip.compress(saved([(blob_name(layer(0)), layer(0))], [blob_name(layer(0))]))
    SavedStreamSource("saved", pieces(data), scan_layers=True, shown="x.tar.gz", hint="again")
    with pytest.raises(UnreadableImage, match="^x.tar.gz: truncated gzip stream: the "
                                              "compressed data ends early; save it again$"):
        SavedStreamSource("saved", pieces(data[:-8]), scan_layers=True, shown="x.tar.gz",
                          hint="save it again")


class _Pieces(_Image):
    """A daemon's save stream as dockerd sends it: 32 KiB HTTP chunks, whatever chunk_size."""

    def save(self, chunk_size: int, named: bool):
        yield from pieces(self.data, 32 << 10)


def test_the_daemons_small_pieces_reach_the_reader_joined(monkeypatch):
    """Each piece costs the one-pass reader hand-offs between threads; 32 KiB ones made a
    1.8 GB save take 1.25x as long. Joined to CHUNK_BYTES (the last shorter), in order."""
    from envcheck.image.reference import parse

    big = layer(0) + os.urandom(1 << 20)
    data = saved([(blob_name(big), big)], [blob_name(big)])
    image = _Pieces(data, len(data))
    client = type("Client", (), {"images": type("Images", (), {"get": lambda _, n: image})()})()
    monkeypatch.setattr(daemon_source_module, "ping_client", lambda timeout_s: client)
    seen: list[bytes] = []

    class Recording(SavedStreamSource):
        def __init__(self, description, given, **kwargs):
            super().__init__(description, (seen.append(p) or p for p in given), **kwargs)

    monkeypatch.setattr(daemon_source_module, "SavedStreamSource", Recording)
    source = daemon_source_module.daemon_source(parse("docker-daemon:x:1"))
    assert b"".join(seen) == data and len(seen) == -(-len(data) // CHUNK_BYTES)
    assert all(len(p) >= CHUNK_BYTES for p in seen[:-1])
    assert [s.diff_id for s in source.layer_scans([{"member": blob_name(big)}])] == [
        "sha256:" + hashlib.sha256(big).hexdigest()]


def test_the_image_chosen_in_a_manifest_json_of_odd_entries():
    """RepoTags as manifest.json may have them: missing, null, not a list, with non-strings or
    names Docker would refuse; a choice is matched as Docker normalises names."""
    entries = [{"RepoTags": None}, {"RepoTags": "cuda:one"}, {"RepoTags": [7, "UPPER", "x:y"]},
               {"RepoTags": ["docker.io/library/busybox:latest"]}]
    chosen = _chosen_entry
    assert chosen(entries, "x:y", "a") is entries[2]
    assert chosen(entries, "busybox", "a") is entries[3]
    assert chosen(entries, "@1", "a") is entries[1]
    with pytest.raises(SourceError, match=r"^a: the archive holds 4 images \(@0 "
                       r"\(untagged\); @1 \(untagged\); UPPER, x:y; "
                       r"docker.io/library/busybox:latest\): name one, adding :NAME\[:TAG\] "
                       r"or :@N$"):
        chosen(entries, None, "a")
    with pytest.raises(SourceError, match=r"^a: no image tagged cuda:one in the archive"):
        chosen(entries, "cuda:one", "a")
