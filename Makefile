# `make test` and `make train` work on a fresh clone: they create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test train eval demo bench serve clean

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

train: $(STAMP)
	$(PY) train.py

eval: $(STAMP)
	$(PY) eval.py

# The main job on the built-in default (no downloads): meta-train, then evaluate on unseen tasks.
demo: train eval

bench: $(STAMP)
	$(PY) bench/train_step.py

# Serve the default run's PGM (after `make demo` or `make train`) on 127.0.0.1:8000.
serve: $(STAMP)
	$(PY) serve.py --workdir=runs/default

clean:
	rm -rf $(VENV) .pytest_cache
