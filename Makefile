# `make demo`: set up .venv and run the main job (parity and speed of ResNet50 on every backend here).
# `make test`: set up .venv if needed and run the test suite (long checks: `make test-slow`).
# Both install the out-of-tree ONNX Runtime backend (plugins/hal-onnxruntime) as a plug-in would be installed.

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

.PHONY: demo test test-slow bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml $(PLUGIN)/pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	$(BIN)/python -m pip install --quiet -e $(PLUGIN)
	touch $@

demo: $(STAMP)
	$(BIN)/hal compare resnet50

test: $(STAMP)
	$(BIN)/python -m pytest -q tests $(PLUGIN)/tests

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow tests $(PLUGIN)/tests

bench: $(STAMP)
	$(BIN)/hal bench resnet50 --batch 16

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache $(PLUGIN)/build $(PLUGIN)/*.egg-info
