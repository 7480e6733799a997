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

.PHONY: main test system-tools bench-cli
main: $(VENV)/.installed
	$(VENV)/bin/fedeid simulate --preset quick --adaptive --out $(REPORT)

test: $(VENV)/.installed system-tools
	$(PY) -m pytest -q

# The system programs the tests drive, from Debian/Ubuntu apt, installed when missing (as root,
# or with password-less sudo): the independent DICOM validators dciodvfy (dicom3tools) and
# dcmdump (dcmtk) that check fedeid's DICOM outputs, nginx (nginx-light), the Fleet-only
# proxy of the deployment perimeter, and headless Chromium, which renders the risk report. Where installing is impossible the tests that need them
# skip, and this says so loudly; under CI=true they fail instead, so CI never passes without them.
SYSTEM_TOOLS := dciodvfy:dicom3tools dcmdump:dcmtk nginx:nginx-light chromium:chromium

system-tools:
	@missing=""; for pair in $(SYSTEM_TOOLS); do \
	    cmd=$${pair%%:*}; pkg=$${pair#*:}; \
	    command -v $$cmd >/dev/null 2>&1 || [ -x /usr/sbin/$$cmd ] || missing="$$missing $$pkg"; \
	done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	SUDO=""; if [ "$$(id -u)" -ne 0 ]; then \
	    if sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO=none; fi; fi; \
	if [ "$$SUDO" != none ] && command -v apt-get >/dev/null 2>&1; then \
	    for attempt in 1 2 3; do \
	        $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=120 update -qq \
	        && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=120 install -y -qq \
	            --no-install-recommends $$missing && exit 0; \
	        echo "installing$$missing failed (attempt $$attempt)" >&2; sleep 5; \
	    done; \
	fi; \
	echo "*** missing and could not be installed:$$missing -- the tests that need them will be" >&2; \
	echo "*** SKIPPED. Install them with: sudo apt-get install$$missing" >&2

# Startup time of the command (`fedeid --help` target: under 0.3 s on an idle machine).
bench-cli: $(VENV)/.installed
	$(PY) simulations/benchmarks/cli_startup.py --out reports/cli_startup.json
