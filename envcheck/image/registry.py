"""OCI distribution client: Accept headers for every manifest type, Bearer token flow (anonymous
too; nvcr.io's challenge has no `service`), credentials from the Docker config (auths and
credential helpers), retries with backoff honouring Retry-After, resumable blob reads with Range,
and every manifest checked against its digest. Redirects to blob storage are followed by
`requests`, which drops Authorization when the host changes (distribution spec: MUST NOT forward).
(credentials.py reads the Docker config.)

Over 400 lines: the client, the one retry budget a fetch shares (Attempts) and the resuming blob
reader are one request path; the reader resumes through the client's own request and back-off.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import socket
import threading
import time

import requests

from envcheck.image.blobstream import Cancelled
from envcheck.image.errors import SourceError

MANIFEST_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
RETRY_STATUSES = (429, 500, 502, 503, 504)
ATTEMPTS_MAX = 5
BACKOFF_S = 0.5
RETRY_AFTER_MAX_S = 30.0
# A blob that got this far since its last drop has its budget of attempts refilled: a long
# download over a flaky link resumes as often as it keeps making progress (skopeo's body
# reader retries on the same condition, 1 MiB), while a link that drops every few bytes still
# gives up after ATTEMPTS_MAX.
RESUME_PROGRESS_BYTES = 1 << 20
MANIFEST_BYTES_MAX = 4 * 1024 * 1024
TOKEN_BYTES_MAX = 1024 * 1024  # Docker Hub's token replies are 2-5 KB
ERROR_BYTES_MAX = 64 * 1024  # what an error reply's JSON `errors` is read from
CHALLENGE_RE = re.compile(r'(\w+)="([^"]*)"')


class RegistryError(SourceError):
    """A registry failure, one line: the reference and the cause (never a secret)."""


class Attempts:
    """One fetch's budget of failed attempts, whatever failed: no answer, a 429/5xx, a body
    that broke off (a manifest fetched again, a blob resumed). ATTEMPTS_MAX in all, not per
    request, so a failing registry costs at most ATTEMPTS_MAX - 1 back-offs per fetch."""

    def __init__(self, stop: threading.Event | None = None):
        self.failed = 0
        self.stop = stop

    def refill(self) -> None:
        """Forget the failures so far (the fetch made progress since), back-offs included."""
        self.failed = 0

    def more(self) -> bool:
        """Whether the failure at hand may be retried."""
        return self.failed + 1 < ATTEMPTS_MAX

    def back_off(self, seconds: float | None = None) -> None:
        """Count the failure and wait (doubling, or as the registry asked) before the next
        try; another layer's failure cuts the wait short with Cancelled."""
        wait_s = BACKOFF_S * 2**self.failed if seconds is None else seconds
        self.failed += 1
        if self.stop is None:
            time.sleep(wait_s)
        elif self.stop.wait(wait_s):
            raise Cancelled()


def base_url(registry: str) -> str:
    host = registry.split(":")[0] if not registry.startswith("[") else registry.split("]")[0] + "]"
    scheme = "http" if host in LOOPBACK_HOSTS else "https"
    return f"{scheme}://{registry}"


