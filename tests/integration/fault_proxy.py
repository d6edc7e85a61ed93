"""A small fault-injecting HTTP proxy of our own, on 127.0.0.1, in front of the real registry.

Modes (any combination), each counted so tests can assert what happened:
- bearer: every /v2/ request needs `Authorization: Bearer <token>`; 401 carries a Bearer
  challenge (with or without `service`, as nvcr.io); GET /token hands out a new token each
  time (TOKEN-1, TOKEN-2, ...), each valid until it expires;
- expire_tokens_after_blobs: after that many blob GETs, every token handed out so far expires
  (as Docker Hub's do after 300 s, mid-pull); tokens fetched afterwards are valid;
- too_many_once: the first blob GET answers 429 with Retry-After: 1;
- drop_blob_once: the first layer-sized blob GET sends half the body, then drops the connection
  (the client must resume with Range);
- redirect_blobs: blob GETs answer 307 to the same proxy under another host name
  (`localhost` instead of `127.0.0.1`), and record whether Authorization followed;
- statuses: {"manifest"|"blob": [500, 502, ...]}: answer those, one per request, then forward;
- forever: {"manifest"|"blob": 403}: always answer that status (401 comes without a challenge);
- token_status: the token endpoint refuses with this status;
- corrupt_blobs: flip one byte in every blob body (the digest no longer matches);
- content_type: send manifests with this Content-Type instead of the registry's;
- delay_s: wait this long before answering any /v2/ request (a slow server);
- chunked_blobs: blob bodies go out with Transfer-Encoding: chunked, no Content-Length (with
  drop_blob_once: the connection drops mid-body, without the last chunk).
"""

from __future__ import annotations

import http.server
import threading
import time
import urllib.request

TOKEN = "envcheck-test-token-planted"


