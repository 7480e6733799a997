# Two entry points (README): `make main` runs the federated simulation on the built-in
# synthetic benchmark and writes its report; `make test` runs the test suite. Both create the
# virtual environment first, installing the CPU build of torch before the project so that pip
# never resolves torch to a multi-GB CUDA build.
VENV ?= .venv
PY := $(VENV)/bin/python
REPORT ?= reports/main

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

.PHONY: main test
main: $(VENV)/.installed
	$(VENV)/bin/fedeid simulate --preset quick --adaptive --out $(REPORT)

test: $(VENV)/.installed
	$(PY) -m pytest -q