class RegistryClient:
    def __init__(self, registry: str, repository: str, *, timeout_s: float = 30.0,
                 credentials: tuple[str, str] | None = None, session=None):
        self.registry, self.repository = registry, repository
        self.base = base_url(registry)
        self.timeout_s = timeout_s
        self._credentials = credentials
        self._session = session or requests.Session()
        self._authorization: str | None = None
        self._auth_lock = threading.Lock()  # layers stream on several threads

    def _url(self, kind: str, reference: str) -> str:
        return f"{self.base}/v2/{self.repository}/{kind}/{reference}"

    def _where(self, reference: str) -> str:
        return f"{self.registry}/{self.repository}@{reference}" if reference.startswith(
            "sha256:") else f"{self.registry}/{self.repository}:{reference}"

    def request(self, url: str, what: str, headers: dict | None = None,
                attempts: Attempts | None = None):
        """GET with auth, retries and backoff; returns a 2xx response, its body not yet read,
        or raises RegistryError (blobstream.Cancelled where the attempts' `stop` is set during
        a back-off). Failures count against `attempts`, the budget of the whole fetch."""
        attempts = attempts or Attempts()
        authenticated = False
        while True:
            send = dict(headers or {})
            if self._authorization:
                send["Authorization"] = self._authorization
            try:
                response = self._session.get(url, headers=send, stream=True,
                                             timeout=self.timeout_s, allow_redirects=True)
            except requests.RequestException as error:
                if not attempts.more():
                    raise RegistryError(f"{what}: cannot reach {self.base} "
                                        f"({type(error).__name__})") from None
                attempts.back_off()
                continue
            if response.status_code == 401 and not authenticated:
                response.close()  # its body is not read: the connection goes, not the pool
                self._renew(response, what, send.get("Authorization"))
                authenticated = True
                continue
            if response.status_code in RETRY_STATUSES and attempts.more():
                response.close()
                attempts.back_off(_retry_after_s(response))
                continue
            if response.ok:
                return response
            raise RegistryError(f"{what}: {_status_text(response)}")

    def small(self, url: str, what: str, kind: str, headers: dict | None = None):
        """(body, response) of a manifest or config, read in pieces and refused as soon as it
        passes MANIFEST_BYTES_MAX (a wrong digest can name a GB layer, which must not be read
        whole into memory first); a connection that breaks mid-body is fetched again, within
        the same budget of attempts as the requests' own retries."""
        attempts = Attempts()
        while True:
            response = self.request(url, what, headers, attempts)
            try:
                return _bounded_body(response, what, kind), response
            except requests.RequestException as error:
                if not attempts.more():
                    raise RegistryError(f"{what}: the connection broke while reading the "
                                        f"{kind} ({type(error).__name__}); gave up after "
                                        f"{ATTEMPTS_MAX} attempts") from None
                attempts.back_off()

    def _renew(self, response, what: str, sent: str | None) -> None:
        """After a 401: the first thread to get here fetches a token; layers that were refused
        the same expired token meanwhile retry with the new one instead of fetching their own."""
        with self._auth_lock:
            if self._authorization is not None and self._authorization != sent:
                return
            self._authenticate(response, what)

    def _authenticate(self, response, what: str) -> None:
        challenge = response.headers.get("WWW-Authenticate", "")
        scheme = challenge.split(" ", 1)[0].lower()
        if scheme == "basic":
            if not self._credentials:
                raise RegistryError(f"{what}: 401 unauthorized and no credentials for "
                                    f"{self.registry}: run `docker login {self.registry}`")
            token = base64.b64encode(":".join(self._credentials).encode()).decode()
            self._authorization = f"Basic {token}"
            return
        if scheme != "bearer":
            raise RegistryError(f"{what}: 401 unauthorized with an unknown challenge "
                                f"{scheme or '(none)'}")
        params = dict(CHALLENGE_RE.findall(challenge))
        realm = params.pop("realm", None)
        if not realm:
            raise RegistryError(f"{what}: 401 with a Bearer challenge that has no realm")
        query = {"scope": params.get("scope") or f"repository:{self.repository}:pull"}
        if params.get("service"):  # nvcr.io sends none: leave it out
            query["service"] = params["service"]
        auth = self._credentials if self._credentials else None
        try:
            reply = self._session.get(realm, params=query, auth=auth, timeout=self.timeout_s,
                                      stream=True)
            if not reply.ok:
                hint = "" if self._credentials else f"; if the image is private run `docker " \
                    f"login {self.registry}`"
                raise RegistryError(f"{what}: token request refused ({_status_text(reply)})"
                                    f"{hint}")
            raw = _bounded_body(reply, what, "token reply", TOKEN_BYTES_MAX,
                                "not a token service's answer")
        except requests.RequestException as error:
            raise RegistryError(f"{what}: token service unreachable ({type(error).__name__})") \
                from None
        try:
            body = json.loads(raw)
            token = body.get("token") or body.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not token:
            raise RegistryError(f"{what}: the token service answered without a token")
        self._authorization = f"Bearer {token}"

    def manifest(self, reference: str) -> tuple[bytes, str, str]:
        """(raw bytes, media type, verified digest) of a manifest or index."""
        what = self._where(reference)
        body, response = self.small(self._url("manifests", reference), what, "manifest",
                                    {"Accept": ", ".join(MANIFEST_TYPES)})
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        claimed = response.headers.get("Docker-Content-Digest")
        for expected in (reference if reference.startswith("sha256:") else None, claimed):
            if expected and expected != digest:
                raise RegistryError(f"{what}: manifest digest {digest} does not match "
                                    f"{expected}: refusing unverified content")
        media_type = response.headers.get("Content-Type", "").split(";")[0].strip()
        check_media_type(body, media_type, what)
        return body, media_type, digest

    def blob_bytes(self, digest: str) -> bytes:
        """A small blob (a config), verified against its digest."""
        what = self._where(digest)
        body, _ = self.small(self._url("blobs", digest), what, "blob")
        if "sha256:" + hashlib.sha256(body).hexdigest() != digest:
            raise RegistryError(f"{what}: blob content does not match its digest")
        return body

    def open_blob(self, digest: str, stop: threading.Event | None = None) -> io.RawIOBase:
        return ResumingBlob(self, digest, stop)


