# Two entry points (see README): `make run` sets up from nothing and generates with the
# default model; `make test` sets up and runs the test suite (what CI runs).
VENV ?= .venv
PY := $(VENV)/bin/python
NTR := $(VENV)/bin/ntr

.PHONY: setup model run test

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

model: setup
	$(NTR) models pull

run: model
	$(NTR) generate --chat --preset greedy --max-tokens 96 \
		--prompt "Write a Python function that checks whether a string is a palindrome."

test: model
	$(PY) -m pytest -q
