"""The registry client against real faults: our fault-injecting proxy in front of the real
docker-registry (Bearer challenges with and without `service`, 429 + Retry-After, a connection
dropped mid-blob, redirects to another host, 401/403/5xx, corrupted bytes, a lying Content-Type,
a slow server). Each run must still verify every digest; each failure is one line, exit 1."""

from __future__ import annotations

import json

import pytest

from tests.integration.fault_proxy import TOKEN, FaultProxy
from tests.integration.test_inspect_image import envcheck


@pytest.fixture
def proxy_for(registry, pushed):
    proxies = []

    def make(**modes) -> tuple[FaultProxy, str]:
        proxy = FaultProxy(registry.host, **modes)
        proxies.append(proxy)
        return proxy, pushed.replace(registry.host, proxy.host)

    yield make
    for proxy in proxies:
        proxy.stop()


def run_ok(ref: str, *args: str) -> dict:
    done = envcheck(ref, "--json", *args)
    assert done.returncode == 0, done.stderr
    assert TOKEN not in done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert {c["id"]: c["status"] for c in report["checks"]}["image.diff-ids"] == "pass"
    return report


@pytest.mark.parametrize("service", [True, False], ids=["docker-hub-style", "nvcr-style"])
def test_bearer_token_flow(proxy_for, service):
    proxy, ref = proxy_for(bearer=True, service=service)
    run_ok(ref)
    assert proxy.events[:2] == ["challenge", "token"]


def test_token_expiring_while_layers_stream_concurrently(proxy_for):
    """The token expires after the config and one layer (Docker Hub's last 300 s); the layers
    in flight are refused with it together. One of them fetches a new token, the others retry
    with that one: two tokens in all, every layer verified."""
    proxy, ref = proxy_for(bearer=True, expire_tokens_after_blobs=2)
    report = run_ok(ref, "--jobs", "3")
    assert len(report["layers"]) >= 3
    assert "tokens expired" in proxy.events
    assert proxy.events.count("challenge") >= 2 and len(proxy.tokens) == 2


def test_429_with_retry_after_is_retried(proxy_for):
    proxy, ref = proxy_for(too_many_once=True)
    run_ok(ref)
    assert "429" in proxy.events


def test_dropped_blob_download_resumes_with_range(proxy_for):
    proxy, ref = proxy_for(drop_blob_once=True)
    run_ok(ref)
    assert "drop" in proxy.events and "range" in proxy.events


def test_chunked_blob_bodies(proxy_for):
    """No Content-Length (Transfer-Encoding: chunked), as some blob stores send."""
    proxy, ref = proxy_for(chunked_blobs=True)
    run_ok(ref)
    assert "chunked" in proxy.events


def test_dropped_chunked_download_resumes_with_range(proxy_for):
    proxy, ref = proxy_for(chunked_blobs=True, drop_blob_once=True)
    run_ok(ref)
    assert "drop" in proxy.events and "range" in proxy.events


def test_redirect_to_another_host_drops_authorization(proxy_for):
    proxy, ref = proxy_for(bearer=True, redirect_blobs=True)
    report = run_ok(ref)
    # The config and every layer came through the redirect, none with the bearer token.
    assert proxy.redirected_auth == [None] * (len(report["layers"]) + 1)


def run_fails(ref: str, *args: str) -> str:
    """One error line on stderr, exit 1, nothing on stdout (no report, no digest claimed)."""
    done = envcheck(ref, "--json", *args)
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert done.stdout == "" and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), lines
    assert TOKEN not in done.stderr
    return lines[0]


def test_401_without_a_challenge(proxy_for):
    _, ref = proxy_for(forever={"manifest": 401})
    assert "401 unauthorized with an unknown challenge (none)" in run_fails(ref)


def test_401_with_a_challenge_and_a_refused_token(proxy_for):
    _, ref = proxy_for(bearer=True, token_status=401)
    line = run_fails(ref)
    assert "token request refused (401 unauthorized)" in line and "docker login" in line


def test_403_forbidden(proxy_for):
    _, ref = proxy_for(forever={"manifest": 403})
    line = run_fails(ref)
    assert ref.split("/")[0] in line and "403 forbidden (injected)" in line


def test_404_blob(proxy_for):
    _, ref = proxy_for(forever={"blob": 404})
    assert "404 not found" in run_fails(ref)


def test_5xx_then_success_is_retried(proxy_for):
    proxy, ref = proxy_for(statuses={"manifest": [500, 502], "blob": [503]})
    run_ok(ref)
    assert proxy.events[:3] == ["500", "502", "503"] or {"500", "502", "503"} <= set(
        proxy.events)


def test_5xx_forever_gives_up(proxy_for):
    proxy, ref = proxy_for(forever={"manifest": 503})
    assert "HTTP 503" in run_fails(ref)
    assert proxy.events.count("503") >= 3  # retried with backoff before giving up


def test_corrupted_blob_bytes_are_never_reported(proxy_for):
    proxy, ref = proxy_for(corrupt_blobs=True)
    assert "digest" in run_fails(ref).lower()
    assert "corrupt" in proxy.events


def test_content_type_disagreeing_with_media_type(proxy_for):
    _, ref = proxy_for(content_type="application/vnd.docker.distribution.manifest.v2+json")
    assert "disagrees with the manifest's mediaType" in run_fails(ref)


def test_slow_server_hits_the_timeout(proxy_for):
    import time

    proxy, ref = proxy_for(delay_s=3.0)
    start_s = time.perf_counter()
    assert "cannot reach" in run_fails(ref, "--timeout-s", "1")
    assert time.perf_counter() - start_s < 60  # bounded: timeouts and a capped number of tries