def check_media_type(body: bytes, header_type: str, what: str) -> None:
    """Reject a manifest whose `mediaType` field disagrees with the Content-Type it came with."""
    try:
        declared = json.loads(body).get("mediaType")
    except (ValueError, AttributeError):
        raise RegistryError(f"{what}: the manifest is not JSON") from None
    if declared and header_type and header_type != "application/octet-stream" and (
            declared != header_type):
        raise RegistryError(f"{what}: Content-Type {header_type} disagrees with the manifest's "
                            f"mediaType {declared}")


class ResumingBlob(io.RawIOBase):
    """A blob as a stream; a dropped connection is resumed with Range from where it stopped.

    Bytes go from the socket straight into the caller's buffer (http.client's readinto under
    requests): on a 1 GB layer the copies through urllib3's chunk API cost as much CPU as the
    blob's sha256. A body that ends before its Content-Length is a drop, like a reset."""

    def __init__(self, client: RegistryClient, digest: str,
                 stop: threading.Event | None = None):
        self._client = client
        self._url = client._url("blobs", digest)
        self._what = client._where(digest)
        self._position = self._last_drop = 0
        self._end: int | None = None
        self._attempts = Attempts(stop)  # opening and resuming share one budget (and stop)
        self._response = None
        self._reader = None

    def readable(self) -> bool:
        return True

    def _open(self) -> None:
        headers = {"Range": f"bytes={self._position}-"} if self._position else {}
        self._response = self._client.request(self._url, self._what, headers, self._attempts)
        if self._position and self._response.status_code != 206:
            raise RegistryError(f"{self._what}: connection dropped at byte {self._position} and "
                                "the registry does not support Range to resume")
        length = self._response.headers.get("Content-Length", "")
        self._end = self._position + int(length) if length.isdigit() else None
        # urllib3 keeps http.client's response as `_fp`; its own readinto (a copy) otherwise
        raw = self._response.raw
        self._reader = raw._fp if hasattr(getattr(raw, "_fp", None), "readinto") else raw

    def _dropped(self, cause: str) -> None:
        """Close the broken response so the next read resumes, or give up after the budget
        (refilled when the blob made RESUME_PROGRESS_BYTES of progress since its last drop)."""
        self._response.close()
        self._response = None
        if self._position - self._last_drop >= RESUME_PROGRESS_BYTES:
            self._attempts.refill()
        self._last_drop = self._position
        if not self._attempts.more():
            raise RegistryError(f"{self._what}: download failed at byte {self._position} "
                                f"({cause}); gave up after {ATTEMPTS_MAX} attempts")
        self._attempts.back_off()

    def _stopped(self) -> bool:
        stop = self._attempts.stop
        return stop is not None and stop.is_set()

    def abort(self) -> None:
        """From another thread: wake a read blocked on a hung connection (it then ends with
        Cancelled) by shutting the socket down; closing it would not wake the read."""
        sock = _socket_of(self._response)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed

    def readinto(self, buffer) -> int:
        while True:
            if self._response is None:
                if self._stopped():
                    raise Cancelled()
                self._open()
                if self._stopped():  # set while opening: its abort missed this connection
                    raise Cancelled()
            try:
                n = self._reader.readinto(buffer)
            except Exception as error:  # http.client/OS errors; only drops are retried
                if self._stopped():
                    raise Cancelled() from None
                if not _is_connection_error(error):
                    raise RegistryError(f"{self._what}: download failed at byte "
                                        f"{self._position} ({type(error).__name__})") from None
                self._dropped(type(error).__name__)
                # a chunked body that broke off: the whole chunks before the break are already
                # in `buffer` (http.client's IncompleteRead.partial); keep them, resume after
                kept = len(getattr(error, "partial", b"") or b"")
                if kept:
                    self._position += kept
                    return kept
                continue
            if n == 0 and len(buffer) and self._end is not None and self._position < self._end:
                if self._stopped():
                    raise Cancelled()
                self._dropped("connection closed early")
                continue
            self._position += n
            return n

    def close(self) -> None:
        if self._response is not None:
            self._response.close()
        super().close()


