# The two commands of the README. Each sets up what it needs on a fresh machine with only Python.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: smoke test lint venv clean

# The main job ends in a verdict on a Docker host without the image: gpu-smoke builds it first
# (--build-missing; BASE_IMAGE, BUILD_NETWORK=host|default and CA_BUNDLE go to that build), and
# where no base can be had it tests on this host and says the container path was not tested.
SMOKE_ARGS = --build-missing $(if $(BASE_IMAGE),--base-image $(BASE_IMAGE)) \
	$(if $(BUILD_NETWORK),--network $(BUILD_NETWORK)) $(if $(CA_BUNDLE),--ca-bundle $(CA_BUNDLE))

smoke: $(VENV)/.runtime-installed
	$(VENV)/bin/envcheck gpu-smoke $(SMOKE_ARGS)

# Real components the integration tests drive (Debian packages; installed when root or sudo).
SYSTEM_PACKAGES := skopeo docker-registry docker.io docker-compose debootstrap apache2-utils gcc binutils \
	patchelf gzip zstd curl time \
	slurmctld slurmd slurm-client munge prometheus

test: $(VENV)/.test-installed
	scripts/install_system_packages.sh $(SYSTEM_PACKAGES) || echo "warning: could not install $(SYSTEM_PACKAGES); integration tests that need them will skip (or fail under CI=true)"
	PYTHON=$(PY) scripts/test-engine.sh || echo "warning: no Docker engine; container tests will skip (or fail under CI=true)"
	$(PY) -m pytest tests/unit tests/integration $(PYTEST_ARGS)

lint: $(VENV)/.test-installed
	$(VENV)/bin/ruff check envcheck model scripts tests

venv: $(PY)

$(PY):
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "envcheck needs Python >= 3.11"'
	$(PYTHON) -m venv $(VENV) || { scripts/install_system_packages.sh python3-venv && $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.runtime-installed: $(PY) pyproject.toml
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.test-installed: $(PY) pyproject.toml
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.runtime-installed

clean:
	rm -rf $(VENV) .pytest_cache
