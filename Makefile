# The one entry point for developers, the README and CI.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
APP ?= services.face:engine
PYTEST_ARGS ?=

.PHONY: install run test lint format typecheck bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[face,dev]'

run: install
	$(BIN)/blueengine serve $(APP)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

typecheck: install
	$(BIN)/mypy

bench: install
	$(BIN)/python -m bench.transport
	$(BIN)/python -m bench.memory
	$(BIN)/python -m bench.gateway
	$(BIN)/python -m bench.face

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
