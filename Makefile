# Two commands do everything on a fresh machine:
#   make run    set up, make a self-signed certificate if none, run the relay
#   make test   set up (Python and Debian packages) and run the whole suite

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test bench setup debian-packages

$(BIN)/mta: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# "compat" editable mode puts the checkout on sys.path, which is what
	# lets twistd find twisted/plugins/mta_plugin.py.
	$(BIN)/pip install --quiet -e '.[test]' --config-settings editable_mode=compat
	touch $(BIN)/mta

setup: $(BIN)/mta

run: setup
	$(BIN)/mta --config etc/mta.yaml make-cert
	$(BIN)/twistd --nodaemon --pidfile= mta --config etc/mta.yaml

debian-packages:
	./scripts/debian-packages

test: setup debian-packages
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The relay beside a private Postfix (README "Benchmark"); e.g.
# make bench BENCH_ARGS="--plain --concurrency 10 --repeat 5"
bench: setup debian-packages
	$(BIN)/python bench/run.py $(BENCH_ARGS)
