# segstream — `make run` serves the viewer on the demo source; `make test` runs every test.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
HOST ?= 127.0.0.1
PORT ?= 8000
ARGS ?=
PYTEST_ARGS ?=
# TORCH_VARIANT=cpu (or cu126, cu128, ...) installs PyTorch from its own index first, as the
# Docker image does; left empty, pip takes PyTorch from PyPI (on Linux, a wheel with CUDA).
TORCH_VARIANT ?=
TORCH_VERSION ?= 2.13.0

.PHONY: run test test-unit test-integration lint bench bench-quick soak install install-test system-deps clean docker-config

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip >/dev/null

$(VENV)/.installed: pyproject.toml | $(VENV)/bin/activate
	$(if $(TORCH_VARIANT),$(PIP) install --index-url https://download.pytorch.org/whl/$(TORCH_VARIANT) "torch==$(TORCH_VERSION)")
	$(PIP) install -e '.[jit]'
	@# compile the temporal refiner's CPU kernels now (cached on disk), not in the first server
	$(VENV)/bin/python -c "from models import kernels; print('temporal refinement, CPU path:', kernels.status())"
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(PIP) install -e '.[test,jit]'
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

run: $(VENV)/.installed
	$(VENV)/bin/segstream serve --host $(HOST) --port $(PORT) $(ARGS)

# Debian packages the integration tests use (Chromium, FFmpeg, GStreamer's RTSP server).
# Installed when missing and we are root with apt-get; otherwise those tests skip with a reason.
system-deps:
	@bash tools/system-deps.sh

# pytest exits 5 when no test was collected; that is not a failure of the code under test.
test: $(VENV)/.installed-test system-deps
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest: no tests were collected"; rc=0; fi; exit $$rc

test-unit: $(VENV)/.installed-test
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

test-integration: $(VENV)/.installed-test system-deps
	$(PY) -m pytest tests/integration $(PYTEST_ARGS)

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check server pipeline models tests bench tools
	$(VENV)/bin/mypy

# Every benchmark, then the 10-minute soak (RSS, threads and p99 must stay flat).
bench: $(VENV)/.installed-test system-deps
	$(PY) -m bench $(ARGS)
	$(PY) -m bench.soak

bench-quick: $(VENV)/.installed-test system-deps
	$(PY) -m bench --quick $(ARGS)

soak: $(VENV)/.installed-test system-deps
	$(PY) -m bench.soak $(ARGS)

docker-config:
	docker compose config -q && echo "docker-compose.yml is valid"

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache bench/results tests/artifacts
