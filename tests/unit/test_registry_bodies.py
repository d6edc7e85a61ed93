"""Manifests, configs, token replies and error replies from a local HTTP server: a body over
its limit (a wrong digest naming a GB layer, a token realm or an error page that never ends) is
refused or cut off while it streams, never read whole into memory; a connection that breaks
mid-manifest is retried, and every failure of one fetch counts against one budget of
attempts, which a blob gets back each time it makes progress."""

from __future__ import annotations

import hashlib
import http.server
import json
import re
import threading

import pytest
import requests

from envcheck.image import registry as registry_module
from envcheck.image.registry import (
    ATTEMPTS_MAX,
    MANIFEST_BYTES_MAX,
    RESUME_PROGRESS_BYTES,
    RETRY_AFTER_MAX_S,
    TOKEN_BYTES_MAX,
    RegistryClient,
    RegistryError,
    _retry_after_s,
)

PIECE = 1 << 20
HUGE_BYTES = 64 << 20
DROPPING_BYTES = 12 << 20


def dropping_blob() -> bytes:
    return bytes(range(251)) * (DROPPING_BYTES // 251) + bytes(range(DROPPING_BYTES % 251))


class Registry(http.server.BaseHTTPRequestHandler):
    """Blobs: HUGE_BYTES of zeros, with Content-Length or (`chunked`) in chunks; manifests:
    one small manifest, whose first answer breaks off halfway."""

    protocol_version = "HTTP/1.1"
    chunked = False
    sent = 0
    manifest = json.dumps({"schemaVersion": 2, "mediaType":
                           "application/vnd.oci.image.manifest.v1+json"}).encode()
    manifest_answers = 0
    flaky_answers = 0
    drop_every = 0

    def do_GET(self):
        if "/dropping/" in self.path:
            self.answer_dropping()
            return
        if "/flaky/" in self.path:
            self.answer_flaky()
            return
        if "/manifests/" in self.path:
            self.answer_manifest()
            return
        if "/private/" in self.path:  # a Bearer challenge whose realm is the huge body below
            self.send_response(401)
            realm = f"http://127.0.0.1:{self.server.server_address[1]}/token"
            self.send_header("WWW-Authenticate", f'Bearer realm="{realm}",service="test"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        status = 404 if "/missing/" in self.path else 200
        self.send_response(status)
        if Registry.chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(HUGE_BYTES))
        self.end_headers()
        piece = bytes(PIECE)
        try:
            for _ in range(HUGE_BYTES // PIECE):
                framed = b"%x\r\n%s\r\n" % (PIECE, piece) if Registry.chunked else piece
                self.wfile.write(framed)
                Registry.sent += PIECE
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def answer_manifest(self):
        Registry.manifest_answers += 1
        body = Registry.manifest
        self.send_response(200)
        self.send_header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if Registry.manifest_answers == 1:  # half the body, then the connection drops
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True
            return
        self.wfile.write(body)

    def answer_flaky(self):
        """Odd answers send half of what is left of the manifest's bytes (from the Range asked
        for, 206) and break off; even answers are 503s."""
        Registry.flaky_answers += 1
        if Registry.flaky_answers % 2 == 0:
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start = int(self.headers.get("Range", "bytes=0-")[6:-1])
        rest = Registry.manifest[start:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
        self.send_header("Content-Length", str(len(rest)))
        self.end_headers()
        self.wfile.write(rest[: len(rest) // 2])
        self.close_connection = True

    def answer_dropping(self):
        """A blob of DROPPING_BYTES (byte i is i % 251) from the Range asked for (206); each
        answer breaks off after `drop_every` bytes."""
        Registry.flaky_answers += 1
        start = int(self.headers.get("Range", "bytes=0-")[6:-1])
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(DROPPING_BYTES - start))
        self.end_headers()
        self.wfile.write(dropping_blob()[start:start + Registry.drop_every])
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def client(monkeypatch):
    monkeypatch.setattr(Registry, "sent", 0)
    monkeypatch.setattr(Registry, "manifest_answers", 0)
    monkeypatch.setattr(Registry, "flaky_answers", 0)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Registry)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield RegistryClient(f"127.0.0.1:{server.server_address[1]}", "some/image")
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_config_digest_naming_a_huge_blob_is_refused_while_it_streams(client, monkeypatch,
                                                                         chunked):
    monkeypatch.setattr(Registry, "chunked", chunked)
    with pytest.raises(RegistryError, match=f"over the {MANIFEST_BYTES_MAX}-byte limit"):
        client.blob_bytes("sha256:" + "0" * 64)
    # the socket buffers take a few MiB more; the old code read all 64 MiB first
    assert Registry.sent < HUGE_BYTES // 2


def test_a_manifest_cut_off_mid_body_is_fetched_again(client):
    body, media_type, digest = client.manifest("latest")
    assert body == Registry.manifest and Registry.manifest_answers == 2
    assert media_type == "application/vnd.oci.image.manifest.v1+json"
    assert digest == "sha256:" + hashlib.sha256(body).hexdigest()


def test_a_token_reply_that_never_ends_is_refused_while_it_streams(client, monkeypatch):
    monkeypatch.setattr(Registry, "chunked", True)
    private = RegistryClient(client.registry, "private/image")
    with pytest.raises(RegistryError, match=f"token reply is over the {TOKEN_BYTES_MAX}-byte "
                                            "limit: not a token service's answer"):
        private.blob_bytes("sha256:" + "0" * 64)
    assert Registry.sent < HUGE_BYTES // 2


def test_an_error_reply_is_read_only_as_far_as_its_message(client, monkeypatch):
    """A 404 whose body is 64 MiB: one line, after reading at most 64 KiB of it."""
    monkeypatch.setattr(Registry, "chunked", True)
    missing = RegistryClient(client.registry, "missing/image")
    with pytest.raises(RegistryError, match=r"missing/image@sha256:0+: 404 not found$"):
        missing.blob_bytes("sha256:" + "0" * 64)
    assert Registry.sent < HUGE_BYTES // 2


@pytest.fixture
def flaky(client, monkeypatch):
    """A client of a repository whose every answer fails, in turn by breaking off mid-body and
    by a 503; the back-offs are shortened (their lengths are not under test)."""
    monkeypatch.setattr(registry_module, "BACKOFF_S", 0.001)
    return RegistryClient(client.registry, "flaky/image")


def test_a_manifest_that_keeps_failing_takes_one_budget_of_attempts(flaky):
    """Broken bodies and 503s together: ATTEMPTS_MAX requests in all (a budget for each
    request, inside one for fetching the body again, would let 9 through here)."""
    with pytest.raises(RegistryError) as caught:
        flaky.manifest("latest")
    assert Registry.flaky_answers == ATTEMPTS_MAX
    assert re.search(f"flaky/image:latest: the connection broke while reading the manifest "
                     f"\\(ChunkedEncodingError\\); gave up after {ATTEMPTS_MAX} attempts$",
                     str(caught.value))


def test_a_blob_that_keeps_failing_takes_one_budget_of_attempts(flaky):
    """A blob resumed after each drop, 503s on the way: ATTEMPTS_MAX requests in all (a budget
    for each request, inside one for resuming, would let 11 through here); every byte before
    the last break reached the reader."""
    blob = flaky.open_blob("sha256:" + "0" * 64)
    received = bytearray()
    with pytest.raises(RegistryError) as caught:
        while piece := blob.read(1 << 16):
            received += piece
    assert Registry.flaky_answers == ATTEMPTS_MAX
    assert re.search(f"download failed at byte {len(received)} \\(connection closed early\\); "
                     f"gave up after {ATTEMPTS_MAX} attempts$", str(caught.value))
    assert bytes(received) == Registry.manifest[: len(received)] and received


def read_all(blob) -> bytes:
    received = bytearray()
    while piece := blob.read(1 << 16):
        received += piece
    return bytes(received)


def test_a_blob_that_keeps_making_progress_resumes_as_often_as_it_drops(flaky, monkeypatch):
    """A drop after every 1.5 MiB: 8 answers for 12 MiB, more than ATTEMPTS_MAX; each resume
    made RESUME_PROGRESS_BYTES of progress, so the budget is refilled and the blob arrives
    whole (it failed after 5 answers before)."""
    monkeypatch.setattr(Registry, "drop_every", 3 * RESUME_PROGRESS_BYTES // 2)
    blob = RegistryClient(flaky.registry, "dropping/image").open_blob("sha256:" + "0" * 64)
    assert read_all(blob) == dropping_blob()
    assert Registry.flaky_answers == 8 > ATTEMPTS_MAX


def test_a_blob_that_drops_before_making_progress_still_gives_up(flaky, monkeypatch):
    """A drop after every 64 KiB: less than RESUME_PROGRESS_BYTES between drops, so the
    budget is not refilled: ATTEMPTS_MAX answers, then one line."""
    monkeypatch.setattr(Registry, "drop_every", 64 << 10)
    blob = RegistryClient(flaky.registry, "dropping/image").open_blob("sha256:" + "0" * 64)
    with pytest.raises(RegistryError, match=f"download failed at byte {ATTEMPTS_MAX * 64 << 10} "
                                            f"\\(connection closed early\\); gave up after "
                                            f"{ATTEMPTS_MAX} attempts$"):
        read_all(blob)
    assert Registry.flaky_answers == ATTEMPTS_MAX


@pytest.mark.parametrize("header, seconds", [
    ("2", 2.0), ("0", 0.0), ("1e9", RETRY_AFTER_MAX_S), ("inf", RETRY_AFTER_MAX_S),
    ("-5", None), ("nan", None), ("Wed, 21 Oct 2026 07:28:00 GMT", None), (None, None)])
def test_retry_after_is_a_wait_that_can_be_slept(header, seconds):
    """What a registry sends as Retry-After becomes a wait in [0, RETRY_AFTER_MAX_S] or the
    usual back-off; time.sleep refuses a negative or NaN wait with ValueError."""
    response = requests.Response()
    if header is not None:
        response.headers["Retry-After"] = header
    assert _retry_after_s(response) == seconds
