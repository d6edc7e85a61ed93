"""Registry credentials as docker reads them from its config (~/.docker/config.json or
DOCKER_CONFIG): credential helpers (credHelpers, credsStore) first, then `auths`."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

from envcheck import runner as runner_module

HUB_CONFIG_KEY = "https://index.docker.io/v1/"


def docker_credentials(registry: str, config_dir: str | None = None) -> tuple[str, str] | None:
    """(username, secret) for `registry` from the Docker config: credHelpers, credsStore, auths
    (`auth`, or `username` and `password` as docker reads them too). A part of the file that is
    not shaped as docker writes it is skipped, as if absent."""
    directory = Path(config_dir or os.environ.get("DOCKER_CONFIG") or Path.home() / ".docker")
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return None
    config = config if isinstance(config, dict) else {}
    keys = [registry, f"https://{registry}"] + (
        [HUB_CONFIG_KEY, "docker.io", "index.docker.io"] if registry == "registry-1.docker.io"
        else [])
    helpers = _mapping(config, "credHelpers")
    helper = next((helpers[k] for k in keys if k in helpers), None) or config.get("credsStore")
    if isinstance(helper, str) and helper:
        found = _from_helper(helper, HUB_CONFIG_KEY if registry == "registry-1.docker.io"
                             else registry)
        if found:
            return found
    auths = _mapping(config, "auths")
    return next((found for key in keys if (found := _auth_entry(auths.get(key)))), None)


def _mapping(config: dict, key: str) -> dict:
    value = config.get(key)
    return value if isinstance(value, dict) else {}


def _auth_entry(entry) -> tuple[str, str] | None:
    """An `auths` entry's (username, secret): its base64 `auth`, else its `username` and
    `password` (docker decodes `auth` over them when both are there)."""
    if not isinstance(entry, dict):
        return None
    if isinstance(entry.get("auth"), str) and entry["auth"]:
        try:
            user, _, secret = base64.b64decode(entry["auth"]).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
        return user, secret
    user, secret = entry.get("username"), entry.get("password")
    return (user, secret) if isinstance(user, str) and isinstance(secret, str) and user else None


def _from_helper(helper: str, server: str) -> tuple[str, str] | None:
    result = runner_module.run([f"docker-credential-{helper}", "get"], 10, input_text=server)
    if result.rc != 0:
        return None
    try:
        data = json.loads(result.out)
        return data["Username"], data["Secret"]
    except (ValueError, KeyError, TypeError):
        return None