class FaultProxy:
    def __init__(self, upstream: str, *, bearer: bool = False, service: bool = True,
                 too_many_once: bool = False, drop_blob_once: bool = False,
                 redirect_blobs: bool = False, statuses: dict | None = None,
                 forever: dict | None = None, token_status: int | None = None,
                 corrupt_blobs: bool = False, content_type: str | None = None,
                 delay_s: float = 0.0, chunked_blobs: bool = False,
                 expire_tokens_after_blobs: int | None = None):
        self.upstream = upstream
        self.modes = dict(bearer=bearer, service=service, too_many_once=too_many_once,
                          drop_blob_once=drop_blob_once, redirect_blobs=redirect_blobs)
        self.statuses = {k: list(v) for k, v in (statuses or {}).items()}
        self.forever = forever or {}
        self.token_status = token_status
        self.corrupt_blobs, self.content_type, self.delay_s = corrupt_blobs, content_type, delay_s
        self.chunked_blobs = chunked_blobs
        self.expire_after, self.blob_gets = expire_tokens_after_blobs, 0
        self.tokens: list[str] = []  # handed out
        self.valid: set[str] = set()
        self.lock = threading.Lock()
        self.events: list[str] = []
        self.redirected_auth: list[str | None] = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                proxy.handle(self)

            def do_HEAD(self):
                proxy.handle(self)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.host = f"127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _once(self, mode: str) -> bool:
        if self.modes[mode]:
            self.modes[mode] = False
            return True
        return False

    def handle(self, request) -> None:
        path = request.path
        if path.startswith("/token"):
            self.events.append("token")
            if self.token_status:
                return self._send(request, self.token_status, b'{"details":"denied"}', {})
            with self.lock:
                token = f"{TOKEN}-{len(self.tokens) + 1}"
                self.tokens.append(token)
                self.valid.add(token)
            return self._send(request, 200, b'{"token": "%s", "expires_in": 300}' % token.encode(),
                              {"Content-Type": "application/json"})
        is_blob = "/blobs/" in path
        kind = "blob" if is_blob else "manifest" if "/manifests/" in path else "other"
        if self.delay_s and path.startswith("/v2/"):
            self.events.append("slow")
            time.sleep(self.delay_s)
        if kind in self.forever:
            self.events.append(str(self.forever[kind]))
            return self._send(request, self.forever[kind], b'{"errors":[{"code":"DENIED",'
                              b'"message":"injected"}]}', {"Content-Type": "application/json"})
        if self.statuses.get(kind):
            status = self.statuses[kind].pop(0)
            self.events.append(str(status))
            return self._send(request, status, b"injected", {})
        if is_blob and request.headers.get("Host", "").startswith("localhost"):
            self.redirected_auth.append(request.headers.get("Authorization"))
            return self._forward(request)
        if self.modes["bearer"] and not self._authorized(request, is_blob):
            self.events.append("challenge")
            service = ',service="envcheck-test"' if self.modes["service"] else ""
            return self._send(request, 401, b'{"errors":[{"code":"UNAUTHORIZED"}]}', {
                "WWW-Authenticate": f'Bearer realm="http://{self.host}/token"{service}'})
        if is_blob and self._once("too_many_once"):
            self.events.append("429")
            return self._send(request, 429, b"slow down", {"Retry-After": "1"})
        if is_blob and self.modes["redirect_blobs"]:
            self.events.append("redirect")
            return self._send(request, 307, b"", {
                "Location": f"http://localhost:{self.port}{path}"})
        return self._forward(request)

    def _authorized(self, request, is_blob: bool) -> bool:
        sent = request.headers.get("Authorization", "").removeprefix("Bearer ")
        with self.lock:
            if sent not in self.valid:
                return False
            if is_blob and request.command == "GET":
                self.blob_gets += 1
                if self.blob_gets == self.expire_after:
                    self.events.append("tokens expired")
                    self.valid.clear()
        return True

    def _forward(self, request) -> None:
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() in ("accept", "range")}
        upstream = urllib.request.Request(f"http://{self.upstream}{request.path}",
                                          headers=headers, method=request.command)
        try:
            response = urllib.request.urlopen(upstream, timeout=30)
        except urllib.error.HTTPError as error:
            response = error
        body = response.read()
        extra = {k: v for k, v in response.headers.items()
                 if k.lower() in ("content-type", "docker-content-digest", "content-range")}
        big_blob = "/blobs/" in request.path and len(body) > 16 * 1024  # a layer, not a config
        chunked = self.chunked_blobs and "/blobs/" in request.path and request.command == "GET"
        if big_blob and request.command == "GET" and response.status == 200 and \
                self._once("drop_blob_once"):
            self.events.append("drop")
            if chunked:
                return self._send_chunked(request, 200, body[: len(body) // 2], extra, end=False)
            request.send_response(200)
            request.send_header("Content-Length", str(len(body)))
            request.end_headers()
            request.wfile.write(body[: len(body) // 2])
            return self._drop(request)
        if "content-range" in (k.lower() for k in extra):
            self.events.append("range")
        if "/blobs/" in request.path and self.corrupt_blobs and body:
            self.events.append("corrupt")
            body = bytes([body[0] ^ 0xFF]) + body[1:]
        if "/manifests/" in request.path and self.content_type:
            extra = {k: v for k, v in extra.items() if k.lower() != "content-type"}
            extra["Content-Type"] = self.content_type
        if chunked and response.status in (200, 206):
            self.events.append("chunked")
            return self._send_chunked(request, response.status, body, extra)
        self._send(request, response.status, body, extra)

    @staticmethod
    def _send_chunked(request, status: int, body: bytes, headers: dict, end: bool = True):
        """64 KiB chunks; without `end` the connection drops before the terminating chunk."""
        request.send_response(status)
        for key, value in headers.items():
            request.send_header(key, value)
        request.send_header("Transfer-Encoding", "chunked")
        request.end_headers()
        for start in range(0, len(body), 64 * 1024):
            piece = body[start:start + 64 * 1024]
            request.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        if end:
            request.wfile.write(b"0\r\n\r\n")
            return
        FaultProxy._drop(request)

    @staticmethod
    def _drop(request) -> None:
        """Cut the connection mid-body."""
        request.wfile.flush()
        request.close_connection = True
        request.connection.shutdown(2)

    @staticmethod
    def _send(request, status: int, body: bytes, headers: dict) -> None:
        request.send_response(status)
        for key, value in headers.items():
            request.send_header(key, value)
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        if request.command != "HEAD":
            request.wfile.write(body)
