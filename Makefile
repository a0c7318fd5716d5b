# hetkd: the two commands a newcomer needs are `make run` and `make test`.
#
#   make run                       default simulation with `flwr run .` (10 devices, digits)
#   make run RUN_CONFIG="strategy='fedavg' models.assignment='homogeneous' num-server-rounds=5"
#   make test                      the whole test suite (what CI runs, on the newest supported Flower)
#   make test-fast                 the quick subset (no end-to-end simulations)
#   make test-lowest-flower        the quick subset and the deployment test on Flower 1.39 (CI runs it too)
#   make stop                      stop the local SuperLink that `flwr run` leaves running

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# the lowest Flower release hetkd supports (pyproject: flwr[simulation]>=1.39,<1.43), in a venv of its own
LOWEST_FLOWER ?= 1.39.0
LOWEST_VENV ?= .venv-flwr$(LOWEST_FLOWER)
DEVICES ?= 10
RUN_CONFIG ?=
# tests run in two pytest-xdist workers, one torch thread per process (tests/conftest.py): 931-1,008 s in
# CI before bbc9021; on the 2-core AMD EPYC of 2026-12-07 (evening), 544 and 562 s for the tests that took
# CI 935 and 1,008 s, and 463 s after bbc9021. A torch thread per core oversubscribes the cores (1,240 s
# where two workers took 989 s); one worker at a time leaves them idle a third of the time, waiting on the
# processes its tests start; PYTEST_WORKERS= runs the tests one by one.
# `make test` lists its 15 slowest tests, to keep the whole suite within about 15 minutes
PYTEST_WORKERS ?= -n 2
# `flwr run` would otherwise install the app's dependencies with uv for every run
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO := 0

.PHONY: install run test test-fast test-lowest-flower stop clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip "setuptools>=68" wheel
	$(BIN)/python -m pip install -e ".[dev,dp]"
	touch $@

run: install
	$(BIN)/hetkd config $(RUN_CONFIG) > /dev/null
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/flwr run . --stream \
		--federation-config "num-supernodes=$(DEVICES) client-resources-num-cpus=1" \
		--run-config "output.root='$(CURDIR)/outputs' simulation.num_devices=$(DEVICES) $(RUN_CONFIG)"

test: install
	$(BIN)/python -m pytest $(PYTEST_WORKERS) --durations=15

test-fast: install
	$(BIN)/python -m pytest $(PYTEST_WORKERS) -m "not slow"

$(LOWEST_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(LOWEST_VENV)
	$(LOWEST_VENV)/bin/python -m pip install --upgrade pip "setuptools>=68" wheel
	$(LOWEST_VENV)/bin/python -m pip install -e ".[dev,dp]" "flwr[simulation]==$(LOWEST_FLOWER)"
	touch $@

test-lowest-flower: $(LOWEST_VENV)/.installed
	$(LOWEST_VENV)/bin/python -c "import flwr; assert flwr.__version__ == '$(LOWEST_FLOWER)', flwr.__version__"
	$(LOWEST_VENV)/bin/python -m pytest $(PYTEST_WORKERS) -m "not slow"
	$(LOWEST_VENV)/bin/python -m pytest $(PYTEST_WORKERS) -m slow tests/test_deploy.py

stop:
	@pid=$$(pgrep -f "[f]lower-superlink.*--simulation" | head -n 1); \
	if [ -n "$$pid" ]; then kill $$pid && echo "stopped local SuperLink (pid $$pid)"; else echo "no local SuperLink running"; fi

clean:
	rm -rf $(VENV) $(LOWEST_VENV) build *.egg-info src/*.egg-info
