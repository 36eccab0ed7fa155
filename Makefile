# Two commands on a fresh machine: `make lab` (the main job) and `make test`.
# Both create .venv if needed and install pinned dependencies: torch first (a CPU build that lies
# on this machine's disk; a loose requirement would pull a multi-GB CUDA build), then the rest.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lnorm-installed
PYTEST_ARGS ?=

.PHONY: lab lab-full test smoke bench lint clean gpu-check mutate

$(STAMP): pyproject.toml requirements/torch.txt requirements/dev.in requirements/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements/torch.txt
	$(PY) -m pip install -q --disable-pip-version-check -r requirements/dev.in -c requirements/constraints.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

lab: $(STAMP)
	$(VENV)/bin/lnorm lab run --suite quick

# The full suite (hours: `lnorm lab list` prints the estimate), resumable: run it again to go on
# where it stopped. Then its page, docs/lab-results/full/README.md, to commit. Runs that failed
# (exit 1) are retried by the next resume; the page is still written and lists them as missing.
lab-full: $(STAMP)
	$(VENV)/bin/lnorm lab run --suite full --out runs/lab-full || test $$? -eq 1
	$(VENV)/bin/lnorm lab publish runs/lab-full

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# On a GPU machine, as it is (no venv, no network): the CUDA tests and `lnorm bench ops --device
# cuda`, logs and JSON in $(OUT) (default benchmarks/out/gpu-check-<time>); under 8 minutes.
gpu-check:
	bash benchmarks/gpu_check.sh

# Named mutations (tools/mutate.py): each breaks the code on purpose in a temporary copy and must
# make its tests fail. Minutes, not part of CI; MUTATE_ARGS="name ..." runs a few.
MUTATE_ARGS ?=
mutate: $(STAMP)
	$(PY) tools/mutate.py $(MUTATE_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests

clean:
	rm -rf $(VENV) build src/*.egg-info
