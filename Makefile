# `make run`: set up and run the whole pipeline on the embedded default.
# `make test`: set up (with test tools) and run every test.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export DO_NOT_TRACK := 1
export RAY_USAGE_STATS_ENABLED := 0
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export HF_HUB_OFFLINE := 1
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: run test install unit integration clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch first and pinned: 2.13.0 is the CPU build on local disk; an unpinned torch
# would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev,hf]'
	touch $@

install: $(VENV)/.installed

run: install
	$(BIN)/distill run

test: install
	$(BIN)/python -m pytest -q

unit: install
	$(BIN)/python -m pytest -q tests/unit

integration: install
	$(BIN)/python -m pytest -q tests/integration

clean:
	rm -rf data/prepared data/labels models reports runs gate/decision.json gate/decision_map.png \
		gate/coefficients.json gate/calibration_points.json gate/calibration.png
