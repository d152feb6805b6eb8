# EmailOps: `make run` serves it on a laptop with no services; `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run test lint format bench clean

$(VENV)/.runtime: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

run: $(VENV)/.runtime
	$(PY) manage.py migrate --no-input
	$(PY) manage.py seed_demo
	$(PY) manage.py ensure_admin
	$(PY) manage.py run_embedded --host $(HOST) --port $(PORT)

test: $(VENV)/.dev
	$(PY) manage.py makemigrations --check --dry-run
	$(PY) -m pytest

# Only the tests that drive Chromium (`make test` runs them too).
.PHONY: test-browser
test-browser: $(VENV)/.dev
	$(PY) -m pytest -m browser

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.dev
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(VENV)/.dev
	$(PY) -m bench.import_recipients
	$(PY) -m bench.pacing

# The live pages' chart library, vendored from the npm registry (no CDN): pinned here, refreshed
# by `make vendor-uplot` (needs npm), committed under static/vendor/uplot/ with its licence.
UPLOT_VERSION := 1.6.32
.PHONY: vendor-uplot
vendor-uplot:
	rm -rf var/npm-uplot && mkdir -p var/npm-uplot static/vendor/uplot
	cd var/npm-uplot && npm pack --silent uplot@$(UPLOT_VERSION)
	tar -xzf var/npm-uplot/uplot-$(UPLOT_VERSION).tgz -C var/npm-uplot
	cp var/npm-uplot/package/dist/uPlot.iife.min.js var/npm-uplot/package/dist/uPlot.min.css \
	   var/npm-uplot/package/LICENSE static/vendor/uplot/
	echo "uplot $(UPLOT_VERSION) (npm)" > static/vendor/uplot/VERSION
	rm -rf var/npm-uplot

clean:
	rm -rf $(VENV) var .pytest_cache .hypothesis
