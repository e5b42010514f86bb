# One command for each thing a developer needs. See README.md.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
CONFIG ?= config/demo.yaml
PYTEST_ARGS ?=

.PHONY: install run test test-deps omero-env omero-double lint bench faults clean

# The service's own environment (Python 3.11+), with the test tools.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit("watchfolder needs Python 3.11 or newer; set PYTHON=python3.11") if sys.version_info < (3, 11) else None'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

# Bytecode written once (an editable install does not, and PYTHONDONTWRITEBYTECODE stops imports
# from writing it): every `watchfolder` process would otherwise compile its ~40 modules at start
# (~0.13 s). Up-to-date files are skipped, so this is cheap after the first time.
install: $(VENV)/.installed
	$(BIN)/python -m compileall -q watchfolder

# The demo: archive importer, mail to an outbox folder, everything under demo-data/.
run: install
	$(BIN)/watchfolder --config $(CONFIG) run

# Python 3.10 + omero-py for the OMERO importer's child process and its tests
# (the zeroc-ice wheel is built once, ~5 min, and cached). Its absence makes the
# OMERO tests skip with the reason, it does not stop the other tests.
omero-env:
	scripts/omero-env || echo "make: no OMERO environment (see above); the OMERO tests will skip"

# The OMERO server double, by hand: prints its ports, the admin's password and a
# config snippet, and serves until Ctrl-C (README: "Trying the OMERO path without a server").
omero-double: omero-env
	$(PYTHON) scripts/omero-double

# What the tests need outside Python: a headless Chromium for the dashboard test,
# PostgreSQL server binaries for the PostgreSQL store tests.
test-deps:
	scripts/test-deps

test: install omero-env test-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Fault drills at full size (make test runs a bounded slice of each): see tests/faults/.
# Issue 11's counts: kill -9 loops of `work` (200 jobs, 20 kills) and `run` (100 drops,
# 35 kills), a SIGSTOPped worker, SMTP down past the retry budget, disk full (as root),
# database corrupt/deleted, two `run`s on one data dir; each drill prints its counts.
faults: install test-deps
	rm -f faults-report.txt
	WATCHFOLDER_FAULTS=1 WATCHFOLDER_FAULTS_REPORT=$(CURDIR)/faults-report.txt \
		$(BIN)/python -m pytest -p no:cacheprovider tests/faults $(PYTEST_ARGS)
	@cat faults-report.txt

lint: install
	$(BIN)/ruff check watchfolder tests bench

bench: install omero-env
	scripts/bench-deps
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) .venv-omero demo-data .pytest_cache build *.egg-info faults-report.txt
