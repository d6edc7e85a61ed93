"""Registry credentials from the Docker config file (~/.docker/config.json or $DOCKER_CONFIG), read
as docker reads it: credHelpers, credsStore, then auths (`auth`, or `username` and `password`).
The helper program is faked at the subprocess seam; the integration tests run a real one."""

from __future__ import annotations

import base64
import json

import pytest

from envcheck.image import credentials as registry
from envcheck.runner import RunResult

HOST = "127.0.0.1:5000"


def credentials(tmp_path, config, host: str = HOST):
    (tmp_path / "config.json").write_text(json.dumps(config))
    return registry.docker_credentials(host, config_dir=str(tmp_path))


def auth(user: str, secret: str) -> str:
    return base64.b64encode(f"{user}:{secret}".encode()).decode()


def test_auths_entry_in_the_form_docker_login_writes(tmp_path):
    assert credentials(tmp_path, {"auths": {HOST: {"auth": auth("me", "pw:with:colons")}}}) == (
        "me", "pw:with:colons")


def test_auths_entry_with_username_and_password(tmp_path):
    """docker reads these fields when `auth` is empty or absent, and `auth` over them."""
    entry = {"username": "me", "password": "pw"}
    assert credentials(tmp_path, {"auths": {HOST: entry}}) == ("me", "pw")
    assert credentials(tmp_path, {"auths": {HOST: entry | {"auth": ""}}}) == ("me", "pw")
    assert credentials(tmp_path, {"auths": {HOST: entry | {"auth": auth("a", "b")}}}) == (
        "a", "b")


def test_docker_hub_is_found_under_its_legacy_key(tmp_path):
    config = {"auths": {"https://index.docker.io/v1/": {"auth": auth("hub", "pw")}}}
    assert credentials(tmp_path, config, "registry-1.docker.io") == ("hub", "pw")
    assert credentials(tmp_path, config) is None


def test_a_credential_helper_comes_before_auths(tmp_path, monkeypatch):
    asked = []

    def helper(argv, timeout_s, input_text=None):
        asked.append((argv, input_text))
        return RunResult(0, json.dumps({"Username": "from", "Secret": "helper"}), "")

    monkeypatch.setattr(registry.runner_module, "run", helper)
    auths = {"auths": {HOST: {"auth": auth("from", "auths")}}}
    assert credentials(tmp_path, auths | {"credHelpers": {HOST: "pass"}}) == ("from", "helper")
    assert credentials(tmp_path, auths | {"credsStore": "desktop"}) == ("from", "helper")
    assert asked == [(["docker-credential-pass", "get"], HOST),
                     (["docker-credential-desktop", "get"], HOST)]


@pytest.mark.parametrize("config", [
    [], "text", 5, None,
    {"auths": []}, {"auths": "x"}, {"auths": {HOST: "x"}}, {"auths": {HOST: None}},
    {"auths": {HOST: {"auth": 5}}}, {"auths": {HOST: {"auth": "%%not base64%%"}}},
    {"auths": {HOST: {"auth": base64.b64encode(b"\xff\xfe").decode()}}},
    {"auths": {HOST: {"username": 5, "password": "pw"}}}, {"auths": {HOST: {"username": "me"}}},
    {"credHelpers": []}, {"credHelpers": {HOST: 5}}, {"credsStore": 5}, {"credsStore": ""},
])
def test_a_config_not_shaped_as_docker_writes_it_gives_no_credentials(tmp_path, monkeypatch,
                                                                       config):
    """Skipped as if absent (no traceback); a registry that wants credentials then says 401 and
    names `docker login`."""
    monkeypatch.setattr(registry.runner_module, "run", lambda *a, **k: pytest.fail("ran"))
    assert credentials(tmp_path, config) is None


def test_a_broken_entry_does_not_hide_a_good_one_under_another_key(tmp_path):
    config = {"auths": {HOST: "broken", f"https://{HOST}": {"auth": auth("me", "pw")}}}
    assert credentials(tmp_path, config) == ("me", "pw")


def test_no_config_file_or_no_json(tmp_path):
    assert registry.docker_credentials(HOST, config_dir=str(tmp_path)) is None
    (tmp_path / "config.json").write_text("{not json")
    assert registry.docker_credentials(HOST, config_dir=str(tmp_path)) is None