def _socket_of(response) -> socket.socket | None:
    """The socket a streaming response reads from: its connection's (kept alive), or the one
    under the response's file where http.client handed it over (HTTP/1.0, Connection: close)."""
    for path in (("raw", "connection", "sock"), ("raw", "_fp", "fp", "raw", "_sock")):
        value = response
        for name in path:
            value = getattr(value, name, None)
        if isinstance(value, socket.socket):
            return value
    return None


def _is_connection_error(error: Exception) -> bool:
    names = {type(error).__name__, *(type(a).__name__ for a in error.args
                                     if isinstance(a, Exception))}
    return bool(names & {"ProtocolError", "IncompleteRead", "ConnectionError",
                         "ChunkedEncodingError", "ReadTimeoutError", "ConnectionResetError",
                         "TimeoutError", "BrokenPipeError"})


def _bounded_body(response, what: str, kind: str, limit: int = MANIFEST_BYTES_MAX,
                  hint: str = "not a manifest or config (a wrong digest?)") -> bytes:
    """The body of a streamed response, up to `limit` bytes (else a RegistryError)."""
    def over(size: str = "") -> RegistryError:
        return RegistryError(f"{what}: {kind}{size} is over the {limit}-byte limit: {hint}")

    length = response.headers.get("Content-Length", "")
    if length.isdigit() and int(length) > limit:
        response.close()
        raise over(f" of {length} bytes")
    body = _read_at_most(response, limit)
    if len(body) > limit:
        raise over()
    return body


def _read_at_most(response, limit: int) -> bytes:
    """Up to limit + 1 bytes of a streamed body (one more tells the caller it is over); the
    response is closed after, whatever is left of it unread."""
    body = bytearray()
    try:
        for piece in response.iter_content(64 << 10):
            body += piece
            if len(body) > limit:
                break
        return bytes(body[:limit + 1])
    finally:
        response.close()


def _retry_after_s(response) -> float | None:
    """The registry's Retry-After in seconds (at most RETRY_AFTER_MAX_S), or None to back off
    as usual (absent, an HTTP date, negative, NaN)."""
    try:
        seconds = float(response.headers.get("Retry-After", ""))
    except ValueError:
        return None
    return min(seconds, RETRY_AFTER_MAX_S) if seconds >= 0 else None


def _status_text(response) -> str:
    reasons = {401: "401 unauthorized", 403: "403 forbidden", 404: "404 not found",
               429: "429 too many requests (rate limited)"}
    text = reasons.get(response.status_code, f"HTTP {response.status_code}")
    try:
        errors = json.loads(_read_at_most(response, ERROR_BYTES_MAX)).get("errors") or []
        detail = "; ".join(str(e.get("message", "")) for e in errors if isinstance(e, dict))
    except (ValueError, AttributeError, requests.RequestException):
        detail = ""  # not JSON, cut off at ERROR_BYTES_MAX, or the connection broke
    return f"{text} ({detail})" if detail else text
