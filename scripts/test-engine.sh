#!/usr/bin/env bash
# The test engine, by hand or from `make test`: Debian packages if missing (as root), a dockerd
# on its own socket (--bridge=none --iptables=false --ip-masq=false), and the local base image
# envcheck-test/debian:bookworm (debootstrap + docker import, cached by recipe).
#   scripts/test-engine.sh          # prints DOCKER_HOST=… BASE_IMAGE=…
#   scripts/test-engine.sh stop
# Registries are started per test session on 127.0.0.1 (scripts/local_registry.py).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
if [ "${1:-}" = "stop" ]; then exec "$python" -m scripts.test_engine stop; fi
scripts/install_system_packages.sh docker.io docker-registry skopeo docker-compose debootstrap
exec "$python" -m scripts.test_engine base
