# The two commands: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed-stamp
# torch/torchvision are a matched pair; these are the releases we test on (Python 3.11, pip).
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test lint format venv clean-outputs

$(PY):
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "HeriCap needs Python >= 3.10"'
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PIP) install --quiet $(TORCH_PIN) || $(PIP) install --quiet torch torchvision
	$(PIP) install --quiet -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/hericap demo

test: $(STAMP)
	$(VENV)/bin/pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check hericap jobs tests benchmarks
	$(VENV)/bin/ruff format --check hericap jobs tests benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff format hericap jobs tests benchmarks
	$(VENV)/bin/ruff check --fix hericap jobs tests benchmarks

clean-outputs:
	rm -rf outputs
