# Two commands: `make run` starts the app, `make test` runs every test.
# Both create .venv on first use and reinstall only when a requirements file changes.

PYTHON_BOOTSTRAP ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 8501
# `make run` serves this machine only; `make run ADDRESS=0.0.0.0` opens it to the network (browser training
# then stays off unless VITKD_ENABLE_TRAINING=1: a run starts processes on the server).
ADDRESS ?= 127.0.0.1
IMAGE ?= vitkd:latest
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help run test lint bench docker-build docker-run clean-venv

help:
	@echo "make run           start the Streamlit app on http://localhost:$(PORT) (this machine only;"
	@echo "                   ADDRESS=0.0.0.0 serves the network, without browser training)"
	@echo "make test          run the whole test suite (PYTEST_ARGS='-k name' to narrow)"
	@echo "make lint          ruff on the code, hadolint on the Dockerfile"
	@echo "make bench         run the benchmarks in bench/"
	@echo "make docker-build  build the CPU image $(IMAGE)"
	@echo "make docker-run    serve the image on http://localhost:$(PORT)"
	@echo "make clean-venv    delete $(VENV)"

$(PY):
	$(if $(PYTHON_BOOTSTRAP),,$(error neither python3.11 nor python3 is on PATH))
	$(PYTHON_BOOTSTRAP) -m venv $(VENV)

# Stamp files: pip runs again only when the requirements it installed change.
$(VENV)/.requirements.stamp: requirements.txt | $(PY)
	$(PY) -m pip install -q -r requirements.txt
	@touch $@

$(VENV)/.requirements-dev.stamp: requirements.txt requirements-dev.txt | $(PY)
	$(PY) -m pip install -q -r requirements-dev.txt
	@touch $@

run: $(VENV)/.requirements.stamp
	@echo "vitkd app: http://$(ADDRESS):$(PORT)"
	$(PY) -m streamlit run app/streamlit_app.py --server.port=$(PORT) --server.address=$(ADDRESS) \
		--server.headless=true --browser.gatherUsageStats=false

test: $(VENV)/.requirements-dev.stamp
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(VENV)/.requirements-dev.stamp
	$(VENV)/bin/ruff check .
	$(VENV)/bin/hadolint --failure-threshold warning Dockerfile

bench: $(VENV)/.requirements.stamp
	@set -e; for script in bench/*.py; do \
		[ -e "$$script" ] || { echo "no benchmarks in bench/"; exit 0; }; \
		case "$$script" in */_*) continue ;; esac; \
		echo "== $$script"; $(PY) "$$script"; \
	done

# Docker targets need a Docker engine (not needed for run/test).
docker-build:
	docker build -t $(IMAGE) .

# Browser training stays off in the image; `make docker-run DOCKER_ARGS="-e VITKD_ENABLE_TRAINING=1"` enables it.
docker-run:
	docker run --rm -p $(PORT):8501 $(DOCKER_ARGS) $(IMAGE)

clean-venv:
	rm -rf $(VENV)
