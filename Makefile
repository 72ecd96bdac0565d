# digitserve: the commands in the README. Needs Python 3.11 (mxnet 1.9.1 needs numpy<1.24,
# which has no wheels for newer Pythons).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test test-all reliability lint train evaluate study notebook e2e kube-validate \
	kube-e2e clean python-check

python-check:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)' 2>/dev/null || { \
	  echo "digitserve needs Python 3.11 (found: $$($(PYTHON) --version 2>&1 || echo none))."; \
	  echo "Install python3.11 and run again, or: make PYTHON=/path/to/python3.11 ..."; exit 2; }
	@$(PYTHON) -c 'import ensurepip' 2>/dev/null || { \
	  echo "$(PYTHON) cannot make virtualenvs: on Debian/Ubuntu, apt-get install python3-venv"; exit 2; }

$(STAMP)-serve: pyproject.toml | python-check
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

$(STAMP)-dev: pyproject.toml | python-check
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@ $(STAMP)-serve

## Set up and serve the shipped model on http://127.0.0.1:8000 (Ctrl-C stops).
run: $(STAMP)-serve
	exec $(VENV)/bin/gunicorn -c service/gunicorn.conf.py "service.app:create_app()"

## Set up and run the test suite (lint + tests; slow checks excluded).
test: $(STAMP)-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest

## Everything, slow checks included.
test-all: $(STAMP)-dev
	$(PY) -m pytest -m ""

## Load and fault tests (docs/reliability.md): about 6 min; QUICK=1 for CI's bounded run.
## Needs wrk and nginx (apt-get install wrk nginx); run it alone on the machine.
reliability: $(STAMP)-dev
	$(PY) -m benchmarks.reliability $(if $(QUICK),--quick,--output $(or $(OUT),benchmarks/results/reliability.json)) \
	    $(if $(ARGS),-- $(ARGS))

lint: $(STAMP)-dev
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

## Retrain and publish a new version (pass ARGS="--epochs 3 ...").
train: $(STAMP)-dev
	$(PY) -m training.train $(ARGS)

evaluate: $(STAMP)-dev
	$(PY) -m training.evaluate mnist $(ARGS)

study: $(STAMP)-dev
	$(PY) -m training.study $(ARGS)

## Open the BatchNorm notebook in JupyterLab (installs the [notebook] extra).
notebook: $(STAMP)-dev
	$(PY) -m pip install --quiet -e '.[notebook]'
	$(VENV)/bin/jupyter lab notebooks/batch_normalization.ipynb

## Build and run the containers for real (podman + docker-compose), then clean up.
e2e:
	bash scripts/container-e2e.sh

# The Kubernetes tools (KServe's SDK, kubernetes-validate, checkov) in a virtualenv of
# their own: the SDK needs a newer numpy than MXNet allows.
KUBE_VENV ?= .venv-kube
$(KUBE_VENV)/.installed: deploy/kubernetes/requirements-tools.txt | python-check
	test -x $(KUBE_VENV)/bin/python || $(PYTHON) -m venv $(KUBE_VENV)
	$(KUBE_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(KUBE_VENV)/bin/python -m pip install --quiet -r deploy/kubernetes/requirements-tools.txt
	touch $@

## Render every Kubernetes overlay and validate it (schemas, KServe's models, checkov).
kube-validate: $(KUBE_VENV)/.installed
	$(KUBE_VENV)/bin/python scripts/validate_manifests.py --self-test

## Play the local overlay with podman for real (as root), with KServe's client; cleans up.
kube-e2e: $(KUBE_VENV)/.installed
	DIGITSERVE_KUBE_VENV=$(KUBE_VENV) bash scripts/kube-e2e.sh

clean:
	rm -rf $(VENV) $(KUBE_VENV) .pytest_cache .ruff_cache .hypothesis
