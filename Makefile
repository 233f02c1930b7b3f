# `make demo`: set up .venv and run the main job (parity and speed of ResNet50 on every backend here).
# `make test`: set up .venv if needed and run the test suite (long checks: `make test-slow`).
# Both install the out-of-tree ONNX Runtime backend (plugins/hal-onnxruntime) as a plug-in would be installed.
# `make test-torch20`: the torch backend's tests and the conformance suite (numpy, torch:cpu) on torch 2.0.1 (the torch
# that PopTorch 3.3/3.4 pins), in a venv of its own (.venv-torch20); prints how long the set-up and the tests took.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
# torch and torchvision pinned to the releases this project is tested with (torchvision's models are ground truth
# for the import tests); on Linux x86_64 this is a CUDA build, which runs on CPUs too. Override e.g. TORCH="torch torchvision".
TORCH  ?= torch==2.14.1 torchvision==0.29.1
EXTRAS ?= all,dev
comma  := ,
STAMP  := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
PLUGIN := plugins/hal-onnxruntime

.PHONY: demo test test-slow test-torch20 bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Last, Keras 2 (tf_keras, matching TensorFlow's minor version) for the tests of the IPU TensorFlow paths, which use
# TF 2.x's Keras 2 API; --no-deps because it asks for `tensorflow`, which would pull the CUDA build over tensorflow-cpu.
$(STAMP): pyproject.toml $(PLUGIN)/pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	$(BIN)/python -m pip install --quiet -e $(PLUGIN)
	$(BIN)/python -m pip install --quiet --no-deps "tf_keras~=$$($(BIN)/python -c 'import tensorflow as t; print(t.__version__.rsplit(".", 1)[0])').0"
	touch $@

demo: $(STAMP)
	$(BIN)/hal compare resnet50

test: $(STAMP)
	$(BIN)/python -m pytest -q tests $(PLUGIN)/tests

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow tests $(PLUGIN)/tests

# The oldest torch hal supports. Only torch, numpy and the test tools (no jax, no tensorflow: their tests skip);
# numpy<2 because torch 2.0 was built against numpy 1 (with numpy 2 its tensor<->array conversions fail).
VENV20  := .venv-torch20
BIN20   := $(VENV20)/bin
TORCH20 ?= torch==2.0.1 "numpy<2"
STAMP20 := $(VENV20)/.installed

$(STAMP20): pyproject.toml
	@start=$$(date +%s); set -e; \
	test -x $(BIN20)/python || $(PYTHON) -m venv $(VENV20); \
	$(BIN20)/python -m pip install --quiet --upgrade pip; \
	$(BIN20)/python -m pip install --quiet -e ".[torch]" $(TORCH20) "pytest>=8" "hypothesis>=6.100"; \
	touch $@; echo "$(VENV20) set up in $$(( $$(date +%s) - start )) s"

test-torch20: $(STAMP20)
	@start=$$(date +%s); \
	$(BIN20)/python -c "import torch; print('torch', torch.__version__)"; \
	$(BIN20)/python -m pytest -q tests/test_torch_backend.py tests/test_conformance.py; rc=$$?; \
	echo "test-torch20: tests ran in $$(( $$(date +%s) - start )) s"; exit $$rc

bench: $(STAMP)
	$(BIN)/hal bench resnet50 --batch 16

clean:
	rm -rf $(VENV) $(VENV20) build *.egg-info .pytest_cache $(PLUGIN)/build $(PLUGIN)/*.egg-info
