# EmailOps: `make run` serves it on a laptop with no services; `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000

# Deployment (docs/deploy.md). Each prints its real commands under `make -n`, without AWS.
ENGINE ?= podman
GIT_SHA := $(shell git rev-parse --short=12 HEAD 2>/dev/null || echo dev)
IMAGE ?= localhost/emailops:$(GIT_SHA)
STACK ?= emailops
AWS_REGION ?= us-east-1
# The stack's repository, looked up when a recipe runs (not when make reads this file).
ECR_REPOSITORY ?= $$($(PY) -m deploy.aws output RepositoryUri --stack $(STACK) --region $(AWS_REGION))
ECR_IMAGE ?= $(ECR_REPOSITORY):$(GIT_SHA)
LAMBDA_ZIP ?= dist/emailops-worker-$(GIT_SHA).zip
CA_BUNDLE ?=

.PHONY: run test lint format bench clean image image-test push lambda deploy

$(VENV)/.runtime: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

# Development's settings, explicitly: DEBUG is off unless set (then secrets are required).
run: export DEBUG = true
run: $(VENV)/.runtime
	$(PY) manage.py migrate --no-input
	$(PY) manage.py seed_demo
	$(PY) manage.py ensure_admin
	$(PY) manage.py run_embedded --host $(HOST) --port $(PORT)

test: $(VENV)/.dev
	DEBUG=true $(PY) manage.py makemigrations --check --dry-run
	$(PY) -m pytest

# Only the tests that drive Chromium (`make test` runs them too).
.PHONY: test-browser
test-browser: $(VENV)/.dev
	$(PY) -m pytest -m browser

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

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
	rm -rf $(VENV) var dist .pytest_cache .hypothesis

# The image, tagged by git sha: podman here (deploy/local-image.sh: a local base, a wheelhouse,
# no pulls); ENGINE=docker builds the same Dockerfile on its default base.
image:
ifeq ($(ENGINE),docker)
	docker build -t $(IMAGE) .
else
	IMAGE=$(IMAGE) deploy/local-image.sh build
endif

# Build the image and run its roles here: migrate, web, conductor, beat, a real send through the
# sandbox, SIGTERM timings (PostgreSQL db emailops_deploy, Redis db 3). Not part of `make test`.
image-test: $(VENV)/.dev
	IMAGE=$(IMAGE) $(PY) -m deploy.image_test

# ECR login (boto3; the password goes to the engine on stdin), tag, push.
push: $(VENV)/.dev
	$(PY) -m deploy.aws ecr-login --region $(AWS_REGION) --engine $(ENGINE)
	$(ENGINE) tag $(IMAGE) $(ECR_IMAGE)
	$(ENGINE) push $(ECR_IMAGE)

# The worker function's zip: the handler and what it imports, wheels for Lambda's python3.11.
# Rebuilt when what goes into it changed.
lambda: $(LAMBDA_ZIP)
$(LAMBDA_ZIP): requirements.txt deploy/lambda_build.py $(wildcard sending/*.py) | $(VENV)/.dev
	$(PY) deploy/lambda_build.py --out $@ $(if $(CA_BUNDLE),--ca-bundle $(CA_BUNDLE))

# Register the task definitions, migrate, update the services, update the worker function.
deploy: $(LAMBDA_ZIP) | $(VENV)/.dev
	$(PY) -m deploy.aws deploy --stack $(STACK) --region $(AWS_REGION) --image $(ECR_IMAGE) --lambda-zip $(LAMBDA_ZIP)
