"""The registry client against real faults: our fault-injecting proxy in front of the real
docker-registry (Bearer challenges with and without `service`, 429 + Retry-After, a connection
dropped mid-blob, redirects to another host). Each run must still verify every digest."""

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


def run_ok(ref: str) -> dict:
    done = envcheck(ref, "--json")
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


def test_429_with_retry_after_is_retried(proxy_for):
    proxy, ref = proxy_for(too_many_once=True)
    run_ok(ref)
    assert "429" in proxy.events


def test_dropped_blob_download_resumes_with_range(proxy_for):
    proxy, ref = proxy_for(drop_blob_once=True)
    run_ok(ref)
    assert "drop" in proxy.events and "range" in proxy.events


def test_redirect_to_another_host_drops_authorization(proxy_for):
    proxy, ref = proxy_for(bearer=True, redirect_blobs=True)
    report = run_ok(ref)
    # The config and every layer came through the redirect, none with the bearer token.
    assert proxy.redirected_auth == [None] * (len(report["layers"]) + 1)
