# hetkd: the two commands a newcomer needs are `make run` and `make test`.
#
#   make run                       default simulation with `flwr run .` (10 devices, digits)
#   make run RUN_CONFIG="strategy='fedavg' models.assignment='homogeneous' num-server-rounds=5"
#   make test                      the whole test suite (what CI runs)
#   make test-fast                 the quick subset (no end-to-end simulations)
#   make stop                      stop the local SuperLink that `flwr run` leaves running

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEVICES ?= 10
RUN_CONFIG ?=
# `flwr run` would otherwise install the app's dependencies with uv for every run
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO := 0

.PHONY: install run test test-fast stop clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip "setuptools>=68" wheel
	$(BIN)/python -m pip install -e ".[dev]"
	touch $@

run: install
	$(BIN)/hetkd config $(RUN_CONFIG) > /dev/null
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/flwr run . --stream \
		--federation-config "num-supernodes=$(DEVICES) client-resources-num-cpus=1" \
		--run-config "output.root='$(CURDIR)/outputs' simulation.num_devices=$(DEVICES) $(RUN_CONFIG)"

test: install
	$(BIN)/python -m pytest

test-fast: install
	$(BIN)/python -m pytest -m "not slow"

stop:
	@pid=$$(pgrep -f "flower-superlink.*--simulation" | head -n 1); \
	if [ -n "$$pid" ]; then kill $$pid && echo "stopped local SuperLink (pid $$pid)"; else echo "no local SuperLink running"; fi

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
